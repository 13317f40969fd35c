"""Codecs: how a message is encoded on the wire, chosen by name with parameters.

A codec string names stages applied in order, joined by ``+``, each ``name`` or
``name:key=value,key=value``: ``identity`` (the default), ``inputs``, ``factored``,
``quantize:bits=8``
(``stochastic=1`` for stochastic rounding), ``topk:fraction=0.1``, ``subsample:fraction=0.25``.
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
  and is not sent. Other layers are sent dense. The receiver's arrays are unchanged.
- ``topk``: per tensor, only the ``ceil(fraction * size)`` entries largest in magnitude are
  sent, with their int32 indices; the rest arrive as zero.
- ``quantize``: per tensor, values are rounded to ``2**bits`` uniform levels between the
  tensor's minimum and maximum (two float32 header values); stochastic rounding is unbiased.

Logits (float32) and labels (int32) are sent as they are. For weight messages, ``topk`` and
``quantize`` apply per tensor in the same way; ``factored`` and ``subsample`` do not apply.
``nbytes`` is the encoded payload: values, indices, scales and headers.
"""

import dataclasses
import math
import typing

import numpy as np

QUANTIZE_HEADER = 8  # float32 minimum and scale per quantised tensor


@dataclasses.dataclass(frozen=True)
class Stage:
    """One named step of a codec with its parameters."""

    name: str
    fraction: float = None
    bits: int = None
    stochastic: bool = False


STAGES = {
    "identity": {},
    "inputs": {},
    "factored": {},
    "quantize": {"bits": int, "stochastic": lambda v: bool(int(v))},
    "topk": {"fraction": float},
    "subsample": {"fraction": float},
}
ORDER = ("subsample", "inputs", "factored", "topk", "quantize")  # each acts on what is left


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
        """True when the receiver's arrays differ from the sender's (topk or quantize)."""
        return any(s.name in ("topk", "quantize") for s in self.stages)

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
        tensors = layout.factored_tensors(n, c) if self.stage("factored") else \
            layout.dense_tensors(n, c)
        return sum(self._values_nbytes(t) for t in tensors) + 4 * n * c + 4 * n


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
        """Value counts of the tensors sent: per Dense layer its inputs ``[n, d]`` and, unless
        it is a linear output layer, its signal ``[n, C, h]`` (the bias block is the signal
        itself), or its dense blocks where those are smaller; other variables dense."""
        tensors, covered = [], set()
        for kernel, bias, d, h, signal in self.factors:
            dense = [n * c * d * h] + ([n * c * h] if bias >= 0 else [])
            factored = [n * d] + ([n * c * h] if signal else [])
            tensors += factored if sum(factored) <= sum(dense) else dense
            covered |= {kernel, bias}
        tensors += [n * c * math.prod(s) for i, s in enumerate(self.shapes) if i not in covered]
        return tensors


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
    if "inputs" in names and len(set(names) & {"factored", "topk", "quantize"}):
        raise CodecError(f"Codec {spec!r}: 'inputs' sends the raw samples; it combines with "
                         "subsample only (the Jacobian stages have nothing left to act on).")
    return Codec(spec, tuple(s for s in stages if s.name != "identity"))


# -- what the receiver gets ----------------------------------------------------------------------
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
