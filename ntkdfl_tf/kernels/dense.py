"""The traced NTK of a Dense stack in closed form: never materialises the Jacobian.

For layer l with input activations A_l (bias: +1) and backpropagated output sensitivities
G_l[n, c, :] = d f_c(x_n) / d z_l, the layer's share of the traced kernel is
(A_l A_l^T + 1) * (1/C) sum_c G_l^c G_l^c^T. The last layer of a linear-output network has
G = identity, giving (A A^T + 1); the layer below it gives D diag(s) D^T with D the activation
derivative and s_r = sum_c W[r, c]^2, which is the two-layer closed form of NTK-DFL.md.
"""

import typing

import tensorflow as tf


class DenseNTK:
    """Structured traced NTK for models that ``functional.dense_stack`` accepts."""

    def __init__(self, fns):
        if not fns.is_dense_stack:
            raise ValueError("kernel='dense' needs a model of Dense layers after weightless "
                             "preprocessing; use kernel='explicit' for this model.")
        self.fns = fns
        self._call = tf.function(self.in_graph, reduce_retracing=True)

    def __call__(self, weights, feats, mask, input_gram=None):
        """H ``[B, N, N]``; ``input_gram``: ``input_gram(feats)`` if the caller has it already
        (the first layer's share of H needs it)."""
        return self._call(weights, feats, tf.cast(mask, tf.float32), input_gram)

    def in_graph(self, weights, feats, mask, input_gram=None):
        """``__call__``'s H as ops of the caller's graph (no ``tf.function`` of its own), for a
        compiled caller that forms H itself; ``mask`` float32."""
        h = 0.0
        terms = layer_terms(self.fns, weights, feats)
        for i, (a, beta, factor) in enumerate(terms):
            first = i == len(terms) - 1  # layer_terms runs from the last layer to the first
            gram = (input_gram if first and input_gram is not None else
                    tf.matmul(a, a, transpose_b=True)) + beta
            h = h + (gram if factor is None else gram * tf.matmul(factor, factor, transpose_b=True))
        return h * mask[:, :, None] * mask[:, None, :]


def input_gram(feats):
    """X X^T ``[B, N, N]`` of a Dense stack's inputs ``[B, N, d]``: the first layer's share of H
    and what ``candidate_logits`` evaluates candidates with."""
    return tf.matmul(feats, feats, transpose_b=True)


class LinearisedPass(typing.NamedTuple):
    """A Dense stack's forward pass at the linearisation point, kept for its VJPs.

    Attributes:
        logits: ``[B, N, C]``.
        inputs: per layer its input activations ``[B, N, d_l]``.
        derivatives: per layer the activation's derivative at its pre-activation ``[B, N, h_l]``.
        first_z: the first layer's pre-activation X W + b ``[B, N, h_1]``.
    """

    logits: tf.Tensor
    inputs: list
    derivatives: list
    first_z: tf.Tensor


def linearised_pass(fns, weights, feats):
    """``LinearisedPass`` of ``weights`` on ``feats``."""
    first_z = first_pre_activation(fns, weights, feats)
    return LinearisedPass(*fns.dense_forward(weights, feats, with_derivatives=True,
                                             first_pre_activation=first_z), first_z)


def vjp_signals(fns, weights, lin, cotangent):
    """The VJP of the logits at ``weights`` (``lin`` its pass) with ``cotangent`` ``[B, N, C]``,
    as per-layer signals s_l ``[B, N, h_l]``: the gradient of layer l's kernel is A_l^T s_l and
    of its bias sum_n s_l (A_l its inputs)."""
    specs = fns.dense_specs
    signal = cotangent * lin.derivatives[-1]
    out = [signal]
    for l in reversed(range(len(specs) - 1)):
        signal = (tf.matmul(signal, weights[specs[l + 1].kernel], transpose_b=True) *
                  lin.derivatives[l])
        out.insert(0, signal)
    return out


def apply_signals(fns, weights, lin, signals, from_layer=0):
    """``weights`` minus the VJP whose signals are ``signals`` (``vjp_signals``); layers below
    ``from_layer`` are left as they are."""
    out = list(weights)
    for l in range(from_layer, len(fns.dense_specs)):
        spec, s = fns.dense_specs[l], signals[l]
        out[spec.kernel] = weights[spec.kernel] - tf.matmul(lin.inputs[l], s, transpose_a=True)
        if spec.bias >= 0:
            out[spec.bias] = weights[spec.bias] - tf.reduce_sum(s, axis=1)
    return out


def first_pre_activation(fns, weights, feats):
    """The first layer's pre-activation X W + b ``[B, N, h_1]``."""
    spec = fns.dense_specs[0]
    z = tf.matmul(feats, weights[spec.kernel])
    return z + weights[spec.bias][:, None, :] if spec.bias >= 0 else z


def candidate_logits(fns, weights, first_z, gram, lin, signals):
    """The logits of ``apply_signals(fns, weights, lin, signals)`` on the linearised pass's own
    samples, without the first layer's large product: with X those samples and s its signal,
    X (W - X^T s) + b - sum_n s = first_z - (X X^T) s - sum_n s, an N x N product with the
    input gram instead of an N x d one (``first_z`` = X W + b at ``weights``)."""
    spec = fns.dense_specs[0]
    s = signals[0]
    z = first_z - tf.matmul(gram, s)
    if spec.bias >= 0:
        z = z - tf.reduce_sum(s, axis=1, keepdims=True)
    later = apply_signals(fns, weights, lin, signals, from_layer=1)
    return fns.dense_forward(later, lin.inputs[0], first_pre_activation=z)[0]


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
