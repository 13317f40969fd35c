"""The traced NTK of a Dense stack in closed form: never materialises the Jacobian.

For layer l with input activations A_l (bias: +1) and backpropagated output sensitivities
G_l[n, c, :] = d f_c(x_n) / d z_l, the layer's share of the traced kernel is
(A_l A_l^T + 1) * (1/C) sum_c G_l^c G_l^c^T. The last layer of a linear-output network has
G = identity, giving (A A^T + 1); the layer below it gives D diag(s) D^T with D the activation
derivative and s_r = sum_c W[r, c]^2, which is the two-layer closed form of NTK-DFL.md.
"""

import tensorflow as tf


class DenseNTK:
    """Structured traced NTK for models that ``functional.dense_stack`` accepts."""

    def __init__(self, fns):
        if not fns.is_dense_stack:
            raise ValueError("kernel='dense' needs a model of Dense layers after weightless "
                             "preprocessing; use kernel='explicit' for this model.")
        self.fns = fns
        self._call = tf.function(self._kernel, reduce_retracing=True)

    def __call__(self, weights, feats, mask):
        return self._call(weights, feats, tf.cast(mask, tf.float32))

    def _kernel(self, weights, feats, mask):
        h = 0.0
        for a, beta, factor in layer_terms(self.fns, weights, feats):
            gram = tf.matmul(a, a, transpose_b=True) + beta
            h = h + (gram if factor is None else gram * tf.matmul(factor, factor, transpose_b=True))
        return h * mask[:, :, None] * mask[:, None, :]


def signals(fns, weights, feats):
    """Per layer its inputs ``[B, N, d_l]`` and backpropagated signals ``[B, N, C, h_l]``.

    G_l[n, c, :] = d f_c(x_n) / d z_l: G_L = diag(sigma'_L), G_l = (G_{l+1} W_{l+1}^T) * sigma'_l.
    """
    _, inputs, derivs = fns.dense_forward(weights, feats, with_derivatives=True)
    specs = fns.dense_specs
    g = [tf.linalg.diag(derivs[-1])]
    for l in reversed(range(len(specs) - 1)):
        g.insert(0, tf.matmul(g[0], weights[specs[l + 1].kernel][:, None], transpose_b=True)
                 * derivs[l][:, :, None, :])
    return inputs, g, derivs


def dense_jacobian(fns, weights, x):
    """``kernels.jacobian`` for a Dense stack from its factors: the W_l block is the outer
    product of the layer's input and its signal, the bias block the signal itself.

    Args:
        fns: ModelFunctions of a Dense stack.
        weights: list of ``[*shape]`` tensors (one client).
        x: features ``[n, d]``.

    Returns:
        List aligned with ``weights`` of ``[n, C, *shape]`` tensors.
    """
    inputs, g, _ = signals(fns, [w[None] for w in weights], x[None])
    out = [None] * len(weights)
    for spec, a, gl in zip(fns.dense_specs, inputs, g):
        out[spec.kernel] = a[0][:, None, :, None] * gl[0][:, :, None, :]  # far faster than an einsum here
        if spec.bias >= 0:
            out[spec.bias] = gl[0]
    return out


def layer_terms(fns, weights, feats):
    """Per layer ``(A, beta, F)``: its share of H is (A A^T + beta) * F F^T (F None: ones).

    A: the layer's inputs [B, N, d]; beta: 1 with a bias, else 0; F F^T is the traced sensitivity
    gram (1/C) sum_c G^c G^c^T: None for a linear output layer, D * sqrt(s / C) for the layer
    below it, the flattened G / sqrt(C) otherwise.
    """
    c = fns.num_classes
    specs = fns.dense_specs
    last = len(specs) - 1
    linear_output = _is_identity(specs[last].activation)
    inputs, g, derivs = signals(fns, weights, feats)
    batch, n = tf.shape(feats)[0], tf.shape(feats)[1]
    terms = []
    for l in reversed(range(len(specs))):
        if l == last and linear_output:
            factor = None
        elif l == last - 1 and linear_output:  # D diag(s) D^T / C, s_r = sum_c W[r, c]^2
            s = tf.reduce_sum(tf.square(weights[specs[last].kernel]), axis=-1)
            factor = derivs[l] * tf.sqrt(s / c)[:, None, :]
        else:
            factor = tf.reshape(g[l], [batch, n, -1]) / tf.sqrt(float(c))
        terms.append((inputs[l], 1.0 if specs[l].bias >= 0 else 0.0, factor))
    return terms


def _is_identity(activation):
    return getattr(activation, "__name__", "") == "linear"
