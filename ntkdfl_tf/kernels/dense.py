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


def layer_terms(fns, weights, feats):
    """Per layer ``(A, beta, F)``: its share of H is (A A^T + beta) * F F^T (F None: ones).

    A: the layer's inputs [B, N, d]; beta: 1 with a bias, else 0; F F^T is the traced sensitivity
    gram (1/C) sum_c G^c G^c^T: None for a linear output layer, D * sqrt(s / C) for the layer
    below it, the flattened G / sqrt(C) otherwise.
    """
    c = fns.num_classes
    _, inputs, derivs = fns.dense_forward(weights, feats, with_derivatives=True)
    specs = fns.dense_specs
    batch, n = tf.shape(feats)[0], tf.shape(feats)[1]
    last = len(specs) - 1
    linear_output = _is_identity(specs[last].activation)
    g = tf.linalg.diag(derivs[last])  # G_L = diag(sigma'_L): [B, N, C, C]
    terms = []
    for l in reversed(range(len(specs))):
        if l < last:  # G_l = (G_{l+1} W_{l+1}^T) * sigma'_l
            g = tf.matmul(g, weights[specs[l + 1].kernel][:, None], transpose_b=True)
            g = g * derivs[l][:, :, None, :]
        if l == last and linear_output:
            factor = None
        elif l == last - 1 and linear_output:  # D diag(s) D^T / C, s_r = sum_c W[r, c]^2
            s = tf.reduce_sum(tf.square(weights[specs[last].kernel]), axis=-1)
            factor = derivs[l] * tf.sqrt(s / c)[:, None, :]
        else:
            factor = tf.reshape(g, [batch, n, -1]) / tf.sqrt(float(c))
        terms.append((inputs[l], 1.0 if specs[l].bias >= 0 else 0.0, factor))
    return terms


def _is_identity(activation):
    return getattr(activation, "__name__", "") == "linear"
