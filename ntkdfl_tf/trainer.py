"""DecentralizedTrainer: the fit loop. One communication round is one Keras epoch."""

import functools
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from ntkdfl_tf import checkpoint, defences, executors, functional, protocol
from ntkdfl_tf.algorithms import base
from ntkdfl_tf.callbacks.round_progress import RoundProgress
from ntkdfl_tf.data.client_data import ClientData
from ntkdfl_tf.errors import CheckpointError, DivergenceError
from ntkdfl_tf.faults import Faults

EVAL_CHUNK = 2048  # test samples per forward pass
DIVERGED_WEIGHT = 1e12  # a float32 weight this large means the run has blown up
# Derived random streams: each is keyed by (root seed, stream, round), so a stream's draws do
# not depend on how many draws another stream made, and a resumed run needs only the seed.
STREAMS = {"init": 0, "partition": 1, "topology": 2, "sampling": 3, "failures": 4, "channel": 5,
           "byzantine": 6, "adversary": 7, "masks": 8}


def stream_rng(seed, stream, round_index=0):
    """The NumPy generator of ``stream`` at ``round_index`` under root ``seed``."""
    return np.random.default_rng([int(seed), STREAMS[stream], int(round_index)])


def worst_tenth(accuracy):
    """The mean of the lowest tenth (at least one) of client accuracies."""
    acc = np.sort(np.asarray(accuracy))
    return float(acc[:max(1, int(np.ceil(0.1 * len(acc))))].mean())


def byzantine_share_max(graph, byzantine):
    """delta_max: the largest Byzantine share of an honest client's closed neighbourhood
    (itself and whom the graph lets it hear), as ClippedGossip's delta_i with uniform weights."""
    honest = ~byzantine
    if not honest.any():
        return 0.0
    share = (graph & byzantine[None]).sum(1) / (graph.sum(1) + 1.0)
    return float(share[honest].max())


def client_weight_spread(weights):
    """Mean over clients of the squared distance of their weights to the clients' average."""
    return float(tf.add_n([tf.reduce_sum(tf.square(w - tf.reduce_mean(w, 0, keepdims=True)))
                           for w in weights]).numpy() / int(weights[0].shape[0]))


class _Steps:
    """``progress(done)`` for a round: Keras' batch hooks for the client groups done so far."""

    def __init__(self, cb_list, steps):
        self.cb_list, self.steps, self.done = cb_list, steps, 0
        cb_list.on_train_batch_begin(0)

    def __call__(self, done):
        for step in range(self.done, min(done, self.steps)):
            self.cb_list.on_train_batch_end(step, {})
            if step + 1 < self.steps:
                self.cb_list.on_train_batch_begin(step + 1)
        self.done = max(self.done, min(done, self.steps))


class DecentralizedTrainer:
    """Trains one Keras architecture on many clients that talk over a graph, without a server.

    Client weights are stacked (one ``[K, *shape]`` tensor per trainable variable). ``fit`` runs
    one communication round per Keras epoch (one step per client group), so stock
    ``keras.callbacks`` work unchanged; they
    see ``trainer.model``, which holds the aggregated (client-averaged) weights after each round.

    Args:
        model_fn: function returning a fresh, built ``keras.Model`` that outputs logits.
        algorithm: an ``ntkdfl_tf.algorithms`` object, e.g. ``NTKDFL()``.
        topology: an ``ntkdfl_tf.topology`` object, e.g. ``RandomGraph(num_neighbors=5)``.
        seed: root seed; init, topology, sampling, failures and the channel use streams derived
            from it.
        eval_batch: clients evaluated together on the validation data.
        faults: an ``ntkdfl_tf.Faults`` (client dropout, departures) or None.
        channel: an ``ntkdfl_tf.protocol.Channel``, where messages are delivered (and lost:
            ``Channel(message_loss=0.1)``); None for the default, which delivers everything.
        executor: where per-client work runs: ``"local"`` (this process), ``"ray"`` (Ray
            actors on a local instance) or an executor object such as
            ``ntkdfl_tf.executors.RayExecutor(num_actors=8, address="auto")``.
        defence: an ``ntkdfl_tf.Defence``: how receivers average weights (robust rules), screen
            Jacobian packages and form the final aggregate; None for the plain mean
            everywhere. Byzantine senders are the channel's (``Channel(byzantine=...)``).
    """

    def __init__(self, model_fn, algorithm, topology, seed=0, eval_batch=16, faults=None,
                 executor="local", channel=None, defence=None):
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a function returning a keras.Model, got {model_fn!r}.")
        if not isinstance(algorithm, base.Algorithm):
            raise TypeError(f"algorithm must be an ntkdfl_tf.algorithms object, got {algorithm!r}.")
        if not hasattr(topology, "draw"):
            raise TypeError(f"topology must be an ntkdfl_tf.topology object, got {topology!r}.")
        base.positive_int("eval_batch", eval_batch)
        if faults is not None and not isinstance(faults, Faults):
            raise TypeError(f"faults must be an ntkdfl_tf.Faults or None, got {faults!r}.")
        channel = protocol.Channel() if channel is None else channel
        if not isinstance(channel, protocol.Channel):
            raise TypeError(f"channel must be an ntkdfl_tf.protocol.Channel or None, got "
                            f"{channel!r}.")
        if defence is not None and not isinstance(defence, defences.Defence):
            raise TypeError(f"defence must be an ntkdfl_tf.Defence or None, got {defence!r}.")
        self.algorithm, self.topology, self.seed = algorithm, topology, int(seed)
        self.faults, self.channel, self.defence = faults, channel, defence
        self.byzantine_clients = None  # [K] bool once fit starts with a Byzantine channel
        self.last_kept = None  # clients the robust final aggregate kept
        self.executor = executors.make_executor(executor)
        self.model_fn = model_fn
        self.eval_batch = int(eval_batch)
        keras.utils.set_random_seed(int(stream_rng(seed, "init").integers(2**31)))
        model = model_fn()
        if not isinstance(model, keras.Model):
            raise TypeError(f"model_fn returned {type(model).__name__}, not a keras.Model.")
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        self.model = model
        self.fns = functional.ModelFunctions(model)
        self.initial_weights = self.fns.initial_weights()  # every client starts here
        self.client_weights = None  # list of [K, *shape] tensors once fit starts
        self.algorithm_state = None  # the algorithm's state_type between rounds, if it has one
        self._data_fingerprint = self._sample_bytes = None
        self._client_label_share = None  # [K, C]: each client's training label distribution
        self.round = 0
        self.last_client_accuracy = None
        # one trace per group size (the aggregate, min(eval_batch, K) clients): no relaxed
        # trace, whose unknown client axis the generic forward cannot unroll
        self._eval_fn = tf.function(self._eval_group)

    # -- data ---------------------------------------------------------------------------------
    @staticmethod
    def _client_data(clients):
        """``clients`` as ClientData (a list of per-client ``(x, y)`` pairs is stacked)."""
        if isinstance(clients, (list, tuple)):
            clients = ClientData.from_arrays(clients)
        if not isinstance(clients, ClientData):
            raise TypeError("clients must be ClientData (from ntkdfl_tf.data partitioners) or a "
                            f"list of (x, y) pairs, got {type(clients).__name__}.")
        return clients

    def _client_tensors(self, clients):
        clients = self._client_data(clients)
        self.check_inputs(clients.x.reshape((-1,) + clients.x.shape[2:]), "client data")
        self.check_labels(clients.y, "client labels", ndim=2)
        tensors = base.ClientTensors.from_client_data(clients, self.fns)
        self._client_label_share = (tf.reduce_sum(tensors.labels, 1).numpy()
                                    / np.maximum(clients.counts, 1)[:, None])
        self._data_fingerprint = clients.fingerprint()
        self._sample_bytes = int(np.prod(clients.x.shape[2:])) * clients.x.dtype.itemsize
        return tensors

    def check_inputs(self, x, what):
        """Raises ValueError unless ``x`` has the model's per-sample shape and is finite."""
        expected = tuple(self.model.input_shape[1:])
        got = tuple(np.shape(x)[1:])
        if got != expected:
            raise ValueError(f"The {what} have per-sample shape {got} but the model expects "
                             f"{expected}; reshape the data or change model_fn.")
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError(f"The {what} contain NaN or inf; clean the data first.")

    def check_labels(self, y, what, ndim=1):
        """Integer class ids in [0, C): shape (n,), or (clients, n_max) for padded client data."""
        y = np.asarray(y)
        c = self.fns.num_classes
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != ndim:
            raise ValueError(f"The {what} must be integer class ids with {ndim} dimension(s), "
                             f"got dtype {y.dtype} and shape {y.shape}; convert one-hot labels with "
                             "argmax(axis=-1).")
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"The {what} range over [{y.min()}, {y.max()}] but the model has {c} "
                             f"outputs (labels must lie in [0, {c})); match the model's output "
                             "size to the number of classes.")

    # -- training -----------------------------------------------------------------------------
    def fit(self, clients, rounds, validation_data=None, callbacks=None, verbose=1,
            initial_round=None, client_metrics_every=1, stop_at_accuracy=None):
        """Runs communication rounds.

        Args:
            clients: ClientData, or a list of per-client ``(x, y)`` pairs. ClientData with a
                source (``clients.with_source(nd.data.DatasetSource(...))``) lets Ray actors
                load their clients' samples from the dataset files themselves.
            rounds: the round to stop before (like Keras ``epochs``): rounds
                ``initial_round .. rounds-1`` run, so a second ``fit(rounds=20)`` after
                ``fit(rounds=10)`` continues with rounds 10..19.
            validation_data: ``(x, y)`` test data for the aggregated model and every client.
            callbacks: ``keras.callbacks.Callback`` objects; project callbacks that define
                ``set_trainer`` receive this trainer.
            verbose: 0 silent; 1 a progress bar per round that advances with each client group
                (``algorithm.steps_per_round``) and ends in a short line; 2 that line only, one
                per round (``callbacks.RoundProgress``; a ``keras.callbacks.ProgbarLogger`` in
                ``callbacks`` replaces it).
            initial_round: round to start from; by default where the last ``fit`` stopped.
            client_metrics_every: evaluate every client model (``evaluate``'s per-client
                metrics, K passes over the test set) every this many rounds, on the last round
                and on the round that reaches ``stop_at_accuracy``; the aggregate is evaluated
                every round. At 300 clients the per-client pass costs several times a cheap
                algorithm's round.
            stop_at_accuracy: stop after the first round whose aggregate reaches this test
                accuracy (needs ``validation_data``); None: run every round. A callback that
                stops the fit (``keras.callbacks.EarlyStopping``) decides after the round's
                evaluation, so its last round has client metrics only if they were due.

        Returns:
            A ``keras.callbacks.History`` with one entry per round (the per-client metrics:
            one per round they were evaluated in, ``client_metrics_every``).
        """
        if not isinstance(rounds, (int, np.integer)) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}.")
        if not isinstance(client_metrics_every, (int, np.integer)) or client_metrics_every < 1:
            raise ValueError(f"client_metrics_every must be a positive integer (1: every round), "
                             f"got {client_metrics_every!r}.")
        if stop_at_accuracy is not None:
            if not 0 < stop_at_accuracy <= 1:
                raise ValueError(f"stop_at_accuracy must lie in (0, 1], got "
                                 f"{stop_at_accuracy!r}; pass None to run every round.")
            if validation_data is None:
                raise ValueError("stop_at_accuracy needs validation_data: the aggregate's test "
                                 "accuracy decides when to stop.")
        clients = self._client_data(clients)
        tensors = self._client_tensors(clients)
        k = tensors.num_clients
        self.topology.validate(k)
        if self.faults is not None:
            self.faults.validate(k)
        if self.defence is not None:
            self.defence.validate(self.topology, self.algorithm)
        self.byzantine_clients = None
        if self.channel.byzantine is not None:
            self.byzantine_clients = self.channel.byzantine.clients(
                k, stream_rng(self.seed, "byzantine"))
        if validation_data is not None:
            val = self.prepare_examples(*validation_data, what="validation")
        self.last_client_accuracy = None
        if self.client_weights is None or int(self.client_weights[0].shape[0]) != k:
            self.client_weights = [tf.constant(np.repeat(w[None], k, axis=0))
                                   for w in self.initial_weights]
            self.algorithm_state = self._initial_algorithm_state(k)
            self.round = 0

        # the ClientData too: with a DatasetSource, remote workers load their clients' samples
        self.executor.start(self.algorithm, tensors, fns=self.fns, model_fn=self.model_fn,
                            data=clients)
        for cb in callbacks or []:
            if hasattr(cb, "set_trainer"):
                cb.set_trainer(self)
        callbacks = list(callbacks or [])
        if verbose and not any(isinstance(cb, keras.callbacks.ProgbarLogger) for cb in callbacks):
            callbacks.append(RoundProgress())
        steps = self.algorithm.steps_per_round(k)  # client groups: the bar's steps per round
        cb_list = keras.callbacks.CallbackList(
            callbacks, add_history=True, model=self.model, verbose=verbose, epochs=rounds,
            steps=steps)
        self.model.stop_training = False
        self.model._initial_epoch = None
        self._set_model_to_aggregate()
        cb_list.on_train_begin()
        start = self.round if initial_round is None else int(initial_round)
        if self.model._initial_epoch:  # BackupAndRestore restored the aggregate: restart from it
            start = int(self.model._initial_epoch)
            self.client_weights = [tf.constant(np.repeat(v.numpy()[None], k, axis=0))
                                   for v in self.model.trainable_variables]
            self.algorithm_state = self._initial_algorithm_state(k)  # not in the backup
        if start >= rounds:
            warnings.warn(f"fit(rounds={rounds}) does nothing: the trainer is already at round "
                          f"{start}; pass a larger rounds to continue.")
        logs = {}
        for r in range(start, rounds):
            cb_list.on_epoch_begin(r)
            progress = _Steps(cb_list, steps)
            t0 = time.perf_counter()
            graph = self.topology.draw(k, stream_rng(self.seed, "topology", r))
            active = None
            if self.faults is not None:
                active = self.faults.participants(k, r, stream_rng(self.seed, "failures", r))
                graph = graph & active[:, None] & active[None, :]
            channel = self.channel.round(k, stream_rng(self.seed, "channel", r),
                                         self._adversary(r, rounds))
            output = self.algorithm.run_round(
                base.RoundInput(r, self.client_weights, graph, tensors.counts,
                                int(tensors.mask.shape[1]), stream_rng(self.seed, "sampling", r),
                                self.fns, self._sample_bytes, self.defence, rounds,
                                self.algorithm_state, progress),
                channel, self.executor)
            progress(steps)  # the steps an algorithm did not report
            weights, logs, state = output.weights, output.logs, output.state
            if active is not None:  # clients that sat out keep their weights (and state)
                keep = tf.constant(active)
                weights = [tf.where(tf.reshape(keep, [-1] + [1] * (w.shape.rank - 1)), w, old)
                           for w, old in zip(weights, self.client_weights)]
                state = base.state_rows(state, active, self.algorithm_state)
            logs = dict(logs, bytes_sent=float(channel.bytes_delivered))
            self._check_finite(weights, logs, r)
            self.client_weights, self.algorithm_state = weights, state
            logs["round_seconds"] = time.perf_counter() - t0
            logs.update(self.executor.round_stats())
            logs["client_weight_spread"] = client_weight_spread(self.client_weights)
            if active is not None:
                logs["active_clients"] = float(active.sum())
            if self.byzantine_clients is not None:
                logs["byzantine_share_max"] = byzantine_share_max(graph, self.byzantine_clients)
            self.round = r + 1
            self._set_model_to_aggregate()
            if validation_data is not None:
                logs.update(self.evaluate(*val, features_ready=True, clients=False))
                reached = (stop_at_accuracy is not None
                           and logs["val_accuracy"] >= stop_at_accuracy)
                self.last_client_accuracy = None
                if reached or r + 1 == rounds or (r + 1) % client_metrics_every == 0:
                    logs.update(self.evaluate_clients(*val, features_ready=True))
                if reached:
                    self.model.stop_training = True
            cb_list.on_epoch_end(r, logs)
            if self.model.stop_training:
                break
        cb_list.on_train_end(logs)
        return self.model.history

    def _initial_algorithm_state(self, num_clients):
        """The algorithm's state before round 0, from the ``masks`` stream (None: stateless)."""
        return self.algorithm.initial_state(num_clients, self.fns, stream_rng(self.seed, "masks"))

    def _adversary(self, round_index, rounds):
        """The round's ``protocol.Adversary``, or None without Byzantine clients."""
        if self.byzantine_clients is None:
            return None
        radius = None
        if self.defence is not None:
            radius = functools.partial(self.defence.radius, round_index=round_index,
                                       total_rounds=rounds)
        return protocol.Adversary(self.channel.byzantine, self.byzantine_clients,
                                  stream_rng(self.seed, "adversary", round_index), radius)

    def _check_finite(self, weights, logs, r):
        """Raises DivergenceError naming the round and clients if anything is NaN or inf, or a
        weight's magnitude passed ``DIVERGED_WEIGHT`` (bounded gradients can carry weights to
        1e30 without ever producing NaN)."""
        finite = np.ones(int(weights[0].shape[0]), bool)
        for w in weights:
            flat = tf.reshape(w, [w.shape[0], -1])
            finite &= tf.reduce_all(tf.math.is_finite(flat), axis=1).numpy()
            finite &= tf.reduce_max(tf.abs(flat), axis=1).numpy() <= DIVERGED_WEIGHT
        bad_logs = [k for k, v in logs.items() if not np.isfinite(v)]
        if finite.all() and not bad_logs:
            return
        bad = np.flatnonzero(~finite).tolist()
        what = (f"client(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} have NaN/inf weights "
                f"or weights beyond {DIVERGED_WEIGHT:g}"
                if bad else f"the round's {', '.join(bad_logs)} is NaN/inf")
        rate = getattr(self.algorithm, "learning_rate", None)
        # the field's value in this round (DisPFL multiplies it by its own decay)
        rate = ("" if rate is None else
                f" (learning_rate {base.learning_rate_at(rate, r):g} in round {r + 1})")
        raise DivergenceError(
            f"{self.algorithm.name} diverged in round {r + 1}: {what}. Nothing of this round was "
            f"kept (the last checkpoint, if any, is of round {r}); lower the learning rate"
            f"{rate}.", round=r + 1, clients=bad)

    # -- state --------------------------------------------------------------------------------
    def configuration(self):
        """The run's configuration as a flat ``{"section.field": value}`` dict (JSON-able).

        Covers the algorithm, topology, faults, channel, model shapes and a fingerprint of the
        client data (partition); a checkpoint of a run with any other value is refused.
        """
        def section(name, obj):
            if obj is None:
                return {name: None}
            values = obj.config if hasattr(obj, "config") else dict(vars(obj), name=type(obj).__name__)
            return {f"{name}.{k}": v for k, v in base.describe(values).items()}

        config = {"seed": self.seed, "model.shapes": [list(s) for s in self.fns.shapes],
                  "data": self._data_fingerprint}
        for name, obj in (("algorithm", self.algorithm), ("topology", self.topology),
                          ("faults", self.faults), ("channel", self.channel)):
            config.update(section(name, obj))
        if self.defence is not None:  # absent otherwise: earlier checkpoints stay valid
            config.update(section("defence", self.defence))
        return config

    def get_state(self):
        """Everything needed to continue this run exactly (see ``ntkdfl_tf.checkpoint``)."""
        if self.client_weights is None:
            raise RuntimeError("No client models yet: call fit() first.")
        state = {"round": int(self.round), "seed": self.seed, "streams": STREAMS,
                 "algorithm": self.algorithm.name,
                 "num_clients": int(self.client_weights[0].shape[0]),
                 "config": self.configuration(),
                 "weights": [w.numpy() for w in self.client_weights]}
        if self.algorithm_state is not None:  # absent otherwise: the files stay as they were
            state["algorithm_state"] = base.state_arrays(self.algorithm_state)
        return state

    def set_state(self, state, source="the checkpoint"):
        """Restores ``get_state()`` output; the trainer must be in ``fit`` or after it.

        Raises:
            CheckpointError: the state belongs to a run with another configuration (seed,
                algorithm and its settings, topology, faults, channel, data, number of clients
                or model); the message names the first differing field.
        """
        checkpoint.check_same_run(state, {
            "seed": self.seed, "algorithm": self.algorithm.name, "streams": STREAMS,
            "num_clients": int(self.client_weights[0].shape[0]), **self.configuration()}, source)
        self.client_weights = [tf.constant(w) for w in state["weights"]]
        if self.algorithm.state_type is not None:
            if state.get("algorithm_state") is None:
                raise CheckpointError(
                    f"{source} has no {self.algorithm.name} state (its "
                    f"{', '.join(self.algorithm.state_type._fields)}); start afresh with "
                    "--noresume.")
            self.algorithm_state = self.algorithm.state_type(**state["algorithm_state"])
        self.round = int(state["round"])
        self._set_model_to_aggregate()

    # -- evaluation ---------------------------------------------------------------------------
    def present_clients(self):
        """Boolean [K]: clients that have not left the run (all without ``faults``)."""
        k = int(self.client_weights[0].shape[0])
        return (np.ones(k, bool) if self.faults is None
                else self.faults.present(k, self.round))

    def aggregated_weights(self, clients=None):
        """The final aggregate of the present clients' weights, as a list of NumPy arrays.

        The mean, or with ``Defence(final="robust")`` the mean of the clients
        ``defences.robust_final_average`` keeps (their ids in ``trainer.last_kept``).
        ``clients``: a boolean ``[K]`` to average only those (plain mean).
        """
        if self.client_weights is None:
            raise RuntimeError("No client models yet: call fit() first.")
        present = self.present_clients() if clients is None else clients & self.present_clients()
        own = [w.numpy()[present] for w in self.client_weights]
        if clients is not None or self.defence is None or self.defence.final == "mean":
            return [w.mean(axis=0) for w in own]
        flat = np.concatenate([w.reshape(len(w), -1) for w in own], 1)
        final = defences.robust_final_average(flat)
        self.last_kept = np.flatnonzero(present)[final.kept]
        return list(protocol.messages.unflatten(final.weights, [w.shape[1:] for w in own]))

    def _set_model_to_aggregate(self):
        for v, w in zip(self.model.trainable_variables, self.aggregated_weights()):
            v.assign(w)

    def aggregate(self):
        """Returns a new compiled ``keras.Model``: the average of all client models."""
        model = keras.models.clone_model(self.model)
        model.set_weights(self.aggregated_weights())
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.optimizer.build(model.trainable_variables)  # saved and loaded alike, no warning
        return model

    def _eval_group(self, weights, feats, y):
        """Correct predictions per true class ``[B, C]`` (exact integer counts: at most
        ``EVAL_CHUNK`` per entry, far below float32's 2**24) and summed loss ``[B]`` of B
        models."""
        logits = self.fns.forward(weights, feats)  # [B, N, C]
        hits = tf.cast(tf.equal(tf.argmax(logits, -1), y[None]), tf.float32)  # [B, N]
        one_hot = tf.one_hot(y, self.fns.num_classes)
        correct = tf.cast(tf.round(tf.matmul(hits, one_hot)), tf.int64)
        labels = tf.broadcast_to(one_hot[None], tf.shape(logits))
        loss = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
        return correct, tf.reduce_sum(loss, -1)

    def prepare_examples(self, x, y, what="evaluation"):
        """Checks raw ``(x, y)`` against the model and maps ``x`` through ``fns.features``.

        Returns:
            ``(features, y)``: a tensor and int64 class ids.

        Raises:
            ValueError: empty or mismatched data, wrong per-sample shape, NaN/inf inputs, or
                labels outside the model's classes; the message names the value.
        """
        if x is None or y is None or len(x) == 0 or len(x) != len(y):
            raise ValueError(f"The {what} data needs matching, non-empty x and y; got "
                             f"{0 if x is None else len(x)} and {0 if y is None else len(y)} "
                             "samples.")
        self.check_inputs(x, f"{what} inputs")
        self.check_labels(y, f"{what} labels")
        return self.fns.features(x), np.asarray(y, np.int64)

    def evaluate_models(self, weights, features, y):
        """Accuracy and mean loss of B models of this architecture on prepared data.

        Models are evaluated ``eval_batch`` at a time (the last group padded, so the shapes
        stay fixed), 2,048 samples per forward pass.

        Args:
            weights: list aligned with ``model.trainable_variables``, each ``[B, *shape]``.
            features: ``fns.features`` of the inputs (see ``prepare_examples``).
            y: int64 class ids.

        Returns:
            ``(accuracy, loss)``: float64 arrays ``[B]``.
        """
        correct, loss = self._evaluate_counts(weights, features, y)
        n = int(features.shape[0])
        return correct.sum(1) / n, loss / n

    def _evaluate_counts(self, weights, features, y):
        """``evaluate_models``' sums: correct predictions per true class (int64 ``[B, C]``)
        and summed loss (``[B]``)."""
        b = int(weights[0].shape[0])
        n = int(features.shape[0])
        y = tf.constant(np.asarray(y), tf.int64)
        correct = np.zeros((b, self.fns.num_classes), np.int64)
        loss = np.zeros(b)
        weights = [tf.convert_to_tensor(w, tf.float32) for w in weights]
        for group in base.client_groups(b, min(self.eval_batch, b)):
            w = [tf.gather(v, group.indices) for v in weights]
            real = group.indices[:group.real]
            for i in range(0, n, EVAL_CHUNK):
                hits, total = self._eval_fn(w, features[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK])
                correct[real] += hits.numpy()[:group.real]
                loss[real] += total.numpy()[:group.real]
        return correct, loss

    def evaluate(self, x, y, features_ready=False, clients=True):
        """Test metrics of the aggregated model and of every client model.

        Args:
            x, y: test inputs (raw, or ``fns.features`` with ``features_ready``) and class ids.
            features_ready: ``x`` is already mapped by ``fns.features``.
            clients: also evaluate every client (K forward passes over the test set); False
                gives only ``val_loss`` and ``val_accuracy`` of the aggregate.

        Returns:
            Dict of ``val_loss``, ``val_accuracy`` (aggregate) and ``val_client_mean_accuracy``,
            ``val_client_min_accuracy``, ``val_client_max_accuracy``,
            ``val_client_worst10_accuracy``, ``val_client_local_accuracy`` (the mean over
            clients of each one's accuracy on its own label distribution: its per-class test
            accuracies weighted by its training label shares, which is what a local test set
            drawn like its training data measures under label skew, DisPFL's and other
            personalised methods' metric); with Byzantine clients or a defence also the honest
            clients' (``val_honest_*``). Per-client accuracies are kept in
            ``trainer.last_client_accuracy``.
        """
        if not features_ready:
            x, y = self.prepare_examples(x, y)
        aggregate = [w[None] for w in self.aggregated_weights()]
        agg_acc, agg_loss = (float(v[0]) for v in self.evaluate_models(aggregate, x, y))
        logs = {"val_loss": agg_loss, "val_accuracy": agg_acc}
        if clients:
            logs.update(self.evaluate_clients(x, y, features_ready=True))
        return logs

    def evaluate_clients(self, x, y, features_ready=False):
        """``evaluate``'s per-client metrics alone (every ``val_client_*`` and
        ``val_honest_*`` key), without the aggregate's loss and accuracy."""
        if not features_ready:
            x, y = self.prepare_examples(x, y)
        correct, _ = self._evaluate_counts(self.client_weights, x, y)
        client_acc = correct.sum(1) / int(x.shape[0])
        self.last_client_accuracy = client_acc
        logs = {"val_client_mean_accuracy": float(client_acc.mean()),
                "val_client_min_accuracy": float(client_acc.min()),
                "val_client_max_accuracy": float(client_acc.max()),
                "val_client_worst10_accuracy": worst_tenth(client_acc)}
        local = self._local_distribution_accuracy(correct, y)
        if local is not None:
            logs["val_client_local_accuracy"] = float(local[self.present_clients()].mean())
        if self.byzantine_clients is not None or self.defence is not None:
            logs.update(self._honest_metrics(x, y, client_acc))
        return logs

    def _local_distribution_accuracy(self, correct, y):
        """Each client's test accuracy reweighted to its training label distribution ``[K]``
        (classes absent from the test set dropped and the shares renormalised); None before
        ``fit`` has seen the clients."""
        share = self._client_label_share
        if share is None or len(share) != len(correct):
            return None
        per_class = np.bincount(np.asarray(y), minlength=correct.shape[1])
        share = share * (per_class > 0)
        share = share / np.maximum(share.sum(1, keepdims=True), 1e-12)
        return (share * correct / np.maximum(per_class, 1)).sum(1)

    def _honest_metrics(self, x, y, client_acc):
        """Accuracy of the honest clients: their aggregate (an oracle: the mean of the honest
        models only), their mean and their worst 10% (mean of the lowest tenth). Without
        Byzantine clients (a defence's cost) every client is honest."""
        byzantine = (np.zeros(len(client_acc), bool) if self.byzantine_clients is None
                     else self.byzantine_clients)
        honest = ~byzantine & self.present_clients()
        honest_aggregate = [w[None] for w in self.aggregated_weights(clients=honest)]
        acc = client_acc[honest]
        logs = {"val_honest_accuracy": float(self.evaluate_models(honest_aggregate, x, y)[0][0]),
                "val_honest_client_mean_accuracy": float(acc.mean()),
                "val_honest_client_worst10_accuracy": worst_tenth(acc)}
        if self.last_kept is not None and self.defence is not None and \
                self.defence.final == "robust":
            logs["aggregate_kept"] = float(len(self.last_kept))
            logs["aggregate_kept_byzantine"] = float(byzantine[self.last_kept].sum())
        return logs

    def tracing_counts(self):
        """How often each ``tf.function`` of the trainer and its executor's worker was traced.

        A count that grows after the first round means retracing (new shapes or Python values
        reaching a ``tf.function``), which costs seconds per round.

        Returns:
            Dict ``"owner.attribute" -> traces``.
        """
        return {**base.tracing_counts(trainer=self), **self.executor.tracing_counts()}
