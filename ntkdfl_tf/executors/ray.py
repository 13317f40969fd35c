"""RayExecutor: calls on Ray actors; each actor runs one worker and holds its own clients' data.

Data placement follows the protocol. ``start`` puts one small object per client in the object
store, and each actor turns those it needs into its clients' tensors:

* **Data with a source** (``ClientData.with_source(DatasetSource(...))``, which
  ``experiment.run`` attaches when it loaded the dataset by name): the object is the client's
  sample indices and a digest of its samples. The actor loads the dataset split from the files on
  its own node (``nd.data.load``; once per actor, kept), gathers the rows, checks them against the
  digest and computes the features itself. The samples never cross the object store.
* **Data given as arrays** (no source, or ``load_on_actors=False``): the object is the client's
  features, one-hot labels, mask and count.

The first map of a ``fit`` deals the client groups to the actors in
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

Actors can run on several nodes (``address=`` of a cluster; ``scheduling_strategy="SPREAD"`` or
one ``NodeAffinitySchedulingStrategy`` per actor to place them). Actors are restartable
(``max_restarts``) and their calls retried (``max_task_retries``): an actor that dies mid-round is
restarted, rebuilds its block from the per-client objects (the driver owns them, so they outlive
the actor), and the calls it lost run again with the same inputs, so the round's results do not
change.
"""

import os
import pickle
import uuid

import numpy as np
import ray

from ntkdfl_tf.algorithms import base
from ntkdfl_tf.data.client_data import ClientData
from ntkdfl_tf.data.source import client_digests


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
        self.fns, self.loader = None, None
        self.dataset_source, self.dataset = None, None  # the split loaded from files, kept

    def _build(self, setup):
        from ntkdfl_tf import functional

        model_fn, blob, self.loader = setup
        self.fns = functional.ModelFunctions(model_fn())
        return pickle.loads(blob).make_worker(self.fns)

    def pid(self):
        return os.getpid()

    def node_id(self):
        """The Ray node this actor runs on (hex)."""
        return ray.get_runtime_context().get_node_id()

    def _load_dataset(self, source):
        """The source's ``(x, y)``, read from this node's files once and kept for later fits."""
        if self.dataset_source != source:
            self.dataset = None  # drop the old split before reading the new one
            try:
                self.dataset = source.load()
            except Exception as e:  # any failure means: this node cannot read the files
                raise RuntimeError(
                    f"Actor on node {self.node_id()[:12]} could not load {source.name} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); put the "
                    "dataset files on every node (DatasetSource.data_dir or $NTKDFL_DATA_DIR) "
                    "or pass RayExecutor(load_on_actors=False).") from e
            self.dataset_source = source
        return self.dataset

    def _client_rows(self, ids, objects):
        """Fetched per-client objects -> per-client ``(features, labels, mask, count)``.

        Arrays pass through; ``(indices, digest)`` pairs become rows of the dataset this actor
        loads itself, checked against the driver's digests.
        """
        if self.loader is None or not len(objects):
            return objects
        source, max_samples = self.loader
        x, y = self._load_dataset(source)
        data = ClientData.from_indices(x, y, [o[0] for o in objects], max_samples=max_samples)
        differ = [int(c) for c, o, d in zip(ids, objects, client_digests(data.x, data.y))
                  if o[1] != d]
        if differ:
            raise ValueError(
                f"Clients {differ[:10]} loaded from {source} on node {self.node_id()[:12]} differ "
                "from the driver's samples: the ClientData's source does not match its indices "
                "or that node's files differ; fix the source or pass "
                "RayExecutor(load_on_actors=False).")
        tensors = base.ClientTensors.from_client_data(data, self.fns)
        fields = [t.numpy() for t in (tensors.features, tensors.labels, tensors.mask)]
        return [tuple(f[k] for f in fields) + (int(data.counts[k]),) for k in range(len(objects))]

    def held_clients(self):
        """The clients whose data this actor holds now (its block and this round's reads)."""
        return [] if self.clients is None else sorted(self.clients.ids.tolist())

    def call(self, token, setup, context, calls, own_ids, own_refs, read_ids, read_refs):
        import tensorflow as tf

        if token != self.token:
            self.worker, self.token, self.own_ids = self._build(setup), token, None
        if self.own_ids is None or not np.array_equal(self.own_ids, own_ids):
            # this fit's block, stacked once and kept
            own = _stack(self._client_rows(own_ids, ray.get(own_refs)))
            self.own_ids, self.own = np.asarray(own_ids, np.int64), own
            self.extra, self.clients = {}, None
        # other clients' data: fetch what is new, drop what this map no longer reads
        new = [i for i, c in enumerate(read_ids) if c not in self.extra]
        new_ids = [read_ids[i] for i in new]
        fetched = dict(zip(new_ids, self._client_rows(new_ids,
                                                      ray.get([read_refs[i] for i in new]))))
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
        address: an existing cluster (``"auto"``, ``"<head ip>:6379"``, ``"ray://host:10001"``);
            None starts a local Ray instance on loopback with ``num_cpus`` CPUs.
        num_cpus: CPUs of a locally started instance (None: all).
        cpus_per_actor, gpus_per_actor: Ray resources of each actor (GPUs included).
        max_restarts: how often Ray may restart a dead actor.
        threads_per_actor: TensorFlow intra-op threads per actor. None keeps TensorFlow's
            default, as in the local process, so that on the same machine results equal the
            local executor's bit for bit. A different count changes the summation order of
            large matrix products (~1e-7), which training amplifies (DFedAvg at 300 clients:
            4e-5 after one round), so set it for speed, not for exact reproduction.
        load_on_actors: for ClientData with a source (``ClientData.with_source``), send the
            actors the clients' sample indices and let each load the dataset files on its node;
            False ships the samples through the object store as for data given as arrays.
        scheduling_strategy: where Ray places the actors: None (Ray's default: pack),
            ``"SPREAD"`` (across nodes), or a list of one strategy per actor (e.g.
            ``ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id, soft=False)``
            to pin actor a to a node).
    """

    name = "ray"
    remote = True

    def __init__(self, num_actors=2, address=None, num_cpus=None, cpus_per_actor=1,
                 gpus_per_actor=0, max_restarts=3, threads_per_actor=None, load_on_actors=True,
                 scheduling_strategy=None):
        base.positive_int("num_actors", num_actors)
        if cpus_per_actor <= 0 or gpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor must be > 0 and gpus_per_actor >= 0, got "
                             f"{cpus_per_actor!r} and {gpus_per_actor!r}.")
        if isinstance(scheduling_strategy, (list, tuple)) and \
                len(scheduling_strategy) != num_actors:
            raise ValueError(f"scheduling_strategy lists {len(scheduling_strategy)} strategies "
                             f"for {num_actors} actors; give one per actor or a single one.")
        self.num_actors, self.address, self.num_cpus = int(num_actors), address, num_cpus
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.max_restarts, self.threads_per_actor = max_restarts, threads_per_actor
        self.load_on_actors = bool(load_on_actors)
        self.scheduling_strategy = scheduling_strategy
        self.actors = []
        self.actors_load_data = False  # this fit: actors read the dataset files themselves
        self._bytes = self._data_bytes = 0

    def start(self, algorithm, clients, fns=None, model_fn=None, data=None):
        """Starts Ray and the actors if needed; puts one object per client in the object store.

        Each actor builds its own worker from ``model_fn`` and the pickled ``algorithm``. If
        ``data`` (the ClientData behind ``clients``) has a source and ``load_on_actors`` is on,
        a client's object is its sample indices and a digest of its samples, and the actors load
        the samples from the dataset files; otherwise it is the client's tensors.
        """
        del fns  # actors build their own model functions
        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        self.actors_load_data = bool(self.load_on_actors and data is not None
                                     and data.source is not None)
        if self.actors_load_data:
            if data.num_clients != clients.num_clients:
                raise ValueError(f"data has {data.num_clients} clients but the tensors "
                                 f"{clients.num_clients}; pass the ClientData they came from.")
            objects = list(zip(data.indices, client_digests(data.x, data.y)))
            loader = (data.source, data.max_samples)
            self._client_bytes = np.array([i.nbytes + len(d) for i, d in objects])
        else:
            arrays = [t.numpy() for t in (clients.features, clients.labels, clients.mask)]
            objects = [tuple(t[i] for t in arrays) + (int(clients.counts[i]),)
                       for i in range(clients.num_clients)]
            loader = None
            self._client_bytes = np.array([sum(t[i].nbytes for t in arrays)
                                           for i in range(clients.num_clients)])
        self._client_refs = [ray.put(o) for o in objects]
        blob = ray.cloudpickle.dumps(algorithm)  # lambdas (schedules) included
        self._setup = ray.put((model_fn, blob, loader))
        self._token = uuid.uuid4().hex
        if not self.actors:
            strategies = self.scheduling_strategy
            if not isinstance(strategies, (list, tuple)):
                strategies = [strategies] * self.num_actors
            self.actors = [ClientShard.options(
                num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor,
                max_restarts=self.max_restarts, max_task_retries=-1,
                **({} if strategy is None else {"scheduling_strategy": strategy})
            ).remote(self.threads_per_actor) for strategy in strategies]
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

    def node_ids(self):
        """The Ray node (hex id) each actor runs on."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def held_clients(self):
        """Per actor, the clients whose data it holds after the last map."""
        return ray.get([a.held_clients.remote() for a in self.actors])

    def tracing_counts(self):
        """Trace counts of the first actor's worker (every actor runs the same calls)."""
        return ray.get(self.actors[0].tracing_counts.remote()) if self.actors else {}

    def round_stats(self):
        """Bytes that crossed the object store since the last call (per round in the logs).

        ``object_store_bytes`` counts all of it; ``client_data_bytes`` the part that is client
        data: each actor's own block once per fit, then other clients' data when an actor
        first needs them (what a restarted actor fetches again is not counted). When the actors
        load the samples from files, a client's data here is its indices (8 bytes a sample) and
        a 16-byte digest.
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
