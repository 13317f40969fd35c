"""DecentralizedTrainer: the fit loop. One communication round is one Keras epoch."""

import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from ntkdfl_tf import executors, functional
from ntkdfl_tf.algorithms import base
from ntkdfl_tf.data.client_data import ClientData
from ntkdfl_tf.errors import CheckpointError, DivergenceError
from ntkdfl_tf.faults import Faults

# Derived random streams: each is keyed by (root seed, stream, round), so a stream's draws do
# not depend on how many draws another stream made, and a resumed run needs only the seed.
STREAMS = {"init": 0, "partition": 1, "topology": 2, "sampling": 3, "failures": 4}


def stream_rng(seed, stream, round_index=0):
    """The NumPy generator of ``stream`` at ``round_index`` under root ``seed``."""
    return np.random.default_rng([int(seed), STREAMS[stream], int(round_index)])


def client_weight_spread(weights):
    """Mean over clients of the squared distance of their weights to the clients' average."""
    return float(tf.add_n([tf.reduce_sum(tf.square(w - tf.reduce_mean(w, 0, keepdims=True)))
                           for w in weights]).numpy() / int(weights[0].shape[0]))


class DecentralizedTrainer:
    """Trains one Keras architecture on many clients that talk over a graph, without a server.

    Client weights are stacked (one ``[K, *shape]`` tensor per trainable variable). ``fit`` runs
    one communication round per Keras epoch, so stock ``keras.callbacks`` work unchanged; they
    see ``trainer.model``, which holds the aggregated (client-averaged) weights after each round.

    Args:
        model_fn: function returning a fresh, built ``keras.Model`` that outputs logits.
        algorithm: an ``ntkdfl_tf.algorithms`` object, e.g. ``NTKDFL()``.
        topology: an ``ntkdfl_tf.topology`` object, e.g. ``RandomGraph(num_neighbors=5)``.
        seed: root seed; init, topology, sampling and failures use streams derived from it.
        eval_batch: clients evaluated together on the validation data.
        faults: an ``ntkdfl_tf.Faults`` (client dropout, departures, lost messages) or None.
        executor: where per-client work runs: ``"local"`` (this process), ``"ray"`` (Ray
            actors on a local instance) or an executor object such as
            ``ntkdfl_tf.executors.RayExecutor(num_actors=8, address="auto")``.
    """

    def __init__(self, model_fn, algorithm, topology, seed=0, eval_batch=16, faults=None,
                 executor="local"):
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a function returning a keras.Model, got {model_fn!r}.")
        if not isinstance(algorithm, base.Algorithm):
            raise TypeError(f"algorithm must be an ntkdfl_tf.algorithms object, got {algorithm!r}.")
        if not hasattr(topology, "draw"):
            raise TypeError(f"topology must be an ntkdfl_tf.topology object, got {topology!r}.")
        if not isinstance(eval_batch, (int, np.integer)) or eval_batch < 1:
            raise ValueError(f"eval_batch must be a positive integer, got {eval_batch!r}.")
        if faults is not None and not isinstance(faults, Faults):
            raise TypeError(f"faults must be an ntkdfl_tf.Faults or None, got {faults!r}.")
        self.algorithm, self.topology, self.seed = algorithm, topology, int(seed)
        self.faults = faults
        self.executor = executors.make_executor(executor)
        if self.executor.remote and getattr(algorithm, "order", None) == "sequential":
            raise ValueError("order='sequential' updates clients one after another in place; "
                             "it runs with executor='local' only (or use order='synchronous').")
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
        self.state = None
        self.round = 0
        self.last_client_accuracy = None
        # two shapes only (the aggregate, a client group): no relaxed trace, whose unknown
        # client axis the generic forward cannot unroll
        self._eval_fn = tf.function(self._eval_group)

    # -- data ---------------------------------------------------------------------------------
    def _client_tensors(self, clients):
        if isinstance(clients, (list, tuple)):
            clients = ClientData.from_arrays(clients)
        if not isinstance(clients, ClientData):
            raise TypeError("clients must be ClientData (from ntkdfl_tf.data partitioners) or a "
                            f"list of (x, y) pairs, got {type(clients).__name__}.")
        self._check_inputs(clients.x.reshape((-1,) + clients.x.shape[2:]), "client data")
        self._check_labels(clients.y, "client labels", ndim=2)
        c = self.fns.num_classes
        k, n_max = clients.y.shape
        flat = clients.x.reshape((k * n_max,) + clients.x.shape[2:])
        feats = tf.concat([self.fns.features(flat[i:i + 8192])
                           for i in range(0, len(flat), 8192)], 0)
        feats = tf.reshape(feats, [k, n_max] + feats.shape[1:].as_list())
        mask = tf.constant(clients.mask)
        labels = tf.one_hot(clients.y, c) * mask[..., None]
        return base.ClientTensors(feats, labels, mask, clients.counts)

    def _check_inputs(self, x, what):
        expected = tuple(self.model.input_shape[1:])
        got = tuple(np.shape(x)[1:])
        if got != expected:
            raise ValueError(f"The {what} have per-sample shape {got} but the model expects "
                             f"{expected}; reshape the data or change model_fn.")
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError(f"The {what} contain NaN or inf; clean the data first.")

    def _check_labels(self, y, what, ndim=1):
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
            initial_round=None):
        """Runs communication rounds.

        Args:
            clients: ClientData, or a list of per-client ``(x, y)`` pairs.
            rounds: the round to stop before (like Keras ``epochs``): rounds
                ``initial_round .. rounds-1`` run, so a second ``fit(rounds=20)`` after
                ``fit(rounds=10)`` continues with rounds 10..19.
            validation_data: ``(x, y)`` test data for the aggregated model and every client.
            callbacks: ``keras.callbacks.Callback`` objects; project callbacks that define
                ``set_trainer`` receive this trainer.
            verbose: 0 silent, 1 a progress bar per round, 2 one line per round.
            initial_round: round to start from; by default where the last ``fit`` stopped.

        Returns:
            A ``keras.callbacks.History`` with one entry per round.
        """
        if not isinstance(rounds, (int, np.integer)) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}.")
        tensors = self._client_tensors(clients)
        k = tensors.num_clients
        self.topology.validate(k)
        if self.faults is not None:
            self.faults.validate(k)
        if validation_data is not None:
            x_val, y_val = validation_data
            if len(x_val) == 0 or len(x_val) != len(y_val):
                raise ValueError(f"validation_data needs matching, non-empty x and y; got "
                                 f"{len(x_val)} and {len(y_val)} samples.")
            self._check_inputs(x_val, "validation inputs")
            self._check_labels(y_val, "validation labels")
            val = (self.fns.features(x_val), tf.constant(np.asarray(y_val), tf.int64))
        self.last_client_accuracy = None
        if self.client_weights is None or int(self.client_weights[0].shape[0]) != k:
            self.client_weights = [tf.constant(np.repeat(w[None], k, axis=0))
                                   for w in self.initial_weights]
            self.state = self.algorithm.init(self.fns, self.client_weights, tensors)
            self.round = 0
        else:
            self.algorithm.init(self.fns, self.client_weights, tensors)

        self.executor.start(self.model_fn, self.algorithm, tensors)
        for cb in callbacks or []:
            if hasattr(cb, "set_trainer"):
                cb.set_trainer(self)
        cb_list = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=verbose != 0, model=self.model,
            verbose=verbose, epochs=rounds, steps=1)
        self.model.stop_training = False
        self.model._initial_epoch = None
        self._set_model_to_aggregate()
        cb_list.on_train_begin()
        start = self.round if initial_round is None else int(initial_round)
        if self.model._initial_epoch:  # BackupAndRestore restored the aggregate: restart from it
            start = int(self.model._initial_epoch)
            self.client_weights = [tf.constant(np.repeat(v.numpy()[None], k, axis=0))
                                   for v in self.model.trainable_variables]
        if start >= rounds:
            warnings.warn(f"fit(rounds={rounds}) does nothing: the trainer is already at round "
                          f"{start}; pass a larger rounds to continue.")
        logs = {}
        for r in range(start, rounds):
            cb_list.on_epoch_begin(r)
            cb_list.on_train_batch_begin(0)
            t0 = time.perf_counter()
            adjacency = self.topology.draw(k, stream_rng(self.seed, "topology", r))
            active = None
            if self.faults is not None:
                active, adjacency = self.faults.apply(
                    adjacency, r, stream_rng(self.seed, "failures", r))
            weights, state, logs = self.algorithm.run_round(
                self.state, self.client_weights, adjacency, r, self.fns, tensors,
                stream_rng(self.seed, "sampling", r), self.executor)
            if active is not None:  # clients that sat out keep their weights
                keep = tf.constant(active)
                weights = [tf.where(tf.reshape(keep, [-1] + [1] * (w.shape.rank - 1)), w, old)
                           for w, old in zip(weights, self.client_weights)]
            logs = dict(logs)
            self._check_finite(weights, logs, r)
            self.client_weights, self.state = weights, state
            logs["round_seconds"] = time.perf_counter() - t0
            logs.update(self.executor.round_stats())
            logs["client_weight_spread"] = client_weight_spread(self.client_weights)
            if active is not None:
                logs["active_clients"] = float(active.sum())
            self.round = r + 1
            self._set_model_to_aggregate()
            cb_list.on_train_batch_end(0, logs)
            if validation_data is not None:
                logs.update(self.evaluate(*val, features_ready=True))
            cb_list.on_epoch_end(r, logs)
            if self.model.stop_training:
                break
        cb_list.on_train_end(logs)
        return self.model.history

    def _check_finite(self, weights, logs, r):
        """Raises DivergenceError naming the round and clients if anything is NaN or inf."""
        finite = np.ones(int(weights[0].shape[0]), bool)
        for w in weights:
            finite &= tf.reduce_all(tf.math.is_finite(tf.reshape(w, [w.shape[0], -1])),
                                    axis=1).numpy()
        bad_logs = [k for k, v in logs.items() if not np.isfinite(v)]
        if finite.all() and not bad_logs:
            return
        bad = np.flatnonzero(~finite).tolist()
        what = (f"client(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} have NaN/inf weights"
                if bad else f"the round's {', '.join(bad_logs)} is NaN/inf")
        raise DivergenceError(
            f"{self.algorithm.name} diverged in round {r + 1}: {what}. Nothing of this round was "
            f"kept (the last checkpoint, if any, is of round {r}); lower the learning rate.",
            round=r + 1, clients=bad)

    # -- state --------------------------------------------------------------------------------
    def get_state(self):
        """Everything needed to continue this run exactly (see ``ntkdfl_tf.checkpoint``)."""
        if self.client_weights is None:
            raise RuntimeError("No client models yet: call fit() first.")
        return {"round": int(self.round), "seed": self.seed, "streams": STREAMS,
                "algorithm": self.algorithm.name,
                "num_clients": int(self.client_weights[0].shape[0]),
                "weights": [w.numpy() for w in self.client_weights],
                "algorithm_state": [np.asarray(a) for a in tf.nest.flatten(self.state)]}

    def set_state(self, state, source="the checkpoint"):
        """Restores ``get_state()`` output; the trainer must be in ``fit`` or after it.

        Raises:
            CheckpointError: the state belongs to a run with another seed, algorithm, number
                of clients or model.
        """
        k = int(self.client_weights[0].shape[0])
        mine = {"seed": self.seed, "algorithm": self.algorithm.name, "num_clients": k,
                "streams": STREAMS}
        for key, value in mine.items():
            if state[key] != value:
                raise CheckpointError(
                    f"{source} is of a run with {key}={state[key]!r}, this run has {value!r}; "
                    "use another logdir, or --noresume to start afresh (overwriting it).")
        shapes = [tuple(w.shape) for w in self.client_weights]
        if [tuple(w.shape) for w in state["weights"]] != shapes:
            raise CheckpointError(f"{source} holds weights of another model (shapes "
                                  f"{[w.shape for w in state['weights']]}, this model {shapes}).")
        structure = tf.nest.flatten(self.state)
        if len(structure) != len(state["algorithm_state"]):
            raise CheckpointError(f"{source} holds another algorithm state layout.")
        self.client_weights = [tf.constant(w) for w in state["weights"]]
        self.state = tf.nest.pack_sequence_as(
            self.state, [tf.constant(a) for a in state["algorithm_state"]])
        self.round = int(state["round"])
        self._set_model_to_aggregate()

    # -- evaluation ---------------------------------------------------------------------------
    def present_clients(self):
        """Boolean [K]: clients that have not left the run (all without ``faults``)."""
        k = int(self.client_weights[0].shape[0])
        return (np.ones(k, bool) if self.faults is None
                else self.faults.present(k, self.round))

    def aggregated_weights(self):
        """The average of the present clients' weights, as a list of NumPy arrays."""
        if self.client_weights is None:
            raise RuntimeError("No client models yet: call fit() first.")
        present = self.present_clients()
        return [w.numpy()[present].mean(axis=0) for w in self.client_weights]

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
        logits = self.fns.forward(weights, feats)  # [B, N, C]
        correct = tf.cast(tf.equal(tf.argmax(logits, -1), y[None]), tf.float32)
        labels = tf.broadcast_to(tf.one_hot(y, self.fns.num_classes)[None], tf.shape(logits))
        loss = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
        return tf.reduce_mean(correct, -1), tf.reduce_mean(loss, -1)

    def evaluate(self, x, y, features_ready=False, clients=True):
        """Test metrics of the aggregated model and of every client model.

        Args:
            x, y: test inputs (raw, or ``fns.features`` with ``features_ready``) and class ids.
            features_ready: ``x`` is already mapped by ``fns.features``.
            clients: also evaluate every client (K forward passes over the test set); False
                gives only ``val_loss`` and ``val_accuracy`` of the aggregate.

        Returns:
            Dict of ``val_loss``, ``val_accuracy`` (aggregate) and ``val_client_mean_accuracy``,
            ``val_client_min_accuracy``, ``val_client_max_accuracy``; per-client accuracies are
            kept in ``trainer.last_client_accuracy``.
        """
        if not features_ready:
            self._check_inputs(x, "evaluation inputs")
            self._check_labels(y, "evaluation labels")
        agg = [tf.constant(w[None]) for w in self.aggregated_weights()]
        feats = x if features_ready else self.fns.features(x)
        y = tf.constant(np.asarray(y), tf.int64)
        chunks = range(0, int(feats.shape[0]), 2048)
        acc, loss = zip(*[self._eval_fn(agg, feats[i:i + 2048], y[i:i + 2048]) for i in chunks])
        sizes = np.array([min(2048, int(feats.shape[0]) - i) for i in chunks], np.float64)
        agg_acc = float(np.dot([a.numpy()[0] for a in acc], sizes) / sizes.sum())
        agg_loss = float(np.dot([l.numpy()[0] for l in loss], sizes) / sizes.sum())
        if not clients:
            return {"val_loss": agg_loss, "val_accuracy": agg_acc}
        k = int(self.client_weights[0].shape[0])
        client_acc = np.zeros(k)
        for idx, real in base.client_groups(k, min(self.eval_batch, k)):
            w = [tf.gather(v, idx) for v in self.client_weights]
            parts = [self._eval_fn(w, feats[i:i + 2048], y[i:i + 2048])[0].numpy() for i in chunks]
            client_acc[idx[:real]] = (np.stack(parts, 1) @ sizes / sizes.sum())[:real]
        self.last_client_accuracy = client_acc
        return {"val_loss": agg_loss, "val_accuracy": agg_acc,
                "val_client_mean_accuracy": float(client_acc.mean()),
                "val_client_min_accuracy": float(client_acc.min()),
                "val_client_max_accuracy": float(client_acc.max())}

    def tracing_counts(self):
        """How often each ``tf.function`` of the trainer, its algorithm and kernel has been traced.

        A count that grows after the first round means retracing (new shapes or Python values
        reaching a ``tf.function``), which costs seconds per round.

        Returns:
            Dict ``"owner.attribute" -> traces``.
        """
        owners = {"trainer": self, "algorithm": self.algorithm}
        kernel = getattr(self.algorithm, "_kernel", None)
        if kernel is not None:
            owners["kernel"] = kernel
        counts = {}
        for owner_name, owner in owners.items():
            for name, value in vars(owner).items():
                if hasattr(value, "experimental_get_tracing_count"):
                    counts[f"{owner_name}.{name}"] = int(value.experimental_get_tracing_count())
        return counts
