"""The losses NTK-DFL evolves under: one object serves the flow and the choice of tau.

A loss gives the flow's residual r(f) (df/dt = -(1/N) H r(f)), the residual's Jacobian applied
to a vector (the flow's stiffness), and the mean loss over a client's real samples (the flow's
monotonicity check and the candidates' real loss).
"""

import tensorflow as tf


class CrossEntropy:
    """Softmax cross-entropy: r = softmax(f) - Y. The flow has no closed form (Euler)."""

    name = "cross_entropy"
    closed_form = False

    def residual(self, f, y):
        return tf.nn.softmax(f) - y

    def residual_jvp(self, f, v):
        """S(f) v per sample, S the softmax's Jacobian (PSD, eigenvalues <= 1/2)."""
        p = tf.nn.softmax(f)
        return p * v - p * tf.reduce_sum(p * v, -1, keepdims=True)

    def mean(self, logits, labels, mask):
        """Mean loss over real samples, per client: ``[..., B, N, C] -> [..., B]``."""
        per_sample = tf.nn.softmax_cross_entropy_with_logits(labels, logits) * mask
        return tf.reduce_sum(per_sample, -1) / _count(mask)


class SquaredError:
    """Squared error sum_c (f - y)^2 / (2C): r = (f - Y) / C. The flow has a closed form."""

    name = "mse"
    closed_form = True

    def residual(self, f, y):
        return (f - y) / tf.cast(tf.shape(y)[-1], f.dtype)

    def residual_jvp(self, f, v):
        return v / tf.cast(tf.shape(v)[-1], v.dtype)

    def mean(self, logits, labels, mask):
        c = tf.cast(tf.shape(labels)[-1], logits.dtype)
        err = tf.reduce_sum(tf.square(logits - labels), -1) * mask / (2 * c)
        return tf.reduce_sum(err, -1) / _count(mask)


def _count(mask):
    return tf.maximum(tf.reduce_sum(mask, -1), 1.0)  # a slice may hold no sample of a client


LOSSES = {loss.name: loss for loss in (CrossEntropy(), SquaredError())}


def get(loss):
    """A loss object from its name (``"cross_entropy"``, ``"mse"``) or the object itself.

    Raises:
        ValueError: an unknown name, or an object without the loss interface.
    """
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    if not isinstance(loss, str) and all(hasattr(loss, a) for a in
                                         ("residual", "residual_jvp", "mean", "closed_form")):
        return loss
    raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)} (or pass an "
                     "object with residual, residual_jvp, mean and closed_form).")
