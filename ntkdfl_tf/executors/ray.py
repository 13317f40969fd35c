"""RayExecutor: calls on Ray actors; each actor runs one worker and holds its own clients' data.

Data placement follows the protocol. ``start`` puts every client's data in the object store as
its own object. (The driver reads the dataset; loading each block on its own node instead is
not implemented.) The first map of a ``fit`` deals the client groups to the actors in
contiguous blocks, and from then on actor a *owns* those clients (the calls' ``members``): it
fetches their data once per ``fit`` and keeps it. An actor also fetches the data of the clients
outside its block that its calls read (``call.reads``; NTK-DFL: the senders of the lazy Jacobian
packages its clients received, whose samples it evaluates at the receiver's averaged weights;
DFedAvg: none). It keeps them while the next map reads them too and drops
them when it does not, so an actor holds its block plus one round's neighbours. Weights go out
with each call and come back with the results.

Why samples rather than Jacobians cross between actors: a neighbour's Jacobian at w_bar_i is a
function of its samples and w_bar_i, which the receiver has, and it is C * P / d (~1,000x for
the MLP) times larger than the samples. ``bytes_sent`` in the logs still counts what the
protocol itself transmits.

Actors are restartable (``max_restarts``) and their calls retried (``max_task_retries``): an
actor that dies mid-round is restarted, reloads its block from the object store (the driver
owns those objects, so they outlive the actor), and the calls it lost run again with the same
inputs, so the round's results do not change.
"""

import os
import pickle
import uuid

import numpy as np
import ray

from ntkdfl_tf.algorithms import base


@ray.remote
class ClientShard:
    """One Ray actor: a worker of the algorithm and the data of the clients it serves.

    The set-up travels with every call as an object-store reference plus a token, and the
    actor rebuilds only when the token changes. So actors are reused across ``fit`` calls, and
    an actor that Ray restarts rebuilds from the call that reaches it first.
    """

    def __init__(self, threads):
        import tensorflow as tf  # imported in the actor process

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.token, self.worker, self.own_ids, self.clients = None, None, None, None

    def _build(self, setup):
        from ntkdfl_tf import functional

        model_fn, blob = setup
        return pickle.loads(blob).make_worker(functional.ModelFunctions(model_fn()))

    def pid(self):
        return os.getpid()

    def held_clients(self):
        """The clients whose data this actor holds now (its block and this round's reads)."""
        return [] if self.clients is None else sorted(self.clients.ids.tolist())

    def call(self, token, setup, context, calls, own_ids, own_refs, read_ids, read_refs):
        import tensorflow as tf

        if token != self.token:
            self.worker, self.token, self.own_ids = self._build(setup), token, None
        if self.own_ids is None or not np.array_equal(self.own_ids, own_ids):
            # this fit's block, stacked once and kept
            self.own_ids, self.own = np.asarray(own_ids, np.int64), _stack(ray.get(own_refs))
            self.extra, self.clients = {}, None
        # other clients' data: fetch what is new, drop what this map no longer reads
        new = [i for i, c in enumerate(read_ids) if c not in self.extra]
        fetched = dict(zip((read_ids[i] for i in new), ray.get([read_refs[i] for i in new])))
        self.extra = {c: self.extra[c] if c in self.extra else fetched[c] for c in read_ids}
        ids = np.concatenate([self.own_ids, np.asarray(read_ids, np.int64)])
        if self.clients is None or not np.array_equal(self.clients.ids, ids):
            fields = self.own
            if read_ids:
                extra = _stack([self.extra[c] for c in read_ids])
                fields = [tf.concat([o, e], 0) for o, e in zip(self.own[:3], extra[:3])] + [
                    np.concatenate([self.own[3], extra[3]])]
            self.clients = base.ClientTensors(*fields, ids)
            self.worker.bind(self.clients)
        return [self.worker.run(context, c) for c in calls]

    def tracing_counts(self):
        return {} if self.worker is None else self.worker.tracing_counts()


def _stack(data):
    """Per-client ``(features, labels, mask, count)`` objects -> three tensors and counts."""
    import tensorflow as tf

    return [tf.constant(np.stack([d[f] for d in data])) for f in range(3)] + [
        np.array([d[3] for d in data], np.int64)]


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
        base.positive_int("num_actors", num_actors)
        if cpus_per_actor <= 0 or gpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor must be > 0 and gpus_per_actor >= 0, got "
                             f"{cpus_per_actor!r} and {gpus_per_actor!r}.")
        self.num_actors, self.address, self.num_cpus = int(num_actors), address, num_cpus
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.max_restarts, self.threads_per_actor = max_restarts, threads_per_actor
        self.actors = []
        self._bytes = self._data_bytes = 0

    def start(self, algorithm, clients, fns=None, model_fn=None):
        """Starts Ray and the actors if needed; puts each client's data in the object store.

        Each actor builds its own worker from ``model_fn`` and the pickled ``algorithm``.
        """
        del fns  # actors build their own model functions
        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        arrays = [t.numpy() for t in (clients.features, clients.labels, clients.mask)]
        self._client_refs = [ray.put(tuple(t[i] for t in arrays) + (int(clients.counts[i]),))
                             for i in range(clients.num_clients)]
        self._client_bytes = np.array([sum(t[i].nbytes for t in arrays)
                                       for i in range(clients.num_clients)])
        blob = ray.cloudpickle.dumps(algorithm)  # lambdas (schedules) included
        self._setup = ray.put((model_fn, blob))
        self._token = uuid.uuid4().hex
        if not self.actors:
            threads = self.threads_per_actor
            self.actors = [ClientShard.options(
                num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor,
                max_restarts=self.max_restarts, max_task_retries=-1).remote(threads)
                for _ in range(self.num_actors)]
        self._own = [None] * len(self.actors)  # set by the first map: the blocks they serve
        self._extra = [np.zeros(0, np.int64)] * len(self.actors)

    @staticmethod
    def _members_and_reads(calls):
        """Sorted global ids of the clients ``calls`` compute and of those whose data they read."""
        return (np.unique(np.concatenate([c.members for c in calls])).astype(np.int64),
                np.unique(np.concatenate([c.reads for c in calls])).astype(np.int64))

    def map(self, context, calls, progress=None):
        """The calls dealt to the actors in contiguous blocks; results in call order.

        ``progress(done)``, if given, is called with the number of calls done whenever an
        actor's block comes back.

        An actor's first block of calls in a fit fixes the clients it owns (their data stays on
        it for the fit; if later maps deal differently, their clients are fetched as others').
        Other clients' data that its calls read is fetched when first needed, kept while the
        next map reads it too, and dropped when it does not.
        """
        if not self.actors:
            raise RuntimeError("RayExecutor.map before start(): use it through trainer.fit.")
        context_ref = ray.put(context)
        self._bytes += sum(_nbytes(context) for _ in self.actors)
        blocks = np.array_split(np.arange(len(calls)), len(self.actors))
        futures, sizes = [], {}
        for a, (actor, block) in enumerate(zip(self.actors, blocks)):
            if not len(block):
                continue
            part = [calls[i] for i in block]
            members, reads = self._members_and_reads(part)
            if self._own[a] is None:  # this fit's first map: the actor's block
                self._own[a] = members
                self._data_bytes += int(self._client_bytes[members].sum())
            own = self._own[a]
            extra = np.setdiff1d(reads, own).astype(np.int64)
            # counted when first sent; the actor keeps what the next map reads again
            self._data_bytes += int(self._client_bytes[np.setdiff1d(extra, self._extra[a])].sum())
            self._extra[a] = extra
            self._bytes += _nbytes(part)
            futures.append(actor.call.remote(
                self._token, self._setup, context_ref, part, own,
                [self._client_refs[i] for i in own], extra.tolist(),
                [self._client_refs[i] for i in extra]))
            sizes[futures[-1]] = len(block)
        pending, done = list(futures), 0
        while progress is not None and pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += sum(sizes[f] for f in ready)
            progress(done)
        results = [r for part in ray.get(futures) for r in part]
        self._bytes += _nbytes(results)
        return results

    def pids(self):
        """Process ids of the actors (they change when Ray restarts one)."""
        return ray.get([a.pid.remote() for a in self.actors])

    def held_clients(self):
        """Per actor, the clients whose data it holds after the last map."""
        return ray.get([a.held_clients.remote() for a in self.actors])

    def tracing_counts(self):
        """Trace counts of the first actor's worker (every actor runs the same calls)."""
        return ray.get(self.actors[0].tracing_counts.remote()) if self.actors else {}

    def round_stats(self):
        """Bytes that crossed the object store since the last call (per round in the logs).

        ``object_store_bytes`` counts all of it; ``client_data_bytes`` the part that is client
        data: each actor's own block once per fit, then other clients' samples when an actor
        first needs them (what a restarted actor fetches again is not counted).
        """
        stats = {"object_store_bytes": float(self._bytes + self._data_bytes),
                 "client_data_bytes": float(self._data_bytes)}
        self._bytes = self._data_bytes = 0
        return stats

    def shutdown(self):
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _nbytes(obj):
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if obj is None:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 8
