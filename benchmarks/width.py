"""NTK-DFL against the MLP's hidden width: seconds per round, peak RSS, kernel share, accuracy.

    python benchmarks/width.py
    python benchmarks/width.py --widths=10,50,100,200,400 --clients=30 --rounds=3
    python benchmarks/width.py --widths=10,50 --clients=6 --rounds=2   # smoke run

For each hidden width w (ascending), trains the MLP 784-w-10 with NTK-DFL in the settings of
``common.define_setting_flags`` (Jacobian batching m = 6, 5 clients per call, XLA-compiled
dopri5 flow, kernel "auto" = the closed-form dense kernel) on Fashion-MNIST (Dirichlet alpha = 0.1, 200 samples per
client, random kappa = 5 regular graph, seed 0, the same partition and graphs for every width)
and prints one JSON line:

    round_seconds_median   median round time after the warm-up round (training only: the
                           test set is evaluated once, after the last round, outside the timing)
    kernel_seconds_median  time spent computing the traced NTK per round (median after warm-up)
    kernel_share_median    kernel_seconds / round_seconds, per round, median after warm-up
    peak_rss_mb            ru_maxrss after this width; it is the PROCESS-WIDE maximum so far,
                           which is why widths run in increasing order (the largest model comes
                           last); peak_rss_before_mb is the same figure before this width started
    val_accuracy           the aggregated model (mean of all clients) on the 10,000 test images
                           after the last round (what fit(validation_data=test) logs as
                           val_accuracy for that round)
    euler_substeps         per round, mean integrator steps per grid step (``flow``)
    flow_fallbacks         per round, slices whose adaptive flow was redone with the bound step

How the kernel time is measured (directly, not modelled): NTK-DFL's worker evaluates the
kernel once per slice and client group, eagerly from Python in ``run``. The benchmark's
algorithm builds its worker as NTK-DFL does, then wraps the worker's ``kernel`` with a timer of
its eager calls. Eager TensorFlow on CPU runs synchronously; each timed call also fetches one
element of its result to be sure.
"""

import dataclasses
import functools
import json
import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import common
import ntkdfl_tf as nd
from common import peak_rss_mb

common.define_setting_flags(clients=30)
flags.DEFINE_list("widths", ["10", "50", "100", "200", "400"], "Hidden widths (run ascending).")
flags.DEFINE_integer("rounds", 3, "Rounds per width; the first is a warm-up (tracing, XLA).")
FLAGS = flags.FLAGS


class _Timed:
    """Wraps a callable; accumulates wall time and count of its eager calls."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls, self.shape = fn, 0.0, 0, None

    def __call__(self, weights, feats, mask):
        if not tf.executing_eagerly():  # being traced into another tf.function: not timed here
            return self.fn(weights, feats, mask)
        t0 = time.perf_counter()
        out = self.fn(weights, feats, mask)
        out[(0,) * out.shape.rank].numpy()  # make sure the computation has finished
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.shape = tuple(feats.shape[:2])  # (clients in the call, neighbourhood slots x N)
        return out


_KERNELS = []  # the timed kernel of every worker built, newest last


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimedNTKDFL(nd.algorithms.NTKDFL):
    """NTK-DFL whose worker's kernel evaluations are timed (see the module docstring)."""

    def make_worker(self, fns):
        worker = super().make_worker(fns)
        worker.kernel = _Timed(worker.kernel)
        _KERNELS.append(worker.kernel)
        return worker


class _PerRound(keras.callbacks.Callback):
    """Cumulative kernel timers at the end of every round."""

    def __init__(self):
        super().__init__()
        self.snapshots = [(0.0, 0)]

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append((_KERNELS[-1].seconds, _KERNELS[-1].calls))


def run_width(width, clients, test):
    base = common.ntkdfl()
    algorithm = TimedNTKDFL(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    trainer = nd.DecentralizedTrainer(functools.partial(nd.models.mlp, hidden=(width,)),
                                      algorithm, nd.topology.RandomGraph(FLAGS.num_neighbors),
                                      seed=FLAGS.seed)
    rss_before = peak_rss_mb()
    per_round = _PerRound()
    history = trainer.fit(clients, rounds=FLAGS.rounds, verbose=0, callbacks=[per_round])
    times = history.history["round_seconds"]
    snaps = np.diff(np.array(per_round.snapshots), axis=0)  # per round: kernel s, calls
    kernel = snaps[:, 0]
    timed = slice(1, None) if len(times) > 1 else slice(None)  # after the warm-up round
    accuracy = trainer.evaluate(*test, clients=False)["val_accuracy"]
    line = {
        "width": width, "params": trainer.fns.num_params, "clients": clients.num_clients,
        "rounds": len(times), "kappa": FLAGS.num_neighbors,
        "samples_per_client": FLAGS.samples_per_client,
        "kernel_call_shape": list(_KERNELS[-1].shape or ()),
        "round_seconds_median": round(statistics.median(times[timed]), 3),
        "round_seconds": [round(t, 3) for t in times],
        "kernel_seconds_median": round(float(np.median(kernel[timed])), 3),
        "kernel_share_median": round(float(np.median(kernel[timed] / np.array(times)[timed])), 3),
        "kernel_seconds": [round(float(s), 3) for s in kernel],
        "kernel_calls_per_round": int(snaps[-1, 1]),
        "peak_rss_mb": round(peak_rss_mb()), "peak_rss_before_mb": round(rss_before),
        "val_accuracy": round(accuracy, 4),
        "euler_substeps": [round(s, 2) for s in history.history["euler_substeps"]],
        "flow_fallbacks": [int(f) for f in history.history.get("flow_fallbacks", [])],
        "jacobian_batches": FLAGS.jacobian_batches, "client_batch": FLAGS.client_batch,
        "jit_compile": FLAGS.jit_compile, "flow": FLAGS.flow,
    }
    print(json.dumps(line), flush=True)


def main(argv):
    del argv
    clients, test = common.load_partition()
    for width in sorted(int(w) for w in FLAGS.widths if w):  # ascending: ru_maxrss only grows
        run_width(width, clients, test)


if __name__ == "__main__":
    app.run(main)
