"""Traced-NTK implementations against the naive explicit-Jacobian contraction.

    python benchmarks/kernel.py --sizes=200,1200,3000
    python benchmarks/kernel.py --model=cnn --sizes=200,1200 --repeats=2
    python benchmarks/kernel.py --model=cnn --sizes=1200 --interleave=explicit,conv

For each N (the first N Fashion-MNIST training images, MLP 784-100-10 at its initial weights,
one client) and each implementation of ``ntkdfl_tf.kernels.KERNELS`` plus the naive reference
(materialise J [N, C, P] with one ``tf.GradientTape.jacobian`` call, then H = einsum(J, J) / C),
prints one JSON line: median seconds of a call after a warm-up call (which includes tracing and
is reported apart), peak RSS of a fresh process doing only that measurement and its RSS before
the call, achieved GFLOP/s from the analytic counts below, speed-up against the naive
contraction, and the largest deviation from the reference H, relative to max |H|.

The matrix-free kernel never forms H: its line times building the operator plus one product
with a [N, C] block (what the flow needs per Euler step), next to the dense kernel's stored
H @ v, and its deviation is that of H v.

``--model=cnn`` (``nd.models.cnn`` at its initial weights, raw Fashion-MNIST images): the
explicit kernel (per-sample Jacobians, today's "auto" before the conv kernel) against the
structured ``conv`` kernel, both in chunks of ``--chunk`` samples, same fields without GFLOP/s;
the reference is ``explicit`` (the naive J [N, C, P] would take 8.6 GB at N = 1,200) and the
speed-up is against it.

The naive reference runs with ``TF_ENABLE_ONEDNN_OPTS=0``: with oneDNN on, TensorFlow 2.21
segfaults in its whole-batch ``tape.jacobian`` on this machine (seen 2026-11-28).

FLOP counts (P = 79,510 parameters, C = 10, d = 784 inputs, h = 100 hidden units):
    naive / explicit: Jacobian ~ C backward passes of 4 N P, plus the contraction 2 N^2 C P.
        ``explicit`` recomputes each column chunk's Jacobian once per row chunk.
    dense: 2 N^2 (d + 1) for X X^T, 2 N^2 h twice for h h^T and D s D^T, forward 2 N P.
    matrix_free (one product with K = C columns): 4 N (d + 1) h K + 4 N (h + 1) K.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_enum("model", "mlp", ["mlp", "cnn"], "mlp: every kernel against the naive "
                  "contraction; cnn: the explicit against the conv kernel.")
flags.DEFINE_list("sizes", ["200", "1200", "3000"], "Neighbourhood sizes N.")
flags.DEFINE_integer("chunk", 128, "Samples per block of the explicit and conv kernels.")
flags.DEFINE_integer("repeats", 3, "Timed calls after the warm-up call.")
flags.DEFINE_integer("naive_max_n", 1200, "Largest N for the naive reference (its J is "
                     "4 N C P bytes: 3.8 GB at 1,200, 9.5 GB at 3,000); above it the reference "
                     "is the chunked explicit kernel.")
flags.DEFINE_integer("explicit_max_n", 3000, "Largest N for the chunked explicit kernel.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
flags.DEFINE_string("single", None, "Internal: 'kind,N' measures one case in this process.")
flags.DEFINE_list("interleave", None, "Kernels (dense, conv, explicit) to time in this one "
                  "process, their calls alternating, for each N: a ratio that the machine's load "
                  "moves less than separate processes' (no memory figures).")
FLAGS = flags.FLAGS

C, D, HIDDEN = 10, 784, 100


def flops(kind, n, p, chunk=128):
    jac = C * 4 * n * p
    if kind == "naive":
        return jac + 2 * n * n * C * p
    if kind == "explicit":
        chunks = -(-n // chunk)
        return jac * (1 + chunks) + 2 * n * n * C * p
    if kind == "dense":
        return 2 * n * n * (D + 1) + 4 * n * n * HIDDEN + 2 * n * p
    if kind == "matrix_free":
        return 4 * n * (D + 1) * HIDDEN * C + 4 * n * (HIDDEN + 1) * C + 2 * n * p
    raise ValueError(kind)


def _model_and_data():
    """Fashion-MNIST's training images, the --model's functions and its initial weights
    ``[1, ...]`` (the same in every process: seed 0)."""
    import keras
    import tensorflow as tf

    import ntkdfl_tf as nd
    from ntkdfl_tf.functional import ModelFunctions

    (x, _), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    keras.utils.set_random_seed(0)
    fns = ModelFunctions(nd.models.mlp("fashion_mnist") if FLAGS.model == "mlp"
                         else nd.models.cnn("fashion_mnist"))
    return x, fns, [tf.constant(w[None]) for w in fns.initial_weights()]


def measure(kind, n):
    """One case, in this (fresh) process: timings, peak RSS and the result for comparison."""
    import tensorflow as tf

    from ntkdfl_tf import kernels

    x, fns, weights = _model_and_data()
    feats = fns.features(x[:n])[None]
    mask = tf.ones((1, n))
    v = tf.constant(np.random.default_rng(0).standard_normal((1, n, C)), tf.float32)

    if kind == "naive":
        @tf.function
        def call():
            with tf.GradientTape() as tape:
                tape.watch(weights)
                logits = fns.forward(weights, feats)[0]
            jac = tape.jacobian(logits, weights)  # list of [N, C, *shape]
            j = tf.concat([tf.reshape(t, [n, C, -1]) for t in jac], axis=-1)
            return tf.einsum("ncp,mcp->nm", j, j)[None] / C
    elif kind == "matrix_free":
        kernel = kernels.make_kernel(fns, kind)
        call = tf.function(lambda: kernel.operator(weights, feats, mask)(v))
    else:
        options = {"chunk": FLAGS.chunk} if kind in ("explicit", "conv") else {}
        kernel = kernels.make_kernel(fns, kind, **options)
        call = lambda: kernel(weights, feats, mask)  # noqa: E731  (already a tf.function)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = call().numpy()
    first = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        call().numpy()
        times.append(time.perf_counter() - t0)
    extra = {}
    if kind == "dense":  # the product the flow does per Euler step, for the matrix-free line
        h = tf.constant(out)
        matvec = tf.function(lambda: tf.matmul(h, v))
        matvec()
        t0 = time.perf_counter()
        for _ in range(20):
            matvec().numpy()
        extra["stored_h_product_seconds"] = (time.perf_counter() - t0) / 20
    return {"kernel": kind, "n": n, "seconds_median": statistics.median(times),
            "first_call_seconds": first, "rss_before_mb": rss_before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **({"gflops": flops(kind, n, fns.num_params) / statistics.median(times) / 1e9}
               if FLAGS.model == "mlp" else {"chunk": FLAGS.chunk}),
            **extra}, out, v.numpy()


def run_interleaved():
    """Each N: every kernel of --interleave built once and warmed up, then --repeats rounds of
    one call each, in turn; prints the medians, the speed-up of each kind over the first and
    the largest deviation from the first's H."""
    import tensorflow as tf

    from ntkdfl_tf import kernels

    x, fns, weights = _model_and_data()
    for n in (int(s) for s in FLAGS.sizes):
        feats, mask = fns.features(x[:n])[None], tf.ones((1, n))
        built = {k: kernels.make_kernel(fns, k, **({"chunk": FLAGS.chunk} if k != "dense" else {}))
                 for k in FLAGS.interleave}
        out = {k: kernel(weights, feats, mask).numpy() for k, kernel in built.items()}
        times = {k: [] for k in built}
        for _ in range(FLAGS.repeats):
            for k, kernel in built.items():
                t0 = time.perf_counter()
                kernel(weights, feats, mask).numpy()
                times[k].append(time.perf_counter() - t0)
        first = FLAGS.interleave[0]
        med = {k: statistics.median(t) for k, t in times.items()}
        print(json.dumps({"n": n, "model": FLAGS.model, "chunk": FLAGS.chunk,
                          "seconds_median": {k: round(t, 4) for k, t in med.items()},
                          "seconds": {k: [round(x, 4) for x in t] for k, t in times.items()},
                          f"speedup_vs_{first}": {k: round(med[first] / t, 2)
                                                  for k, t in med.items()},
                          "max_rel_deviation": {k: float(np.abs(o - out[first]).max()
                                                         / np.abs(out[first]).max())
                                                for k, o in out.items()}}), flush=True)


def run_single():
    kind, n = FLAGS.single.split(",")
    result, out, v = measure(kind, int(n))
    np.save(f"/tmp/ntk_kernel_{FLAGS.model}_{kind}_{n}.npy", out)
    np.save(f"/tmp/ntk_kernel_v_{n}.npy", v)
    print("RESULT " + json.dumps(result), flush=True)


def main(argv):
    del argv
    if FLAGS.single:
        return run_single()
    if FLAGS.interleave:
        return run_interleaved()
    import ntkdfl_tf.kernels as kernels

    # the conv kernel is for Conv2D stacks (on the MLP it repeats the dense kernel's closed form)
    candidates = (["naive"] + [k for k in kernels.KERNELS if k != "conv"]
                  if FLAGS.model == "mlp" else ["explicit", "conv"])
    for n in (int(s) for s in FLAGS.sizes):
        kinds = [k for k in candidates if (k != "naive" or n <= FLAGS.naive_max_n)
                 and (k != "explicit" or n <= FLAGS.explicit_max_n)]
        skipped = [k for k in candidates if k not in kinds]
        if skipped:
            print(json.dumps({"n": n, "skipped": skipped, "why": "above --naive_max_n / "
                              "--explicit_max_n (memory or time on this machine)"}), flush=True)
        results, arrays = {}, {}
        for kind in kinds:
            cmd = [sys.executable, os.path.abspath(__file__), f"--single={kind},{n}",
                   f"--repeats={FLAGS.repeats}", f"--model={FLAGS.model}",
                   f"--chunk={FLAGS.chunk}"] + (
                       [f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])
            # TF 2.21's oneDNN path segfaults in the naive whole-batch Jacobian on this machine
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0") if kind == "naive" else None
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(json.dumps({"kernel": kind, "n": n, "failed": proc.returncode,
                                  "stderr_tail": proc.stderr[-400:]}), flush=True)
                continue
            results[kind] = json.loads(lines[0][7:])
            arrays[kind] = np.load(f"/tmp/ntk_kernel_{FLAGS.model}_{kind}_{n}.npy").astype(
                np.float64)
        v = np.load(f"/tmp/ntk_kernel_v_{n}.npy").astype(np.float64)
        reference = next((k for k in ("naive", "explicit", "dense") if k in arrays), None)
        ref = arrays.get(reference)
        for kind, result in results.items():
            if ref is not None and kind != reference:
                got = arrays[kind]
                want = ref @ v if kind == "matrix_free" else ref
                result["reference"] = reference
                result["max_rel_deviation"] = float(np.abs(got - want).max() / np.abs(want).max())
            baseline = "naive" if FLAGS.model == "mlp" else "explicit"
            if baseline in results:
                result[f"speedup_vs_{baseline}"] = (results[baseline]["seconds_median"]
                                                    / result["seconds_median"])
            print(json.dumps({k: (round(x, 6) if isinstance(x, float) else x)
                              for k, x in result.items()}), flush=True)


if __name__ == "__main__":
    app.run(main)
