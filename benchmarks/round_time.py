"""Seconds per round and peak RSS, NTK-DFL against DFedAvg, measured side by side in one run.

    python benchmarks/round_time.py --clients=50,100,300 --rounds=3
    python benchmarks/round_time.py --clients= --kappas=2,5,10 --samples_per_client=100,200,400
    python benchmarks/round_time.py --clients=60 --taus=10,20,30,40,50,60,80   # the flow's share
    python benchmarks/round_time.py --clients=60 --rounds=3 --algorithms=ntk_dfl \
        --tau_search=full,early_stop   # the tau grid's search, side by side
    python benchmarks/round_time.py --clients=300 --parallel_calls=1,2   # calls in flight

Prints one JSON line per (algorithm, clients): the median round time after one warm-up round
(Fashion-MNIST, alpha=0.1, kappa=5, MLP 784-100-10, 200 samples per client; training only, no
evaluation), the peak RSS so far, the mean integrator steps per grid step (``euler_substeps``,
of ``--flow``), and the ``tf.function`` trace counts
after the warm-up round and after the last (equal: no retracing), and the resident memory after
each round (flat: no growth). Then the ratio of NTK-DFL's
median to DFedAvg's (5 local epochs by default, as the performance issue asks). Several
``--tau_search`` values time NTK-DFL once each (same partition and seed), with the candidates
each round's calls evaluated (``candidates_evaluated``) and the mean chosen tau. The sweeps time
the NTK-DFL round at ``--sweep_clients`` clients for each kappa and each samples-per-client.
Several ``--parallel_calls`` repeat the client-count measurements (every algorithm) with that
many calls in flight (``LocalExecutor(parallel_calls=...)``), in the order given.
"""

import json
import statistics

import keras
from absl import app, flags

import ntkdfl_tf as nd
from common import peak_rss_mb, rss_mb
from ntkdfl_tf import experiment

flags.DEFINE_list("clients", ["50", "100", "300"], "Client counts (empty: skip).")
flags.DEFINE_list("algorithms", ["ntk_dfl", "dfedavg"], "Algorithms (first is the numerator).")
flags.DEFINE_integer("rounds", 3, "Rounds per measurement; the first is a warm-up.")
flags.DEFINE_integer("num_neighbors", 5, "kappa.")
flags.DEFINE_integer("local_epochs", 5, "Local epochs of every local-SGD baseline, D-PSGD "
                     "included.")
flags.DEFINE_integer("jacobian_batches", 6, "NTK-DFL Jacobian batching m (1: off).")
flags.DEFINE_list("client_batch", ["5"], "NTK-DFL clients per TensorFlow call (5: the presets'); "
                  "several values are timed one after another, each against the same baseline "
                  "rounds.")
flags.DEFINE_list("parallel_calls", ["1"], "Calls in flight at once for every algorithm "
                  "(LocalExecutor; 0: one per CPU core); several: each in turn.")
flags.DEFINE_bool("jit_compile", True, "NTK-DFL: XLA-compile the evolution.")
flags.DEFINE_string("flow", "dopri5", "NTK-DFL flow integrator: dopri5, exact, rkc, "
                    "euler_adaptive or euler_bound.")
flags.DEFINE_list("taus", None, "NTK-DFL candidate grid (default: NTK-DFL.md's); a shorter grid "
                  "shortens the flow, which shows the flow's share of the round.")
flags.DEFINE_list("tau_search", ["full"], "NTK-DFL tau search(es): full, early_stop; several "
                  "are timed one after another.")
flags.DEFINE_list("kappas", [], "Sweep: NTK-DFL round time for each kappa.")
flags.DEFINE_list("samples_per_client", [], "Sweep: NTK-DFL round time per samples/client.")
flags.DEFINE_integer("sweep_clients", 50, "Clients in the sweeps.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
FLAGS = flags.FLAGS


def make_algorithm(name, client_batch, tau_search="full"):
    """The algorithm as the launchers build it (``experiment.make_algorithm``)."""
    fields = dict(algorithm=name, jacobian_batches=FLAGS.jacobian_batches,
                  client_batch=client_batch, jit_compile=FLAGS.jit_compile,
                  flow=FLAGS.flow, local_epochs=FLAGS.local_epochs, tau_search=tau_search)
    if FLAGS.taus:
        fields["taus"] = tuple(int(t) for t in FLAGS.taus)
    return experiment.make_algorithm(experiment.Config(**fields))


class _Traces(keras.callbacks.Callback):
    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.counts, self.rss = trainer, [], []

    def on_epoch_end(self, epoch, logs=None):
        self.counts.append(sum(self.trainer.tracing_counts().values()))
        self.rss.append(rss_mb())


def time_rounds(name, clients, kappa, client_batch=None, tau_search=None, parallel_calls=1,
                **fields):
    client_batch = client_batch or int(FLAGS.client_batch[0])
    tau_search = tau_search or FLAGS.tau_search[0]
    trainer = nd.DecentralizedTrainer(
        nd.models.mlp, make_algorithm(name, client_batch, tau_search),
        nd.topology.RandomGraph(kappa), seed=0,
        executor=nd.executors.LocalExecutor(parallel_calls=parallel_calls))
    if parallel_calls != 1:
        fields["parallel_calls"] = parallel_calls
    traces = _Traces(trainer)
    history = trainer.fit(clients, rounds=FLAGS.rounds, verbose=0, callbacks=[traces])
    times = history.history["round_seconds"]
    line = {"algorithm": name, "clients": clients.num_clients, "kappa": kappa, **fields,
            "round_seconds_median": round(statistics.median(times[1:]), 3),
            "round_seconds": [round(t, 3) for t in times], "peak_rss_mb": round(peak_rss_mb()),
            "traces_after_warmup": traces.counts[0], "traces_after_last": traces.counts[-1],
            "rss_mb_after_each_round": [round(r) for r in traces.rss]}
    if name == "ntk_dfl":
        line.update(jacobian_batches=FLAGS.jacobian_batches, client_batch=client_batch,
                    jit_compile=FLAGS.jit_compile, flow=FLAGS.flow,
                    taus=list(trainer.algorithm.taus), tau_search=tau_search,
                    euler_substeps=[round(s, 2) for s in history.history["euler_substeps"]],
                    candidates_evaluated=[round(c, 2) for c in
                                          history.history["candidates_evaluated"]],
                    tau=[round(t, 1) for t in history.history["tau"]],
                    loss=[round(v, 4) for v in history.history["loss"]])
    else:
        line["local_epochs"] = FLAGS.local_epochs
    print(json.dumps(line), flush=True)
    return line["round_seconds_median"]


def main(argv):
    del argv
    (x, y), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    for k, p in ((int(c), int(p)) for p in FLAGS.parallel_calls for c in FLAGS.clients if c):
        clients = nd.data.dirichlet_partition(x, y, k, 0.1, seed=0, samples_per_client=200)
        first, *rest = FLAGS.algorithms
        medians = {name: time_rounds(name, clients, FLAGS.num_neighbors, parallel_calls=p)
                   for name in rest}
        for batch, search in ((int(b), t) for b in FLAGS.client_batch
                              for t in FLAGS.tau_search):
            median = time_rounds(first, clients, FLAGS.num_neighbors, client_batch=batch,
                                 tau_search=search, parallel_calls=p)
            for other in rest:
                print(json.dumps({"clients": k, "ratio": f"{first}/{other}",
                                  "client_batch": batch, "tau_search": search,
                                  "parallel_calls": p,
                                  "value": round(median / medians[other], 2)}), flush=True)
    k = FLAGS.sweep_clients
    if FLAGS.kappas:
        clients = nd.data.dirichlet_partition(x, y, k, 0.1, seed=0, samples_per_client=200)
        for kappa in (int(v) for v in FLAGS.kappas):
            time_rounds("ntk_dfl", clients, kappa, sweep="kappa")
    for spc in (int(v) for v in FLAGS.samples_per_client):
        clients = nd.data.dirichlet_partition(x, y, k, 0.1, seed=0, samples_per_client=spc)
        time_rounds("ntk_dfl", clients, FLAGS.num_neighbors, sweep="samples_per_client",
                    samples_per_client=spc)


if __name__ == "__main__":
    app.run(main)
