"""What every DFL algorithm is made of, and the pieces they share.

An algorithm is frozen configuration plus a round in protocol terms (``Algorithm.run_round``):
it sends messages through the round's channel, hands per-client work to an executor as typed
calls, and combines the results. A *worker* (``Algorithm.make_worker``), one per process or Ray
actor, owns the compiled functions, kernels and the clients' data that those calls need.
"""

import dataclasses
import functools
import hashlib
import types
import typing

import numpy as np
import tensorflow as tf

from ntkdfl_tf import protocol, topology


@dataclasses.dataclass
class ClientTensors:
    """The clients' training data (all of them, or those in ``ids``), on the device, in the form
    the workers consume.

    Attributes:
        features: ``fns.features(x)`` per client, ``[K, n_max, ...]`` float32.
        labels: one-hot labels ``[K, n_max, C]``, zero on padding rows.
        mask: ``[K, n_max]`` float32, 1 for real samples.
        counts: real samples per client, NumPy int64 ``[K]``.
        ids: which clients the rows are (global ids, any order), int64 ``[K]``; None for all
            clients in order. A remote executor gives each worker only the clients it needs.
    """

    features: tf.Tensor
    labels: tf.Tensor
    mask: tf.Tensor
    counts: np.ndarray
    ids: np.ndarray = None

    @classmethod
    def from_client_data(cls, clients, fns, ids=None):
        """``clients`` (a ClientData) in this form: ``fns.features`` of the inputs (8,192 rows
        per call; the features are per sample, so any split gives the same values), one-hot
        labels zeroed on padding rows, the mask and the counts."""
        k, n_max = clients.y.shape
        flat = clients.x.reshape((k * n_max,) + clients.x.shape[2:])
        feats = tf.concat([fns.features(flat[i:i + 8192]) for i in range(0, len(flat), 8192)], 0)
        feats = tf.reshape(feats, [k, n_max] + feats.shape[1:].as_list())
        mask = tf.constant(clients.mask)
        labels = tf.one_hot(clients.y, fns.num_classes) * mask[..., None]
        return cls(feats, labels, mask, clients.counts, ids)

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
            raise KeyError(f"clients {missing[:10].tolist()} are not held here; a call must "
                           "name every client whose data it reads (its ``reads``).")
        return rows.astype(clients.dtype)


class RoundInput(typing.NamedTuple):
    """Everything an algorithm's round reads.

    Attributes:
        index: 0-based round number.
        weights: list of ``[K, *shape]`` tensors, one per trainable variable.
        graph: (K, K) boolean: entry (i, j) when client i may hear from client j this round
            (the topology's draw, without clients that sit the round out).
        counts: real samples per client, NumPy int64 ``[K]``.
        max_samples: padded samples per client (``n_max``).
        rng: the round's ``sampling`` random stream.
        fns: the model's ``ModelFunctions`` (shapes and class count for message sizes).
        sample_bytes: bytes of one raw input sample as the clients store it (for codecs that
            send inputs).
        defence: the receivers' ``defences.Defence`` against Byzantine neighbours, or None
            (uniform averaging, every package used as received).
        total_rounds: the rounds of this ``fit`` (defences whose threshold decays use it).
        state: the algorithm's state from the previous round (``Algorithm.initial_state`` at
            the start), None for algorithms without state.
        progress: passed on to the round's main ``executor.map``, which calls it with the
            number of client groups done so far (the trainer's progress steps); None: silent.
    """

    index: int
    weights: list
    graph: np.ndarray
    counts: np.ndarray
    max_samples: int
    rng: np.random.Generator
    fns: typing.Any
    sample_bytes: int = None
    defence: typing.Any = None
    total_rounds: int = 1
    state: typing.Any = None
    progress: typing.Any = None

    @property
    def num_clients(self):
        return len(self.counts)


class RoundOutput(typing.NamedTuple):
    """A round's new client weights, flat logs (Python floats, always ``loss``) and state.

    Most algorithms carry nothing from round to round (the baselines' momentum buffers start
    at zero every round, as in the reference); one that does (DisPFL's masks) returns its
    ``Algorithm.state_type`` here, and the trainer checkpoints it.
    """

    weights: list
    logs: dict
    state: typing.Any = None


class Worker:
    """Runs one algorithm's per-client calls; one per process (local) or Ray actor.

    Built once per process from the algorithm's configuration and the model's functions; it
    owns compiled functions, kernels and the data of the clients bound to it.

    Attributes:
        jit_compile: whether its calls are XLA-compiled; such a call runs on one core, so
            ``LocalExecutor(parallel_calls=0)`` runs one per core.
    """

    jit_compile = False

    def __init__(self, algorithm, fns):
        self.algorithm, self.fns = algorithm, fns

    def bind(self, clients):
        """Gives the worker the data of ``clients`` (ClientTensors) for the calls that follow."""
        raise NotImplementedError

    def run(self, context, call):
        """One call's work; ``context`` is what every call of the map shares. Calls may run
        on several threads at once (``LocalExecutor(parallel_calls=...)``): state written
        during a call must be the call's own, or guarded."""
        raise NotImplementedError

    def tracing_counts(self):
        """``{"name": traces}`` of the worker's ``tf.function``s (growth means retracing)."""
        return tracing_counts(worker=self, kernel=getattr(self, "kernel", None))


class Algorithm:
    """Interface of a DFL algorithm: frozen configuration plus a round in protocol terms.

    Subclasses are frozen dataclasses. ``run_round(round_input, channel, executor)`` returns a
    ``RoundOutput``: it sends every message through ``channel`` (a
    ``protocol.RoundChannel``, which counts the bytes it delivers) and maps typed calls over
    the executor, whose worker is ``make_worker(fns)``. Each call names the clients it computes
    (``members``) and every client whose data it reads (``reads``), so that a remote executor
    can place the data.
    """

    name = "algorithm"
    # A NamedTuple whose every field is a list of per-client ``[K, ...]`` NumPy arrays, or
    # None for an algorithm without state between rounds.
    state_type = None

    def initial_state(self, num_clients, fns, rng):
        """The state before round 0 (``state_type``), drawn from ``rng`` (the trainer's
        ``masks`` stream); None for algorithms without state."""
        return None

    def make_worker(self, fns):
        """The worker that runs this algorithm's calls for the model behind ``fns``."""
        raise NotImplementedError

    def steps_per_round(self, num_clients):
        """The round's progress steps: its client groups of ``client_batch`` clients (one
        ``executor.map`` call each, reported through ``RoundInput.progress``); 1 for an
        algorithm without ``client_batch``."""
        batch = getattr(self, "client_batch", None)
        return 1 if batch is None else -(-num_clients // min(batch, num_clients))

    def run_round(self, round_input, channel, executor):
        raise NotImplementedError

    @property
    def config(self):
        """The configuration as a flat JSON-able dict (checkpoint fingerprints, logs)."""
        return {"name": self.name, **{f.name: describe(getattr(self, f.name))
                                      for f in dataclasses.fields(self)}}


def describe(value):
    """A JSON-able, run-independent description of a configuration value.

    Functions are described by name plus a digest of their code, constants and closure (two
    different lambdas differ; the same one in another process does not); callable objects by
    class and attributes; arrays as lists.

    Raises:
        TypeError: a value with no such description (say what it is in ``config`` instead).
    """
    if isinstance(value, functools.partial):
        return {"function": describe(value.func), "args": [describe(a) for a in value.args],
                "keywords": {k: describe(v) for k, v in value.keywords.items()}}
    if isinstance(value, (types.FunctionType, types.MethodType)):
        name = f"{value.__module__}.{value.__qualname__}"
        code = getattr(value, "__code__", None)
        if code is None or "<" not in value.__qualname__:  # a named function: its name says it
            return name
        cells = [describe(c.cell_contents) for c in value.__closure__ or ()]
        consts = [c if isinstance(c, (int, float, str, bytes, tuple, type(None)))
                  else type(c).__name__ for c in code.co_consts]  # nested code: no address
        text = repr((code.co_code, consts, cells, describe(list(value.__defaults__ or ()))))
        return f"{name}#{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if isinstance(value, (tuple, list)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "config"):
        return {"class": type(value).__name__, **describe(value.config)}
    if hasattr(value, "__dict__"):
        return {"class": type(value).__name__, **describe(vars(value))}
    if hasattr(value, "name"):  # stateless objects such as losses
        return {"class": type(value).__name__, "name": describe(value.name)}
    raise TypeError(f"Cannot describe {value!r} for the run's configuration fingerprint; use "
                    "plain numbers, strings, functions or objects with attributes.")


def state_arrays(state):
    """``{field: [arrays]}`` of a ``state_type`` value (for checkpoints), None for None."""
    if state is None:
        return None
    return {name: [np.asarray(a) for a in value] for name, value in state._asdict().items()}


def state_rows(state, keep, old):
    """``state`` with the rows of clients where ``keep`` [K] is False taken from ``old``."""
    if state is None or old is None:
        return state
    def where(new, previous):
        return np.where(keep.reshape((-1,) + (1,) * (np.ndim(new) - 1)), new, previous)
    return type(state)(**{name: [where(n, o) for n, o in zip(value, getattr(old, name))]
                          for name, value in state._asdict().items()})


def tracing_counts(**owners):
    """``{"owner.attribute": traces}`` of every ``tf.function`` attribute of the owners."""
    return {f"{owner_name}.{name}": int(value.experimental_get_tracing_count())
            for owner_name, owner in owners.items() if owner is not None
            for name, value in vars(owner).items()
            if hasattr(value, "experimental_get_tracing_count")}


def real_first_orders(counts, n_max, rng, repeats=None):
    """Per client a random order of its sample indices, real samples first (int32).

    Args:
        counts: real samples per client ``[K]``; n_max: padded samples per client.
        rng: the NumPy generator to draw from. repeats: None for one order per client
            (``[K, n_max]``), else that many independent ones (``[repeats, K, n_max]``).
    """
    shape = (len(counts), n_max) if repeats is None else (repeats, len(counts), n_max)
    keys = rng.random(shape) + (np.arange(n_max)[None] >= np.asarray(counts)[:, None])
    return np.argsort(keys, axis=-1).astype(np.int32)


def learning_rate_at(learning_rate, round_index):
    """A float, or a callable ``round -> float`` (a schedule), evaluated at ``round_index``."""
    value = learning_rate(round_index) if callable(learning_rate) else learning_rate
    value = float(value)
    if not np.isfinite(value) or value <= 0 or value > np.finfo(np.float32).max:
        raise ValueError(f"learning rate must be a positive number below the float32 maximum, "
                         f"got {value!r} at round {round_index}.")
    return value


def positive_int(name, value):
    """Raises ValueError unless ``value`` is a positive integer."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def neighbour_average(mixing, weights):
    """Each client's uniform average over its closed neighbourhood: one product per variable.

    Args:
        mixing: (M, K) row-stochastic matrix (M = K, or the rows of the clients wanted).
        weights: list of ``[K, *shape]`` tensors.
    """
    mixing = tf.convert_to_tensor(mixing, tf.float32)
    return [tf.reshape(tf.matmul(mixing, tf.reshape(w, [w.shape[0], -1])),
                       [mixing.shape[0]] + list(w.shape[1:])) for w in weights]


def average_received(weights, delivery, round_input=None):
    """Each client's average of its own weights and the ``WeightsMessage``s delivered to it.

    Args:
        weights: list of ``[K, *shape]`` tensors: every client's own weights (the senders').
        delivery: a ``protocol.Delivery`` of weights messages.
        round_input: the round's ``RoundInput``; its ``defence`` (if any, with a weight rule)
            replaces the uniform average by a robust one.

    Returns:
        List of ``[K, *shape]`` tensors. When the channel left every message unchanged the
        messages carry the senders' own rows, and the average is one mixing product (the
        receivers' uniform weights over whom they heard from); otherwise the delivered arrays
        are summed per receiver.
    """
    k = int(weights[0].shape[0])
    defence = None if round_input is None else round_input.defence
    if not delivery.messages:  # everyone was cut off: each keeps its own weights
        return list(weights)
    if defence is not None and defence.weight_rule != "none":
        own = [w.numpy() for w in weights]
        flat = np.concatenate([w.reshape(k, -1) for w in own], 1)
        stack = protocol.stack_by_receiver(delivery.messages, np.arange(k))
        robust = defence.average(flat, stack.received, stack.valid, round_input.index,
                                 round_input.total_rounds)
        sizes = np.cumsum([int(np.prod(w.shape[1:])) for w in own])[:-1]
        return [tf.constant(part.reshape(w.shape))
                for part, w in zip(np.split(robust.weights, sizes, axis=1), own)]
    heard = protocol.heard_from(delivery.messages, k)
    if delivery.unchanged:
        return neighbour_average(topology.mixing_matrix(heard), weights)
    receivers = np.array([m.receiver for m in delivery.messages], np.int64)
    counts = (heard.sum(axis=1) + 1).astype(np.float32)
    out = []
    for v, w in enumerate(weights):
        total = w.numpy().astype(np.float32)
        if len(receivers):
            np.add.at(total, receivers, np.stack([m.weights[v] for m in delivery.messages]))
        out.append(tf.constant(total / counts.reshape((-1,) + (1,) * (total.ndim - 1))))
    return out


def append_zero_row(t):
    """``t`` [K, n, ...] with one all-zero sample appended per client (index n: padding)."""
    return tf.concat([t, tf.zeros_like(t[:, :1])], 1)


class ClientGroup(typing.NamedTuple):
    """Client indices padded to a fixed group size, and how many leading entries are real."""

    indices: np.ndarray
    real: int


def client_groups(num_clients, group_size):
    """Client indices in groups of exactly ``group_size`` (the last one padded by repetition).

    Fixed group shapes keep every ``tf.function`` on one trace.
    """
    groups = []
    for start in range(0, num_clients, group_size):
        idx = np.arange(start, min(start + group_size, num_clients))
        real = len(idx)
        idx = np.concatenate([idx, np.full(group_size - real, idx[-1])]).astype(np.int32)
        groups.append(ClientGroup(idx, real))
    return groups


def scatter_groups(groups, values, num_clients, dtype=None):
    """Per-group arrays ``[B, ...]`` -> one ``[K, ...]`` array (padding rows dropped)."""
    dtype = np.asarray(values[0]).dtype if dtype is None else dtype
    out = np.empty((num_clients,) + np.shape(values[0])[1:], dtype)
    for group, v in zip(groups, values):
        out[group.indices[:group.real]] = np.asarray(v)[:group.real]
    return out
