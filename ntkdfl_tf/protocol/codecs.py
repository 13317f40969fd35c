"""Codecs: how a message is encoded on the wire, chosen by name with parameters.

A codec string names stages applied in order, joined by ``+``, each ``name`` or
``name:key=value,key=value``: ``identity`` (the default), ``subsample:fraction=0.25``,
``inputs``, ``factored``, ``project:fraction=0.01``, ``dp:clip=1.0,noise=1.0``,
``topk:fraction=0.1``, ``quantize:bits=8`` (``stochastic=1`` for stochastic rounding).
``parse("subsample:fraction=0.25+topk:fraction=0.1+quantize:bits=8")`` gives a ``Codec``.

What each stage does to a Jacobian package of n samples (C classes, P parameters):

- ``subsample``: the sender keeps a random ``ceil(fraction * n)`` of its samples (at least one);
  the receiver builds its kernel on the samples it received.
- ``inputs`` (lossless): the package is a function of the sender's inputs and the receiver's
  averaged weights, which the receiver has, so the sender may send its raw inputs (as stored,
  e.g. uint8 pixels) and labels, and the receiver evaluates the Jacobians and logits itself.
  It reveals exactly what the Jacobians reveal (they give the inputs back exactly anyway).
- ``factored`` (lossless): a Dense layer's per-sample Jacobian block is the outer product of its
  input (d values) and its backpropagated signal per class (C x h values), so the package sends
  those factors instead of the C x d x h block; a linear output layer's signal is the identity
  and is not sent. The first layer's input is the sample itself after the model's weightless
  preprocessing, so it is sent as stored (e.g. uint8 pixels) when its size is known and the
  receiver re-applies the preprocessing. Other layers are sent dense. The receiver's arrays
  are unchanged.
- ``project``: a random projection (a count sketch, seeded per round, both ends know the
  seed): each sample's C x P Jacobian becomes C x k values, k = ``ceil(fraction * P)``, each the
  signed sum of the parameters hashed to it: A = J S^T. The receiver projects its own Jacobian
  with the same sketch, builds H from A A^T and updates by S^T A^T R. Both are unbiased
  (E[S^T S] = I): E[A_a A_b^T] = J_a J_b^T, E[S^T A^T R] = J^T R for a given R.
- ``dp``: the Gaussian mechanism per sample: the sample's Jacobian (its projection after
  ``project``) and logits, as one vector, are clipped to L2 norm ``clip`` and every entry gets
  N(0, (noise * clip)^2). ``ntkdfl_tf.privacy.gaussian_epsilon`` turns the noise multiplier and
  the number of packages a sample went into into epsilon(delta). It covers the packages'
  Jacobian rows and logits only: the labels, the logits senders give at later Jacobian-batching
  slices, the losses that choose tau and the weights a client sends are not noised. The noise
  adds k * (noise * clip)^2 to the expected diagonal of H (k values per sample and class).
- ``topk``: per tensor, only the ``ceil(fraction * size)`` entries largest in magnitude are
  sent, with their int32 indices; the rest arrive as zero.
- ``quantize``: per tensor, values are rounded to ``2**bits`` uniform levels between the
  tensor's minimum and maximum (two float32 header values); stochastic rounding is unbiased.

Logits (float32) and labels (int32) are sent as they are (noised by ``dp``). For weight
messages, ``topk`` and ``quantize`` apply per tensor in the same way; the other stages do not
apply. The stages that change values need the receiver to hold explicit Jacobians; the worker
forms them per Jacobian-batching slice. A receiver's own Jacobians are never encoded (they are
not sent), except projected by ``project``.
``nbytes`` is the encoded payload: values, indices, scales and headers.
"""

import dataclasses
import math
import typing

import numpy as np

QUANTIZE_HEADER = 8  # float32 minimum and scale per quantised tensor
PROJECT_HEADER = 8  # the sketch's int64 seed


@dataclasses.dataclass(frozen=True)
class Stage:
    """One named step of a codec with its parameters."""

    name: str
    fraction: float = None
    bits: int = None
    stochastic: bool = False
    clip: float = None
    noise: float = None


STAGES = {
    "identity": {},
    "inputs": {},
    "factored": {},
    "quantize": {"bits": int, "stochastic": lambda v: bool(int(v))},
    "topk": {"fraction": float},
    "subsample": {"fraction": float},
    "project": {"fraction": float},
    "dp": {"clip": float, "noise": float},
}
ORDER = ("subsample", "inputs", "factored", "project", "dp", "topk", "quantize")  # each acts
VALUE_STAGES = ("project", "dp", "topk", "quantize")  # on what the previous ones leave


class CodecError(ValueError):
    """A codec string that cannot be parsed; the message says what was found and the fix."""


def _stage(text, spec):
    name, _, params = text.partition(":")
    name = name.strip()
    if name not in STAGES:
        raise CodecError(f"Unknown codec stage {name!r} in {spec!r}; choose from "
                         f"{', '.join(STAGES)} (e.g. 'subsample:fraction=0.25+topk:fraction=0.1"
                         "+quantize:bits=8').")
    values = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in STAGES[name]:
            allowed = ", ".join(STAGES[name]) or "no parameters"
            raise CodecError(f"Codec stage {name!r} in {spec!r} takes {allowed}; got {item!r}.")
        try:
            values[key] = STAGES[name][key](value)
        except ValueError:
            raise CodecError(f"Codec parameter {key}={value!r} in {spec!r} is not a number.") \
                from None
    missing = [k for k in STAGES[name] if k not in values and k != "stochastic"]
    if missing:
        raise CodecError(f"Codec stage {name!r} in {spec!r} needs {', '.join(missing)}, e.g. "
                         f"'{name}:{missing[0]}={'8' if missing[0] == 'bits' else '0.1'}'.")
    stage = Stage(name, **values)
    if stage.fraction is not None and not 0 < stage.fraction <= 1:
        raise CodecError(f"{name}:fraction must lie in (0, 1], got {stage.fraction} in {spec!r}.")
    if stage.bits is not None and not 1 <= stage.bits <= 16:
        raise CodecError(f"quantize:bits must lie in 1..16, got {stage.bits} in {spec!r}.")
    if stage.clip is not None and not (stage.clip > 0 and stage.noise >= 0):
        raise CodecError(f"dp needs clip > 0 and noise >= 0, got clip={stage.clip}, "
                         f"noise={stage.noise} in {spec!r}.")
    return stage


@dataclasses.dataclass(frozen=True)
class Codec:
    """A parsed codec: its stages in order (see the module docstring)."""

    spec: str
    stages: tuple

    def stage(self, name):
        return next((s for s in self.stages if s.name == name), None)

    @property
    def lossless(self):
        return all(s.name in ("identity", "inputs", "factored") for s in self.stages)

    @property
    def changes_values(self):
        """True when the receiver's arrays differ from the sender's (``VALUE_STAGES``)."""
        return any(s.name in VALUE_STAGES for s in self.stages)

    def projected_width(self, num_params):
        """k, the values per sample and class after ``project`` (P without it)."""
        proj = self.stage("project")
        return num_params if proj is None else math.ceil(proj.fraction * num_params)

    # -- sizes ------------------------------------------------------------------------------
    def kept_samples(self, n):
        """How many of n samples a package carries after ``subsample``."""
        sub = self.stage("subsample")
        return n if sub is None or n == 0 else max(1, math.ceil(sub.fraction * n))

    def _values_nbytes(self, count):
        """Bytes of one tensor of ``count`` float32 values after topk and quantize."""
        top, quant = self.stage("topk"), self.stage("quantize")
        kept = count if top is None else math.ceil(top.fraction * count)
        value_bytes = 4 * kept if quant is None else math.ceil(kept * quant.bits / 8) + QUANTIZE_HEADER
        return value_bytes + (4 * kept if top is not None else 0)

    def weights_nbytes(self, shapes):
        """Encoded size of one weight vector of these variable shapes."""
        return sum(self._values_nbytes(math.prod(s)) for s in shapes)

    def package_nbytes(self, num_samples, num_classes, layout):
        """Encoded size of a package of ``num_samples`` samples (before ``subsample``).

        Args:
            num_samples: the sender's samples.
            num_classes: C.
            layout: ``PackageLayout`` of the model (dense blocks and factorable layers).
        """
        n, c = self.kept_samples(num_samples), num_classes
        if self.stage("inputs"):
            if layout.input_bytes is None:
                raise CodecError("codec 'inputs' needs the size of one raw input sample "
                                 "(package_layout(fns, input_bytes=...)).")
            return n * layout.input_bytes + 4 * n  # raw inputs and int32 labels
        if self.stage("project"):
            k = self.projected_width(sum(math.prod(s) for s in layout.shapes))
            return self._values_nbytes(n * c * k) + PROJECT_HEADER + 4 * n * c + 4 * n
        raw = 0
        if self.stage("factored"):
            tensors, raw = layout.factored_tensors(n, c)
        else:
            tensors = layout.dense_tensors(n, c)
        return raw + sum(self._values_nbytes(t) for t in tensors) + 4 * n * c + 4 * n


class PackageLayout(typing.NamedTuple):
    """What a package of this model is made of, for sizes.

    Attributes:
        shapes: every trainable variable's shape (the dense Jacobian blocks).
        factors: per factorable Dense layer ``(kernel, bias, inputs, units, signal)``: the
            indices of its kernel and bias variables (bias -1 if none), its input and output
            widths, and whether its backpropagated signal must be sent (False for a linear
            output layer, whose signal is the identity).
        input_bytes: bytes of one raw input sample as the sender stores it (``inputs``).
    """

    shapes: tuple
    factors: tuple
    input_bytes: int = None

    def dense_tensors(self, n, c):
        return [n * c * math.prod(s) for s in self.shapes]

    def factored_tensors(self, n, c):
        """What ``factored`` sends: ``(value_counts, raw_bytes)``. Per Dense layer its inputs
        ``[n, d]`` and, unless it is a linear output layer, its signal ``[n, C, h]`` (the bias
        block is the signal itself), or its dense blocks where those are smaller; other
        variables dense. The first layer's inputs are the raw samples (``raw_bytes``) when
        ``input_bytes`` is known."""
        tensors, covered, raw = [], set(), 0
        for layer, (kernel, bias, d, h, signal) in enumerate(self.factors):
            dense = [n * c * d * h] + ([n * c * h] if bias >= 0 else [])
            factored = [n * d] + ([n * c * h] if signal else [])
            if sum(factored) > sum(dense):
                tensors += dense
            elif layer == 0 and self.input_bytes is not None and self.input_bytes <= 4 * d:
                raw, tensors = n * self.input_bytes, tensors + factored[1:]
            else:
                tensors += factored
            covered |= {kernel, bias}
        tensors += [n * c * math.prod(s) for i, s in enumerate(self.shapes) if i not in covered]
        return tensors, raw


def package_layout(fns, input_bytes=None):
    """The ``PackageLayout`` of the model behind ``fns`` (factors only for Dense stacks)."""
    factors = []
    if fns.is_dense_stack:
        last = len(fns.dense_specs) - 1
        for l, spec in enumerate(fns.dense_specs):
            d, h = fns.shapes[spec.kernel]
            linear = getattr(spec.activation, "__name__", "") == "linear"
            factors.append((spec.kernel, spec.bias, d, h, not (l == last and linear)))
    return PackageLayout(tuple(tuple(s) for s in fns.shapes), tuple(factors), input_bytes)


def parse(spec):
    """A ``Codec`` from its string (``None`` or ``""``: identity).

    Raises:
        CodecError: an unknown stage, a bad parameter, or stages out of order.
    """
    if isinstance(spec, Codec):
        return spec
    spec = (spec or "identity").strip()
    stages = tuple(_stage(part, spec) for part in spec.split("+"))
    names = [s.name for s in stages if s.name != "identity"]
    if len(set(names)) != len(names) or names != sorted(names, key=ORDER.index):
        raise CodecError(f"Codec stages in {spec!r} must appear at most once each, in the order "
                         f"{' + '.join(ORDER)} (each acts on what the previous one leaves).")
    if "inputs" in names and len(set(names) & {"factored", *VALUE_STAGES}):
        raise CodecError(f"Codec {spec!r}: 'inputs' sends the raw samples; it combines with "
                         "subsample only (the Jacobian stages have nothing left to act on).")
    if "factored" in names and len(set(names) & set(VALUE_STAGES)):
        raise CodecError(f"Codec {spec!r}: {', '.join(VALUE_STAGES)} act on the dense "
                         "Jacobians; use them without 'factored', or 'factored' alone "
                         "(lossless).")
    return Codec(spec, tuple(s for s in stages if s.name != "identity"))


# -- what the receiver gets ----------------------------------------------------------------------
class Sketch(typing.NamedTuple):
    """A count sketch S (k x P): parameter p goes to bucket ``bucket[p]`` with ``sign[p]``.

    ``order`` lists the parameters bucket by bucket and ``starts`` where each bucket begins in
    it (``make_sketch`` fills both), so ``project`` is one gather and one segmented sum.
    """

    bucket: np.ndarray  # int32 [P], every bucket of 0..k-1 holds floor or ceil of P/k
    sign: np.ndarray  # float32 [P], +-1
    order: np.ndarray  # int [P]
    starts: np.ndarray  # int [k]

    def project(self, flat):
        """``[..., P]`` -> ``[..., k]``: flat @ S^T."""
        return np.add.reduceat(flat[..., self.order] * self.sign[self.order], self.starts,
                               axis=-1)


def make_sketch(codec, num_params, seed):
    """The round's ``Sketch`` for ``project`` (None without it), the same at both ends."""
    k = codec.projected_width(num_params)
    if codec.stage("project") is None:
        return None
    rng = np.random.default_rng([seed, 0x5ce7c4])
    bucket = (rng.permutation(num_params) % k).astype(np.int32)  # balanced: none empty
    order = np.argsort(bucket, kind="stable")
    return Sketch(bucket, rng.choice(np.array([-1.0, 1.0], np.float32), num_params), order,
                  np.flatnonzero(np.diff(bucket[order], prepend=-1)))


class Decoded(typing.NamedTuple):
    """A package's arrays as its receiver decodes them."""

    jacobians: list  # per variable [n, C, *shape], or one [n, C, k] after ``project``
    logits: np.ndarray  # [n, C]


def encode_package_values(codec, jacobians, logits, rng, sketch=None, sent=True):
    """A package's Jacobians and logits as its receiver decodes them.

    Args:
        codec: the ``Codec``.
        jacobians: per variable ``[n, C, *shape]``.
        logits: ``[n, C]``.
        rng: NumPy generator for the codec's randomness (noise, stochastic rounding).
        sketch: the round's ``Sketch`` when the codec projects.
        sent: False for the receiver's own Jacobians: only projected (never sent).

    Returns:
        ``Decoded``.
    """
    n = len(logits)
    jacobians = [np.asarray(j, np.float32) for j in jacobians]
    logits = np.asarray(logits, np.float32)
    if sketch is not None:
        flat = np.concatenate([j.reshape(n, logits.shape[1], -1) for j in jacobians], -1)
        jacobians = [sketch.project(flat).astype(np.float32)]
    if not sent:
        return Decoded(jacobians, logits)
    dp = codec.stage("dp")
    if dp is not None and n:
        norms = np.sqrt(sum(np.sum(np.square(a.reshape(n, -1), dtype=np.float64), axis=1)
                            for a in (*jacobians, logits)))
        scale = np.minimum(1.0, dp.clip / np.maximum(norms, 1e-30)).astype(np.float32)

        def noisy(a):
            clipped = a * scale.reshape((n,) + (1,) * (a.ndim - 1))
            return clipped + rng.standard_normal(a.shape, np.float32) * np.float32(
                dp.noise * dp.clip)

        jacobians, logits = [noisy(j) for j in jacobians], noisy(logits)
    return Decoded([encode_values(codec, j, rng) for j in jacobians], logits)


def encode_values(codec, array, rng):
    """``array`` as the receiver decodes it after ``topk`` and ``quantize`` (float32)."""
    out = np.asarray(array, np.float32).copy()
    flat = out.reshape(-1)
    top, quant = codec.stage("topk"), codec.stage("quantize")
    keep = np.arange(flat.size)
    if top is not None and flat.size:
        k = math.ceil(top.fraction * flat.size)
        keep = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        dropped = np.ones(flat.size, bool)
        dropped[keep] = False
        flat[dropped] = 0.0
    if quant is not None and keep.size:
        values = flat[keep]
        low, high = float(values.min()), float(values.max())
        levels = 2 ** quant.bits - 1
        scale = (high - low) / levels if high > low else 1.0
        position = (values - low) / scale
        if quant.stochastic:
            position = np.floor(position + rng.random(position.shape))
        else:
            position = np.round(position)
        flat[keep] = (low + np.clip(position, 0, levels) * scale).astype(np.float32)
    return out
