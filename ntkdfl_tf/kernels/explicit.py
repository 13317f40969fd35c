"""The traced NTK from explicit per-sample Jacobians (any Keras model), in bounded-memory chunks."""

import logging

import tensorflow as tf


class _PforFallbackFilter(logging.Filter):
    """Drops pfor's "Conv2DBackpropFilter uses a while_loop" warning, logged at every trace.

    The fallback is expected for convolutions and not actionable by the user.
    """

    def filter(self, record):
        return "uses a while_loop" not in record.getMessage()


tf.get_logger().addFilter(_PforFallbackFilter())


def jacobian(fns, weights, x):
    """Per-sample Jacobians of one client's logits with respect to its weights.

    A Dense stack's are formed from its factors (``dense.dense_jacobian``), any other model's
    by ``tape_jacobian``.

    Args:
        fns: ModelFunctions.
        weights: list of ``[*shape]`` tensors (one client, no client axis).
        x: features ``[n, ...]``.

    Returns:
        List aligned with ``weights`` of ``[n, C, *shape]`` tensors.
    """
    if fns.is_dense_stack:  # outer products of the layers' factors: no per-sample tape
        from ntkdfl_tf.kernels.dense import dense_jacobian

        return dense_jacobian(fns, weights, x)
    return tape_jacobian(fns, weights, x)


def tape_jacobian(fns, weights, x):
    """``jacobian`` for any Keras model through ``tf.GradientTape``.

    Each sample's ``[C, *shape]`` Jacobian is taken through a one-sample forward pass and the
    samples are vectorised with ``tf.vectorized_map``. Differentiating a whole chunk's logits at
    once (``tape.jacobian`` of ``[n, C]``) would also differentiate every logit with respect to
    every other sample, at a cost growing with n^2.
    """
    def one_sample(xi):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            logits = fns.forward([w[None] for w in weights], xi[None, None])[0, 0]
        return tape.jacobian(logits, weights)

    return tf.vectorized_map(one_sample, x)


def flat_jacobian(fns, weights, x):
    """``jacobian`` with the variables flattened and concatenated: ``[n, C, P]``."""
    jac = jacobian(fns, weights, x)
    n, c = tf.shape(jac[0])[0], jac[0].shape[1]  # n is dynamic: the last chunk is shorter
    return tf.concat([tf.reshape(j, [n, c, -1]) for j in jac], axis=-1)


def traced_kernel(jac_a, jac_b):
    """A block (1/C) sum_c J_a,c J_b,c^T of H from per-sample Jacobians ``[..., n, C, P]`` and
    ``[..., m, C, P]`` (leading axes batched)."""
    return tf.einsum("...acp,...bcp->...ab", jac_a, jac_b) / jac_a.shape[-2]


class ExplicitNTK:
    """H = (1/C) sum_c J_c J_c^T from materialised Jacobians, ``chunk`` samples at a time.

    Peak memory holds two chunks' Jacobians (2 x chunk x C x P floats, 1.8 GB for the CNN at the
    default 128), whatever the neighbourhood size; the price is recomputing the column chunk's
    Jacobian per row chunk.
    """

    def __init__(self, fns, chunk=128):
        self.fns, self.chunk = fns, int(chunk)
        self._jac = tf.function(lambda w, x: flat_jacobian(fns, w, x), reduce_retracing=True)

    def __call__(self, weights, feats, mask):
        batch, n = feats.shape[0], feats.shape[1]
        starts = list(range(0, n, self.chunk))
        kernels = []
        for b in range(batch):
            w = [v[b] for v in weights]
            blocks = {}
            for i, si in enumerate(starts):
                ji = self._jac(w, feats[b, si:si + self.chunk])
                for sj in starts[i:]:
                    jj = ji if sj == si else self._jac(w, feats[b, sj:sj + self.chunk])
                    blocks[si, sj] = traced_kernel(ji, jj)
            rows = [tf.concat([blocks[si, sj] if sj >= si else tf.transpose(blocks[sj, si])
                               for sj in starts], axis=1) for si in starts]
            kernels.append(tf.concat(rows, axis=0))
        m = tf.cast(mask, tf.float32)
        return tf.stack(kernels) * m[:, :, None] * m[:, None, :]
