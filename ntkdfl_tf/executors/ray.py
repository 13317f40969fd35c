"""RayExecutor: client groups on Ray actors, each with its own copy of the algorithm.

Each actor builds the model and the algorithm once and fetches the client data once from the
object store (on one node the data is shared memory, not copied per actor). Per round, only what
the per-group methods take and return crosses the object store: the group's weights in, the
new weights and logs out, plus small index arrays. Groups are dealt to actors in contiguous
blocks, so actor a always serves the same clients when the group order is fixed.

Actors are restartable (``max_restarts``) and their calls retried (``max_task_retries``): an
actor that dies mid-round is restarted, rebuilds its state from the object store, and the
calls it lost run again with the same inputs, so the round's results do not change.
"""

import os
import pickle
import uuid

import numpy as np
import ray


@ray.remote
class ClientShard:
    """One Ray actor: the model, a copy of the algorithm and the client data.

    The set-up travels with every call as an object-store reference plus a token, and the
    actor rebuilds only when the token changes. So actors are reused across ``fit`` calls, and
    an actor that Ray restarts rebuilds from the call that reaches it first.
    """

    def __init__(self, threads):
        import tensorflow as tf  # imported in the actor process

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.token, self.algorithm = None, None

    def _build(self, setup):
        import tensorflow as tf

        from ntkdfl_tf import functional
        from ntkdfl_tf.algorithms import base

        model_fn, blob, data = setup
        algorithm = pickle.loads(blob)
        fns = functional.ModelFunctions(model_fn())
        clients = base.ClientTensors(tf.constant(data["features"]), tf.constant(data["labels"]),
                                     tf.constant(data["mask"]), data["counts"])
        algorithm.init(fns, None, clients)
        return algorithm

    def pid(self):
        return os.getpid()

    def call(self, token, setup, method, shared, calls):
        if token != self.token:
            self.algorithm, self.token = self._build(setup), token
        fn = getattr(self.algorithm, method)
        return [fn(*shared, *c) for c in calls]


class RayExecutor:
    """Runs client groups on ``num_actors`` Ray actors.

    Args:
        num_actors: actors (each owns a contiguous block of client groups).
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``); None starts a local
            Ray instance on loopback with ``num_cpus`` CPUs.
        num_cpus: CPUs of a locally started instance (None: all).
        cpus_per_actor, gpus_per_actor: Ray resources of each actor (GPUs included).
        max_restarts: how often Ray may restart a dead actor.
        threads_per_actor: TensorFlow intra-op threads per actor. None keeps TensorFlow's
            default, as in the local process, so that on the same machine results equal the
            local executor's bit for bit. A different count changes the summation order of
            large matrix products (~1e-7), which training amplifies (DFedAvg at 300 clients:
            4e-5 after one round), so set it for speed, not for exact reproduction.
    """

    name = "ray"
    remote = True

    def __init__(self, num_actors=2, address=None, num_cpus=None, cpus_per_actor=1,
                 gpus_per_actor=0, max_restarts=3, threads_per_actor=None):
        if not isinstance(num_actors, (int, np.integer)) or num_actors < 1:
            raise ValueError(f"num_actors must be a positive integer, got {num_actors!r}.")
        if cpus_per_actor <= 0 or gpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor must be > 0 and gpus_per_actor >= 0, got "
                             f"{cpus_per_actor!r} and {gpus_per_actor!r}.")
        self.num_actors, self.address, self.num_cpus = int(num_actors), address, num_cpus
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.max_restarts, self.threads_per_actor = max_restarts, threads_per_actor
        self.actors = []
        self._bytes = 0

    def start(self, model_fn, algorithm, clients):
        """Starts Ray and the actors if needed, and ships this fit's set-up once."""
        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        data = {"features": clients.features.numpy(), "labels": clients.labels.numpy(),
                "mask": clients.mask.numpy(), "counts": np.asarray(clients.counts)}
        blob = ray.cloudpickle.dumps(algorithm)  # lambdas (schedules) included
        self._setup = ray.put((model_fn, blob, data))
        self._token = uuid.uuid4().hex
        if not self.actors:
            threads = self.threads_per_actor
            self.actors = [ClientShard.options(
                num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor,
                max_restarts=self.max_restarts, max_task_retries=-1).remote(threads)
                for _ in range(self.num_actors)]

    def map(self, method, calls, shared=()):
        """The calls dealt to the actors in contiguous blocks; results in call order."""
        if not self.actors:
            raise RuntimeError("RayExecutor.map before start(): use it through trainer.fit.")
        shared_ref = ray.put(shared)
        self._bytes += sum(_nbytes(shared) for _ in self.actors)
        blocks = np.array_split(np.arange(len(calls)), len(self.actors))
        futures = []
        for actor, block in zip(self.actors, blocks):
            if len(block):
                part = [calls[i] for i in block]
                self._bytes += _nbytes(part)
                futures.append(actor.call.remote(self._token, self._setup, method, shared_ref,
                                                 part))
        results = [r for part in ray.get(futures) for r in part]
        self._bytes += _nbytes(results)
        return results

    def pids(self):
        """Process ids of the actors (they change when Ray restarts one)."""
        return ray.get([a.pid.remote() for a in self.actors])

    def round_stats(self):
        """Bytes that crossed the object store since the last call (per round in the logs)."""
        stats, self._bytes = {"object_store_bytes": float(self._bytes)}, 0
        return stats

    def shutdown(self):
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 8
