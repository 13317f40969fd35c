"""DisPFL's per-client work: masked local SGD of many clients in one ``tf.function``, and the
gradients that rank mask regrowth."""

import tensorflow as tf

from ntkdfl_tf.algorithms import dispfl
from ntkdfl_tf.algorithms.local_sgd import TrainResult
from ntkdfl_tf.algorithms.local_sgd_worker import LocalSGDWorker


class DisPFLWorker(LocalSGDWorker):
    """Runs ``MaskedTrainCall``s (local epochs under each client's mask) and ``EvolveCall``s
    (prune and regrow each client's mask)."""

    def __init__(self, algorithm, fns):
        super().__init__(algorithm, fns)
        self._train = tf.function(self._train_masked_group, reduce_retracing=True)
        self._batch_gradients = tf.function(self._gradients_at, reduce_retracing=True)

    def run(self, context, call):
        """One group's masked training (``TrainResult``) or mask evolution (``EvolveResult``)."""
        rows = self._rows(call.members)
        feats, labels, mask = (tf.gather(t, rows) for t in self._data)
        weights = [tf.constant(w) for w in call.weights]
        if isinstance(call, dispfl.EvolveCall):
            grads = self._batch_gradients(weights, feats, labels, mask, tf.constant(call.batch))
            return dispfl.EvolveResult(dispfl.evolve_masks(
                call.masks, call.weights, [g.numpy() for g in grads], context.drop_fraction))
        keep = [tf.constant(m, tf.float32) for m in call.masks]
        w, loss = self._train(weights, keep, feats, labels, mask, tf.constant(call.steps),
                              tf.constant(context.learning_rate, tf.float32))
        return TrainResult([v.numpy() for v in w], loss.numpy())

    def _gradients_at(self, w, feats, labels, mask, batch):
        """Every client's dense gradient on its batch ``[B, batch]`` (mask regrowth's score)."""
        x, y, mk = (tf.gather(t, batch, batch_dims=1) for t in (feats, labels, mask))
        return self._gradients(w, x, y, mk)[0]

    def _train_masked_group(self, w, keep, feats, labels, mask, steps, lr):
        """All local steps of a group under its masks ``keep`` (float 0/1 per variable).

        Each step as the reference's: the gradient clipped to ``clip_norm`` (its global norm
        over all coordinates), weight decay added, an SGD step, then the weights re-masked, so
        masked coordinates stay exactly zero. An empty batch takes no step.
        """
        clip, decay = self.algorithm.clip_norm, self.algorithm.weight_decay

        def per_client(v, like):
            return tf.reshape(v, [-1] + [1] * (like.shape.rank - 1))

        def step(i, w, loss_sum, loss_count):
            idx = steps[i]
            x, y, mk = (tf.gather(t, idx, batch_dims=1) for t in (feats, labels, mask))
            grads, loss = self._gradients(w, x, y, mk)
            if clip is not None:  # torch.nn.utils.clip_grad_norm_ per client
                norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g),
                                                       axis=list(range(1, g.shape.rank)))
                                         for g in grads]))
                scale = tf.minimum(1.0, clip / (norm + 1e-6))
                grads = [g * per_client(scale, g) for g in grads]
            if decay:
                grads = [g + decay * v for g, v in zip(grads, w)]
            has = tf.cast(tf.reduce_sum(mk, -1) > 0, tf.float32)  # [B]: batch not empty
            w = [(v - lr * per_client(has, v) * g) * m for v, g, m in zip(w, grads, keep)]
            return i + 1, w, loss_sum + loss * has, loss_count + has

        zeros = tf.zeros(tf.shape(mask)[:1])
        w = [v * m for v, m in zip(w, keep)]
        _, w, loss_sum, count = tf.while_loop(
            lambda i, *_: i < tf.shape(steps)[0], step, (0, w, zeros, zeros))
        return w, loss_sum / tf.maximum(count, 1.0)
