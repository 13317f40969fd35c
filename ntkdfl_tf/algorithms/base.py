"""The small interface every DFL algorithm implements, and the pieces they share."""

import dataclasses

import numpy as np
import tensorflow as tf

FLOAT_BYTES = 4


@dataclasses.dataclass
class ClientTensors:
    """The clients' training data (all of them, or those in ``ids``), on the device, in the form
    the algorithms consume.

    Attributes:
        features: ``fns.features(x)`` per client, ``[K, n_max, ...]`` float32.
        labels: one-hot labels ``[K, n_max, C]``, zero on padding rows.
        mask: ``[K, n_max]`` float32, 1 for real samples.
        counts: real samples per client, NumPy int64 ``[K]``.
        ids: which clients the rows are (global ids, any order), int64 ``[K]``; None for all
            clients in order.
            A remote executor gives each copy of the algorithm only the clients it needs.
    """

    features: tf.Tensor
    labels: tf.Tensor
    mask: tf.Tensor
    counts: np.ndarray
    ids: np.ndarray = None

    @property
    def num_clients(self):
        return int(self.features.shape[0])

    def rows(self, clients):
        """Row positions of global client ids ``clients`` (any shape) in these tensors."""
        clients = np.asarray(clients)
        if self.ids is None:
            return clients
        order = np.argsort(self.ids)
        found = np.minimum(np.searchsorted(self.ids, clients, sorter=order), len(order) - 1)
        rows = order[found]
        if not np.array_equal(self.ids[rows], clients):
            missing = np.setdiff1d(clients, self.ids)
            raise KeyError(f"clients {missing[:10].tolist()} are not held here; the executor "
                           "must send their data with the call (call_clients).")
        return rows.astype(clients.dtype)


class Algorithm:
    """Interface: explicit state in, explicit state out (optax style).

    ``init(fns, weights, clients) -> state`` and
    ``run_round(state, weights, adjacency, round_index, fns, clients, rng, executor)
    -> (weights, state, logs)``, where ``weights`` is a list of ``[K, *shape]`` tensors (one per
    trainable variable), ``adjacency`` the round's (K, K) boolean graph (row i: whom client i
    hears from) and ``logs`` a dict of flat Python floats (always including ``loss`` and
    ``bytes_sent``). Per-client work goes through ``executor.map(method, calls)``, which calls
    a pure per-group method of the algorithm (NumPy in, NumPy out) in this process or on Ray
    actors, each holding its own copy of the algorithm made by pickling.
    """

    name = "algorithm"
    supports_remote = True  # False: per-client work that a remote executor cannot run

    def __getstate__(self):
        """Configuration only: a copy (e.g. on a Ray actor) builds its own functions in init."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["_built_for"] = None
        return state

    def init(self, fns, weights, clients):
        return {}

    def call_clients(self, method, call):
        """The clients whose data one per-group call reads (global ids), for remote executors.

        Args:
            method: the per-group method's name.
            call: its per-call arguments.

        Returns:
            ``(members, reads)``: the clients whose results the call computes, and every client
            whose data it reads (members included); or None (this default): every client's
            data, on every actor.
        """
        return None

    def run_round(self, state, weights, adjacency, round_index, fns, clients, rng, executor):
        raise NotImplementedError


def learning_rate_at(learning_rate, round_index):
    """A float, or a callable ``round -> float`` (a schedule), evaluated at ``round_index``."""
    value = learning_rate(round_index) if callable(learning_rate) else learning_rate
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"learning rate must be a positive number, got {value!r} at round "
                         f"{round_index}.")
    return value


def neighbour_average(mixing, weights):
    """Each client's uniform average over its closed neighbourhood: one product per variable.

    Args:
        mixing: (M, K) row-stochastic matrix (M = K, or the rows of the clients wanted).
        weights: list of ``[K, *shape]`` tensors.
    """
    mixing = tf.convert_to_tensor(mixing, tf.float32)
    return [tf.reshape(tf.matmul(mixing, tf.reshape(w, [w.shape[0], -1])),
                       [mixing.shape[0]] + list(w.shape[1:])) for w in weights]


def masked_cross_entropy(logits, labels, mask):
    """Mean cross-entropy over real samples, per client: ``[..., B, N, C] -> [..., B]``."""
    per_sample = tf.nn.softmax_cross_entropy_with_logits(labels, logits) * mask
    return tf.reduce_sum(per_sample, -1) / tf.maximum(tf.reduce_sum(mask, -1), 1.0)


def append_zero_row(t):
    """``t`` [K, n, ...] with one all-zero sample appended per client (index n: padding)."""
    return tf.concat([t, tf.zeros_like(t[:, :1])], 1)


def client_groups(num_clients, group_size):
    """Client indices in groups of exactly ``group_size`` (the last one padded by repetition).

    Fixed group shapes keep every ``tf.function`` on one trace.

    Returns:
        List of ``(indices, real)``: int32 indices and how many leading entries are real.
    """
    groups = []
    for start in range(0, num_clients, group_size):
        idx = np.arange(start, min(start + group_size, num_clients))
        real = len(idx)
        idx = np.concatenate([idx, np.full(group_size - real, idx[-1])]).astype(np.int32)
        groups.append((idx, real))
    return groups
