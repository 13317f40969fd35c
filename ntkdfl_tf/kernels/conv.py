"""The traced NTK of a Conv2D / Dense stack from per-layer factors: never forms the Jacobian.

A weighted layer maps, at each of its L output positions, an input patch p_l (k values, plus a
1 for the bias) to z_l = p_l W (+ b). A Dense layer is the case L = 1 (p = its input row); a
Conv2D layer's patches are its input's receptive fields. With the sensitivities
G_n^c[l, :] = d f_c(x_n) / d z_l (one backward pass per class, vectorised over classes and
samples), the layer's weight gradient for sample n and class c is P_n^T G_n^c ([k, out], bias
row included), so its share of H = (1/C) sum_c J_c J_c^T is

    H_ab = (1/C) sum_c <P_a^T G_a^c, P_b^T G_b^c>
         = (1/C) sum_c sum_{l, m} (P_a P_b^T)[l, m] (G_a^c G_b^c^T)[l, m].

Two exact ways to evaluate it; per layer the one with fewer multiply-adds per sample pair (the
N^2 term, which dominates) is taken:

* "gradient": form each sample's gradient P_n^T G_n (a row of C * k * out values) and take the
  gram of those rows; C * k * out per pair. Chosen for the convolutions of ``nd.models.cnn``
  (e.g. 10 * 289 * 64 for the second one, against L^2 (k + C out) = 121^2 * 929 for the other).
* "positions": contract the position grams, L^2 (k + C * out) per pair. Always chosen for Dense
  layers (L = 1), where it is the closed form of ``dense.py``: (A A^T + 1) * (1/C) G G^T.

Weightless per-sample layers (rescaling, pooling, flattening, activations, ...) between them are
run as they are; their effect reaches H through the patches and the sensitivities.
"""

import dataclasses
import threading

import keras
import numpy as np
import tensorflow as tf

# Weightless layers the kernel runs inside the stack: per-sample maps with no batch statistics or
# state (exact types, so a subclass with its own ``call`` falls back to the explicit kernel).
WEIGHTLESS = (keras.layers.InputLayer, keras.layers.Rescaling, keras.layers.Flatten,
              keras.layers.Reshape, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
              keras.layers.GlobalMaxPooling2D, keras.layers.GlobalAveragePooling2D,
              keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.Activation,
              keras.layers.ReLU)


@dataclasses.dataclass(frozen=True)
class WeightedLayer:
    layer: keras.layers.Layer  # a Conv2D or Dense layer
    kernel: int  # index of its kernel in model.trainable_variables
    bias: int  # index of its bias, or -1


def conv_stack(model):
    """Describes ``model`` as a chain of Conv2D, Dense and weightless per-sample layers.

    Returns:
        The model's layers in order, the weighted ones as ``WeightedLayer``, or None if the
        model is not of that form (then only the explicit kernel applies).
    """
    if not _is_chain(model) or model.non_trainable_variables:
        return None
    paths = [v.path for v in model.trainable_variables]
    stack, used = [], 0
    for layer in model.layers:
        kind = type(layer)
        if kind in WEIGHTLESS and not layer.weights:
            stack.append(layer)
            continue
        if kind is keras.layers.Conv2D:
            if (layer.groups != 1 or layer.data_format != "channels_last"
                    or layer.padding not in ("valid", "same")):
                return None
        elif kind is not keras.layers.Dense:
            return None
        if getattr(layer, "lora_enabled", False) or layer.kernel.path not in paths:
            return None
        bias = paths.index(layer.bias.path) if layer.use_bias else -1
        stack.append(WeightedLayer(layer, paths.index(layer.kernel.path), bias))
        used += 1 + (bias >= 0)
    if used != len(paths) or not any(isinstance(s, WeightedLayer) for s in stack):
        return None
    return stack


def _is_chain(model):
    """True for a Sequential model, or a functional one whose layers feed each other in order."""
    if isinstance(model, keras.Sequential):
        return True
    if not isinstance(model, keras.Model) or len(model.inputs) != 1 or len(model.outputs) != 1:
        return False
    try:
        previous = model.inputs[0]
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if layer.input is not previous:
                return False
            previous = layer.output
        return previous is model.outputs[0]
    except (AttributeError, ValueError):  # a layer used more than once, or not a layer graph
        return False


def form(positions, width, out_width):
    """``"positions"`` or ``"gradient"``: the cheaper exact contraction for a layer with
    ``positions`` output positions, patch ``width`` (bias included) and ``out_width`` = C * out
    sensitivities per position (multiply-adds per sample pair, see the module docstring)."""
    return "positions" if positions ** 2 * (width + out_width) < width * out_width else "gradient"


class ConvNTK:
    """Structured traced NTK for models that ``conv_stack`` accepts (Dense stacks included).

    Per client, the layer factors are computed ``chunk`` samples at a time (a chunk's per-class
    sensitivities are the largest intermediate) and H is assembled block by block (upper
    triangle, mirrored). A "gradient" layer's factor holds C * k * out values per sample, a
    "positions" layer's L * (k + C * out). The factors of the client's N samples are kept while
    they fit in ``factor_budget_mb``; past it, a column chunk's factors are recomputed for every
    row chunk (as ``ExplicitNTK`` does with Jacobians), so memory stays at two chunks' factors.

    Args:
        fns: ModelFunctions.
        chunk: samples per block.
        factor_budget_mb: largest size of one client's stored factors (MiB); stored factors
            are regrouped into tiles of ``tile`` rows for the gram products (a copy: up to
            twice this budget for a moment).
        tile: rows per gram product when the factors are stored (at least ``chunk``).

    Raises:
        ValueError: the model is not a chain of Conv2D, Dense and weightless per-sample layers,
            or ``chunk`` is not positive.
    """

    def __init__(self, fns, chunk=128, factor_budget_mb=1024, tile=512):
        stack = conv_stack(fns.model)
        if stack is None:
            raise ValueError(
                "kernel='conv' needs a chain of Conv2D (channels_last, groups=1), Dense and "
                "weightless per-sample layers (" + ", ".join(t.__name__ for t in WEIGHTLESS[1:])
                + ") with no non-trainable weights; use kernel='explicit' for this model.")
        if int(chunk) < 1:
            raise ValueError(f"chunk must be a positive number of samples, got {chunk}.")
        # fns.features already applied a Dense stack's weightless prefix
        self.stack = stack[len(fns.prefix_layers):]
        self.fns, self.chunk, self.tile = fns, int(chunk), max(int(tile), int(chunk))
        self.factor_budget_bytes = float(factor_budget_mb) * 2 ** 20
        self._compiled = {}  # feature shape -> (factors, block) tf.functions
        self._compiled_lock = threading.Lock()

    def _functions(self, feature_shape):
        """The chunk-factor and block functions, traced once for any number of samples (their
        input signatures leave the sample axis free: no retrace for a shorter last chunk)."""
        with self._compiled_lock:  # calls may run on several threads (LocalExecutor)
            if feature_shape not in self._compiled:
                factors = tf.function(self._chunk_factors, input_signature=[
                    [tf.TensorSpec(shape, tf.float32) for shape in self.fns.shapes],
                    tf.TensorSpec([None, *feature_shape], tf.float32)])
                spec = tf.nest.map_structure(tf.TensorSpec.from_tensor,
                                             factors.get_concrete_function().structured_outputs)
                block = tf.function(self._block_kernel, input_signature=[spec, spec])
                self._compiled[feature_shape] = factors, block
            return self._compiled[feature_shape]

    def __call__(self, weights, feats, mask):
        batch, n = feats.shape[0], feats.shape[1]
        chunk_factors, block = self._functions(tuple(feats.shape[2:]))
        feats = tf.cast(feats, tf.float32)
        kernels = []
        for b in range(batch):  # the client batch is small and static, as in ExplicitNTK
            w = [tf.cast(v[b], tf.float32) for v in weights]
            chunks = [feats[b, s:s + self.chunk] for s in range(0, n, self.chunk)]
            first = chunk_factors(w, chunks[0])
            per_sample_bytes = sum(t.shape[1:].num_elements() * 4 for f in first for t in f)
            stored = None  # past the budget: recompute a column chunk's factors per row chunk
            if per_sample_bytes * n <= self.factor_budget_bytes:
                stored = [first] + [chunk_factors(w, x) for x in chunks[1:]]
                if len(chunks) > 1 and self.chunk < self.tile:
                    # stored factors are regrouped into tiles of `tile` rows: a few large gram
                    # products run much faster than many chunk-sized ones
                    joined = tf.nest.map_structure(lambda *t: tf.concat(t, 0), *stored)
                    stored = [tf.nest.map_structure(lambda t: t[s:s + self.tile], joined)
                              for s in range(0, n, self.tile)]
                    joined = None
                    chunks = [None] * len(stored)
            blocks = {}
            for i in range(len(chunks)):
                row = stored[i] if stored else first if i == 0 else chunk_factors(w, chunks[i])
                for j in range(i, len(chunks)):
                    column = row if j == i else stored[j] if stored else chunk_factors(
                        w, chunks[j])
                    blocks[i, j] = block(row, column)
            first = stored = row = column = None  # one client's factors at a time
            kernels.append(tf.concat(
                [tf.concat([blocks[i, j] if j >= i else tf.transpose(blocks[j, i])
                            for j in range(len(chunks))], axis=1) for i in range(len(chunks))],
                axis=0))
        m = tf.cast(mask, tf.float32)
        return tf.stack(kernels) * m[:, :, None] * m[:, None, :]

    def _chunk_factors(self, weights, x):
        """Per weighted layer, for samples ``x`` [n, ...] of one client: ``(Z,)`` with the
        per-sample gradients Z [n, k * C * out] ("gradient"), or ``(P, S)`` with the patches
        P [n, L, k] and sensitivities S [n, L, C * out] ("positions")."""
        c = self.fns.num_classes
        patches, pre_activations = [], []
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            a = x
            for item in self.stack:
                if not isinstance(item, WeightedLayer):
                    a = item(a)
                    continue
                p, z = _patches_and_output(item, weights, a)
                tape.watch(z)
                patches.append(p)
                pre_activations.append(z)
                a = item.layer.activation(z)
            # each sample's logits depend on its own input only, so the gradient of the batch
            # sum of logit c is every sample's own sensitivity to it
            logit_sums = tf.reduce_sum(a, axis=0)
        sensitivities = tape.jacobian(logit_sums, pre_activations)  # each [C, n, ..., out]
        factors = []
        for p, g in zip(patches, sensitivities):
            n, positions, width = tf.shape(p)[0], p.shape[1], p.shape[2]
            out = g.shape[-1]
            s = tf.reshape(tf.transpose(tf.reshape(g, [c, n, positions, out]), [1, 2, 0, 3]),
                           [n, positions, c * out])
            if form(positions, width, c * out) == "positions":
                factors.append((p, s))
            else:  # P_n^T G_n: [n, k, C * out], flattened
                factors.append((tf.reshape(tf.matmul(p, s, transpose_a=True),
                                           [n, width * c * out]),))
        return factors

    def _block_kernel(self, factors_a, factors_b):
        """The block of H between two chunks from their factors."""
        h = 0.0
        for fa, fb in zip(factors_a, factors_b):
            if len(fa) == 1:
                h += tf.matmul(fa[0], fb[0], transpose_b=True)
            elif fa[0].shape[1] == 1:  # one position (Dense): (A A^T) * (G G^T)
                h += (tf.matmul(fa[0][:, 0], fb[0][:, 0], transpose_b=True)
                      * tf.matmul(fa[1][:, 0], fb[1][:, 0], transpose_b=True))
            else:
                h += tf.reduce_sum(tf.einsum("alk,bmk->ablm", fa[0], fb[0])
                                   * tf.einsum("alk,bmk->ablm", fa[1], fb[1]), axis=[2, 3])
        return h / self.fns.num_classes


def _patches_and_output(item, weights, a):
    """A weighted layer's patches ``[n, L, k(+1)]`` (stop-gradient; 1 appended for a bias)
    and its pre-activation output ``z`` (differentiable in ``a``)."""
    layer, kernel = item.layer, weights[item.kernel]
    if isinstance(layer, keras.layers.Conv2D):
        strides, rates = [1, *layer.strides, 1], [1, *layer.dilation_rate, 1]
        padding = layer.padding.upper()
        z = tf.nn.conv2d(a, kernel, strides, padding, dilations=rates)
        p = tf.image.extract_patches(tf.stop_gradient(a), [1, *layer.kernel_size, 1], strides,
                                     rates, padding)  # last axis ordered (row, col, channel)
    else:  # Dense, acting on the last axis at every leading position
        z = tf.tensordot(a, kernel, 1)
        p = tf.stop_gradient(a)
    if item.bias >= 0:
        z += weights[item.bias]
    positions, width = int(np.prod(p.shape[1:-1])), p.shape[-1]  # static: 1 for a Dense row
    p = tf.reshape(p, [tf.shape(p)[0], positions, width])
    if item.bias >= 0:
        p = tf.concat([p, tf.ones_like(p[..., :1])], axis=-1)
    return p, z
