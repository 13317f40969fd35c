"""One compiled NTK-DFL slice call (flow, candidates, tau choice): full grid, early stop, MSE.

    python benchmarks/tau_search_call.py --batch=1,30 --calls=5
    python benchmarks/tau_search_call.py --batch=1,30 --taus=100,200,300   # the earliest stop
    python benchmarks/tau_search_call.py --batch=30 --variants=full,mse     # the MSE closed form

Real Fashion-MNIST neighbourhoods (alpha = 0.1, each of ``--members`` clients contributing
``--per_client`` samples, as one Jacobian-batching slice of paper_fast holds), the MLP's initial
weights, ``--learning_rate`` as the grid step and the default tau grid. For each client batch B
the two searches' workers are compiled (XLA) on the same inputs and timed alternately; the
kernel is formed outside the timed call. Prints one JSON line per (B, variant): the median
seconds per call, the candidates the call evaluated and the chosen taus' mean. Variants:
``full`` and ``early_stop`` (the two tau searches, cross-entropy), ``rkc`` (``full`` with
``flow="rkc"``), ``mse`` (the MSE loss's
closed form, one eigendecomposition per call; never under XLA, so with ``mse`` one more line
times the batch's eigendecomposition alone under XLA and without it), and ``full_taped``
(``full`` with every candidate's weights from a VJP and a forward pass, as before the input
gram's shortcut, ``kernels.dense.candidate_logits``).
"""

import json
import statistics
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("batch", ["1", "30"], "Clients per call B.")
flags.DEFINE_integer("members", 6, "Clients per neighbourhood (kappa + 1).")
flags.DEFINE_integer("per_client", 34, "Samples each member contributes (200 / m, m = 6).")
flags.DEFINE_integer("calls", 5, "Timed calls per search, after one warm-up call.")
flags.DEFINE_float("learning_rate", 0.01, "Grid step eta.")
flags.DEFINE_list("taus", None, "Candidate grid (default: NTKDFL's); e.g. 100,200,300 times "
                  "what a call costs when every client stops at the earliest.")
flags.DEFINE_bool("jit_compile", True, "XLA-compile the call.")
flags.DEFINE_list("variants", ["full", "early_stop"], "Workers to time: full, early_stop, rkc, "
                  "mse, full_taped.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
FLAGS = flags.FLAGS
# name: (NTKDFL options, candidates through the input gram (the workers' default for the MLP))
VARIANTS = {"full": ({}, True), "early_stop": ({"tau_search": "early_stop"}, True),
            "rkc": ({"flow": "rkc"}, True),
            "mse": ({"loss": "mse"}, True), "full_taped": ({}, False)}


def neighbourhoods(batch):
    """``batch`` real neighbourhoods: model functions, weights, features, labels and mask."""
    import keras
    import tensorflow as tf

    import ntkdfl_tf as nd
    from ntkdfl_tf.functional import ModelFunctions

    (x, y), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    k = max(2 * FLAGS.members, 20)
    split = nd.data.dirichlet_partition(x, y, k, 0.1, seed=0,
                                        samples_per_client=FLAGS.per_client)
    rng = np.random.default_rng(0)
    groups = [rng.choice(k, FLAGS.members, replace=False) for _ in range(batch)]
    xs, labels, mask = split.neighbourhoods(groups, 10)
    keras.utils.set_random_seed(0)
    fns = ModelFunctions(nd.models.mlp())
    weights = [tf.constant(np.repeat(w[None], batch, 0)) for w in fns.initial_weights()]
    feats = tf.reshape(fns.features(xs.reshape((-1,) + xs.shape[2:])), xs.shape[:2] + (-1,))
    return fns, weights, feats, tf.constant(labels), tf.constant(mask)


def main(argv):
    del argv
    import tensorflow as tf

    import ntkdfl_tf as nd

    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown[0]!r}; choose from "
                             f"{', '.join(VARIANTS)}.")
    for batch in (int(b) for b in FLAGS.batch):
        fns, weights, feats, labels, mask = neighbourhoods(batch)
        grid = {"taus": tuple(int(t) for t in FLAGS.taus)} if FLAGS.taus else {}
        workers = {s: nd.algorithms.NTKDFL(jit_compile=FLAGS.jit_compile, client_batch=batch,
                                           **VARIANTS[s][0], **grid).make_worker(fns)
                   for s in FLAGS.variants}
        h = next(iter(workers.values())).kernel(weights, feats, mask)
        gram = nd.kernels.dense.input_gram(feats)  # formed with the kernel, outside the call
        eta = tf.constant(FLAGS.learning_rate, tf.float32)
        args = (weights, weights, feats, labels, mask, h, eta, tf.ones(mask.shape),
                tf.zeros(labels.shape), tf.constant(False), None)
        extra = {s: (gram,) if VARIANTS[s][1] else () for s in workers}
        seconds = {s: [] for s in workers}
        results = {s: w._evolve(*args, *extra[s]) for s, w in workers.items()}  # compile
        for _ in range(FLAGS.calls):  # alternate: the machine's load falls on both alike
            for s, w in workers.items():
                start = time.perf_counter()
                results[s] = w._evolve(*args, *extra[s])
                results[s].loss.numpy()
                seconds[s].append(time.perf_counter() - start)
        taus = np.asarray(next(iter(workers.values())).algorithm.taus)
        first = next(iter(results.values()))
        for s, result in results.items():
            print(json.dumps({
                "batch": batch, "variant": s, "jit_compile": workers[s].jit_compile,
                "n": int(mask.shape[1]), "taus": taus.tolist(),
                "seconds_median": round(statistics.median(seconds[s]), 4),
                "seconds": [round(v, 4) for v in seconds[s]],
                "candidates_evaluated": int(result.evaluated),
                "tau_mean": float(taus[result.tau_index.numpy()].mean()),
                f"same_taus_as_{FLAGS.variants[0]}": bool(np.array_equal(
                    result.tau_index.numpy(), first.tau_index.numpy()))}), flush=True)
        if "mse" in workers:
            print(json.dumps({"batch": batch, "n": int(mask.shape[1]),
                              "eigh_seconds": eigh_seconds(h)}), flush=True)


def eigh_seconds(h):
    """Median seconds of ``tf.linalg.eigh`` of the batch ``h``, under XLA and without it."""
    import tensorflow as tf

    out = {}
    for name, jit in (("xla", True), ("lapack", False)):
        fn = tf.function(lambda m: tf.linalg.eigh(m)[0], jit_compile=jit)
        fn(h).numpy()  # compile
        times = []
        for _ in range(FLAGS.calls):
            start = time.perf_counter()
            fn(h).numpy()
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times), 4)
    return out


if __name__ == "__main__":
    app.run(main)
