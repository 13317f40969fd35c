"""The DFedAvg family's per-client work: many clients' local SGD in one ``tf.function``.

Each client's loss is the mean over the real samples of its batch; the clients' losses are
summed, so one gradient call yields every client's gradient.
"""

import tensorflow as tf

from ntkdfl_tf.algorithms import base
from ntkdfl_tf.kernels import losses
from ntkdfl_tf.algorithms.local_sgd import TrainResult


class LocalSGDWorker(base.Worker):
    """Runs ``TrainCall``s: local epochs of a group of clients on their own data."""

    def __init__(self, algorithm, fns):
        super().__init__(algorithm, fns)
        self._train = tf.function(self._train_group, reduce_retracing=True)
        self._data, self._rows = None, None

    def bind(self, clients):
        # index n_max addresses an appended all-zero (masked) row: the last batch's padding
        self._data = [base.append_zero_row(t) for t in
                      (clients.features, clients.labels, clients.mask)]
        self._rows = clients.rows

    def run(self, context, call):
        """One group's local epochs; returns a ``TrainResult``."""
        rows = self._rows(call.members)
        feats, labels, mask = (tf.gather(t, rows) for t in self._data)
        w, loss = self._train([tf.constant(w) for w in call.weights], feats, labels, mask,
                              tf.constant(call.steps),
                              tf.constant(context.learning_rate, tf.float32))
        return TrainResult([v.numpy() for v in w], loss.numpy())

    def _gradients(self, w, x, y, mask):
        with tf.GradientTape() as tape:
            tape.watch(w)
            per_client = losses.CrossEntropy().mean(self.fns.forward(w, x), y, mask)
            total = tf.reduce_sum(per_client)
        return tape.gradient(total, w), per_client

    def _train_group(self, w, feats, labels, mask, steps, lr):
        """All local steps of a group of clients; returns weights and mean batch loss [B]."""
        momentum, sam_rho = self.algorithm.momentum, self.algorithm.sam_rho

        def per_client(v, like):
            return tf.reshape(v, [-1] + [1] * (like.shape.rank - 1))

        def step(i, w, m, loss_sum, loss_count):
            idx = steps[i]
            x = tf.gather(feats, idx, batch_dims=1)
            y = tf.gather(labels, idx, batch_dims=1)
            mk = tf.gather(mask, idx, batch_dims=1)
            grads, loss = self._gradients(w, x, y, mk)
            if sam_rho:  # ascend to the worst case within rho, take the gradient there
                norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g),
                                                       axis=list(range(1, g.shape.rank)))
                                         for g in grads]))
                scale = sam_rho / (norm + 1e-12)
                adv = [v + g * per_client(scale, g) for v, g in zip(w, grads)]  # empty: no ascent
                grads, _ = self._gradients(adv, x, y, mk)
            has = tf.cast(tf.reduce_sum(mk, -1) > 0, tf.float32)  # [B]: batch not empty
            if momentum:  # an empty batch leaves the buffer as it is
                m = [mv + per_client(has, mv) * ((momentum - 1.0) * mv + g)
                     for mv, g in zip(m, grads)]
                grads = m
            w = [v - lr * per_client(has, v) * g for v, g in zip(w, grads)]
            return i + 1, w, m, loss_sum + loss * has, loss_count + has

        zeros = tf.zeros(tf.shape(mask)[:1])
        _, w, _, loss_sum, count = tf.while_loop(
            lambda i, *_: i < tf.shape(steps)[0], step,
            (0, w, [tf.zeros_like(v) for v in w], zeros, zeros))
        return w, loss_sum / tf.maximum(count, 1.0)
