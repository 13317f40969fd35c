"""The traced NTK of a Dense stack as an operator v -> H v: memory linear in N, never N x N.

DenseNTK writes H as a sum over layers of (A_l A_l^T + beta_l) * F_l F_l^T, with A_l the layer's
inputs, beta_l = 1 if it has a bias, and F_l a factor of the traced sensitivity gram
(1/C) sum_c G^c G^c^T: ones for a linear output layer, D * sqrt(s) for the layer below it,
G flattened over (class, unit) / sqrt(C) otherwise. Each term applies to v [N, K] as

    ((A A^T + beta) * F F^T) v = rowsum_r F[:, r] * (A (A^T (F[:, r] v)) + beta (F[:, r]^T v))

two products with A per (unit, column) pair: about 4 N d q K flops per layer (d inputs, q factor
columns) against N^2 K for a stored H. For the 784-100-10 MLP that is ~130x more work per
product at N = 1,200, so this pays only when H does not fit in memory (N of tens of thousands:
H is 4 N^2 bytes, 10 GB at N = 50,000, where this needs ~N x 100 x K floats).
"""

import tensorflow as tf

from ntkdfl_tf.kernels import dense


class MatrixFreeNTK:
    """Matrix-free traced NTK for models that ``functional.dense_stack`` accepts."""

    def __init__(self, fns):
        if not fns.is_dense_stack:
            raise ValueError("kernel='matrix_free' needs a model of Dense layers after weightless "
                             "preprocessing; use kernel='explicit' for this model.")
        self.fns = fns

    def operator(self, weights, feats, mask):
        """Returns ``apply(v [B, N, K]) -> H v`` for every client's own H (zero at padding)."""
        batch, n = tf.shape(feats)[0], tf.shape(feats)[1]
        mask = tf.cast(mask, tf.float32)[..., None]
        terms = dense.layer_terms(self.fns, weights, feats)

        def apply(v):
            v = v * mask
            out = tf.zeros_like(v)
            for a, beta, f in terms:
                if f is None:  # (A A^T + beta) v
                    out += tf.matmul(a, tf.matmul(a, v, transpose_a=True))
                    out += beta * tf.reduce_sum(v, axis=1, keepdims=True)
                    continue
                q, k = tf.shape(f)[2], tf.shape(v)[2]
                fv = tf.reshape(f[..., None] * v[:, :, None, :], [batch, n, q * k])
                back = tf.matmul(a, tf.matmul(a, fv, transpose_a=True))
                if beta:
                    back += beta * tf.reduce_sum(fv, axis=1, keepdims=True)
                out += tf.einsum("bnq,bnqk->bnk", f, tf.reshape(back, [batch, n, q, k]))
            return out * mask

        return apply

    def __call__(self, weights, feats, mask):
        """H [B, N, N] materialised by applying the operator to the identity (small N only)."""
        n = tf.shape(feats)[1]
        eye = tf.eye(n, batch_shape=[tf.shape(feats)[0]])
        return self.operator(weights, feats, mask)(eye)
