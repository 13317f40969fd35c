"""Local training shared by the DFedAvg family: many clients' SGD in one ``tf.function``.

Every client runs the same number of steps per epoch, ``ceil(n_max / batch_size)``; a client's
batches draw from a permutation that puts its real samples first, so its batches past its own
data are empty and are skipped (no step, no momentum update). Each client's loss is the mean over the real samples of
its batch; the clients' losses are summed, so one gradient call yields every client's gradient.
"""

import numpy as np
import tensorflow as tf

from ntkdfl_tf import topology
from ntkdfl_tf.algorithms import base


class LocalSGD(base.Algorithm):
    """Local (momentum / sharpness-aware) SGD on each client's own data, then neighbour averaging.

    Args:
        learning_rate: local step size; a float or a callable ``round -> float``.
        batch_size: local minibatch size.
        local_epochs: passes over the client's data per round (ignored if ``local_steps``).
        local_steps: fixed number of local steps per round instead of epochs.
        momentum: heavy-ball momentum (0: plain SGD); buffers start at zero every round, as a
            fresh local optimizer does in the reference.
        sam_rho: sharpness-aware minimisation radius (0: off).
        client_batch: clients trained together in one TensorFlow call.
    """

    name = "local_sgd"

    def __init__(self, learning_rate=0.1, batch_size=25, local_epochs=20, local_steps=None,
                 momentum=0.0, sam_rho=0.0, client_batch=100):
        if not callable(learning_rate):
            base.learning_rate_at(learning_rate, 0)
        for arg, value in (("batch_size", batch_size), ("local_epochs", local_epochs),
                           ("client_batch", client_batch)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
        if local_steps is not None and (not isinstance(local_steps, (int, np.integer))
                                        or local_steps < 1):
            raise ValueError(f"local_steps must be a positive integer or None, got {local_steps!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if sam_rho < 0:
            raise ValueError(f"sam_rho must be >= 0, got {sam_rho!r}.")
        self.learning_rate, self.batch_size = learning_rate, int(batch_size)
        self.local_epochs, self.local_steps = int(local_epochs), local_steps
        self.momentum, self.sam_rho, self.client_batch = float(momentum), float(sam_rho), client_batch
        self._built_for = None

    def init(self, fns, weights, clients):
        if self._built_for is not fns:
            self._fns = fns
            self._train = tf.function(self._train_group, reduce_retracing=True)
            self._built_for = fns
        # index n_max addresses an appended all-zero (masked) row: the last batch's padding
        self._data = [base.append_zero_row(t) for t in
                      (clients.features, clients.labels, clients.mask)]
        self._rows = clients.rows
        return {}

    def call_clients(self, method, call):
        """A group trains on its own clients' data only."""
        if method != "train_group":
            raise ValueError(f"{type(self).__name__} has no per-group method {method!r}.")
        clients = np.unique(call[1])
        return clients, clients

    def _schedule(self, counts, n_max, rng):
        """Per-step sample indices [steps, K, batch]: each epoch a fresh per-client shuffle."""
        k = len(counts)
        per_epoch = -(-n_max // self.batch_size)
        epochs = self.local_epochs if self.local_steps is None else -(-self.local_steps // per_epoch)
        keys = rng.random((epochs, k, n_max)) + (np.arange(n_max)[None, None] >= counts[None, :, None])
        order = np.argsort(keys, axis=-1).astype(np.int32)  # real samples first, shuffled
        pad = per_epoch * self.batch_size - n_max
        order = np.concatenate([order, np.full((epochs, k, pad), n_max, np.int32)], -1)
        steps = order.reshape(epochs, k, per_epoch, self.batch_size).transpose(0, 2, 1, 3)
        steps = steps.reshape(epochs * per_epoch, k, self.batch_size)
        return steps[:self.local_steps] if self.local_steps is not None else steps

    def run_round(self, state, weights, adjacency, round_index, fns, clients, rng, executor):
        lr = base.learning_rate_at(self.learning_rate, round_index)
        n_max = int(clients.features.shape[1])
        steps = self._schedule(clients.counts, n_max, rng)
        k = clients.num_clients
        numpy_weights = [w.numpy() for w in weights]
        groups = base.client_groups(k, min(self.client_batch, k))
        calls = [([w[idx] for w in numpy_weights], idx, steps[:, idx]) for idx, _ in groups]
        results = executor.map("train_group", calls, shared=(lr,))
        losses = np.zeros(k)
        for (idx, real), (_, loss) in zip(groups, results):
            losses[idx[:real]] = loss[:real]
        trained = [tf.constant(np.concatenate([w[v][:real] for (_, real), (w, _) in
                                               zip(groups, results)], 0))
                   for v in range(len(weights))]
        averaged = base.neighbour_average(topology.mixing_matrix(adjacency), trained)
        logs = {"loss": float(losses.mean()), "local_learning_rate": lr,
                "bytes_sent": float(adjacency.sum() * fns.num_params * base.FLOAT_BYTES)}
        return averaged, state, logs

    def train_group(self, lr, weights, idx, steps):
        """One group's local epochs (pure; runs wherever the executor puts it).

        Args:
            lr: step size. weights: list of NumPy ``[B, *shape]``. idx: the clients (int32 [B]).
            steps: per-step sample indices ``[steps, B, batch]``.

        Returns:
            ``(weights, loss)``: NumPy new weights and mean batch loss ``[B]``.
        """
        rows = self._rows(idx)
        feats, labels, mask = (tf.gather(t, rows) for t in self._data)
        w, loss = self._train([tf.constant(w) for w in weights], feats, labels, mask,
                              tf.constant(steps), tf.constant(lr, tf.float32))
        return [v.numpy() for v in w], loss.numpy()

    def _gradients(self, w, x, y, mask):
        with tf.GradientTape() as tape:
            tape.watch(w)
            per_client = base.masked_cross_entropy(self._fns.forward(w, x), y, mask)
            total = tf.reduce_sum(per_client)
        return tape.gradient(total, w), per_client

    def _train_group(self, w, feats, labels, mask, steps, lr):
        """All local steps of a group of clients; returns weights and mean batch loss [B]."""

        def step(i, w, m, loss_sum, loss_count):
            idx = steps[i]
            x = tf.gather(feats, idx, batch_dims=1)
            y = tf.gather(labels, idx, batch_dims=1)
            mk = tf.gather(mask, idx, batch_dims=1)
            grads, loss = self._gradients(w, x, y, mk)
            if self.sam_rho:  # ascend to the worst case within rho, take the gradient there
                norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g), axis=list(range(1, g.shape.rank)))
                                         for g in grads]))
                scale = self.sam_rho / (norm + 1e-12)
                adv = [v + g * tf.reshape(scale, [-1] + [1] * (g.shape.rank - 1))
                       for v, g in zip(w, grads)]  # empty batch: g = 0, no ascent
                grads, _ = self._gradients(adv, x, y, mk)
            has = tf.cast(tf.reduce_sum(mk, -1) > 0, tf.float32)  # [B]: batch not empty

            def per_client(v, like):
                return tf.reshape(v, [-1] + [1] * (like.shape.rank - 1))

            if self.momentum:  # an empty batch leaves the buffer as it is
                m = [mv + per_client(has, mv) * ((self.momentum - 1.0) * mv + g)
                     for mv, g in zip(m, grads)]
                grads = m
            w = [v - lr * per_client(has, v) * g for v, g in zip(w, grads)]
            return i + 1, w, m, loss_sum + loss * has, loss_count + has

        zeros = tf.zeros(tf.shape(mask)[:1])
        _, w, _, loss_sum, count = tf.while_loop(
            lambda i, *_: i < tf.shape(steps)[0], step,
            (0, w, [tf.zeros_like(v) for v in w], zeros, zeros))
        return w, loss_sum / tf.maximum(count, 1.0)
