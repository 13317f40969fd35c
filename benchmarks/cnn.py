"""The CNN against the MLP under NTK-DFL, and the largest neighbourhood the CNN's kernel takes.

    python benchmarks/cnn.py
    python benchmarks/cnn.py --sizes=            # training only
    python benchmarks/cnn.py --models=           # neighbourhood-size search only
    python benchmarks/cnn.py --clients=4 --num_neighbors=3 --rounds=2 --samples_per_client=24 \
        --sizes=100,200 --time_cap=300 --memory_cap_gb=8   # smoke

Every measurement runs in a fresh subprocess, watched by this process: it is killed when its
resident memory passes ``--memory_cap_gb`` or its time passes the cap, and its address space is
limited to the cap plus ``--address_space_slack_gb`` (TensorFlow reserves address space it never
touches) as a backstop.

1. Training (one JSON line per model; Fashion-MNIST, Dirichlet alpha = 0.1, 200 samples per
   client, random kappa-regular graphs, seed 0: the same partition, graphs and seeds for all):
   NTK-DFL with Jacobian batching m = 6, batches of 30 clients, XLA-compiled flow
   (``--nojit_compile``: not), kernel="auto": the MLP 784-100-10 gets the closed-form dense
   kernel, ``nd.models.cnn`` the conv kernel (per-layer patches and sensitivities,
   ``--jacobian_chunk`` samples per block).
   Printed: median seconds per round after the warm-up round (training only), each round's
   seconds, the aggregated model's accuracy on the 10,000 test images after the last round,
   peak RSS of the subprocess, Euler sub-steps; then the CNN/MLP ratios.

2. Neighbourhood-size search (one client, the CNN at its initial weights, the first N training
   images, explicit kernel): for growing N of ``--sizes``, seconds of one kernel call (after a
   warm-up call on one chunk, which traces), peak RSS and RSS growth during the call. Before each
   N, time (~ Jacobian evaluations ~ (N/chunk)^2) and memory (previous peak + 4 more copies of H,
   or the last measured growth per sample, linearly) are predicted from the previous N; the
   search stops at the first N predicted or measured to pass ``--time_cap`` or
   ``--memory_cap_gb``. A summary line gives the largest N measured, what stopped the search,
   the log-log slopes of peak RSS and time over N, and the N at which the memory model would
   reach the memory cap.
"""

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

import common
from common import peak_rss_mb, rss_mb

common.define_setting_flags(clients=10)
flags.DEFINE_list("models", ["mlp", "cnn"], "Training: models (empty: skip).")
flags.DEFINE_integer("rounds", 3, "Training: rounds; the first is a warm-up.")
flags.DEFINE_integer("jacobian_chunk", 256, "Explicit kernel: samples per Jacobian block (256 "
                     "holds a whole m = 6 slice, so each Jacobian is computed once).")
flags.DEFINE_float("max_round_seconds", 3600, "Training: kill a model's run after this many "
                   "seconds per round (plus 10 minutes).")
flags.DEFINE_list("sizes", ["100", "200", "400", "800", "1200", "1600", "2400", "3200"],
                  "Search: neighbourhood sizes N (empty: skip).")
flags.DEFINE_float("memory_cap_gb", 12.0, "Kill / do not start a measurement above this RSS (GiB).")
flags.DEFINE_float("address_space_slack_gb", 6.0, "Address-space limit = cap + this (GiB).")
flags.DEFINE_float("time_cap", 900, "Search: seconds allowed for one kernel call.")
flags.DEFINE_string("single", None, "Internal: 'train,MODEL' or 'kernel,N' in this process.")
FLAGS = flags.FLAGS

GIB = 1024 ** 3


def evaluations(n, chunk):
    """Jacobian evaluations of one ExplicitNTK call: k row chunks, k(k+1)/2 blocks."""
    k = -(-n // chunk)
    return k * (k + 1) // 2


def emit(line):
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v)
                      for k, v in line.items()}), flush=True)


# -- in the measuring subprocess ----------------------------------------------------------------
def _time_call(kernel, weights, feats):
    import tensorflow as tf

    n = int(feats.shape[1])
    t0 = time.perf_counter()
    h = kernel(weights, feats, tf.ones((1, n))).numpy()
    return time.perf_counter() - t0, h


def measure_kernel(n):
    import keras
    import tensorflow as tf

    import ntkdfl_tf as nd
    from ntkdfl_tf import kernels
    from ntkdfl_tf.functional import ModelFunctions

    rss_start = peak_rss_mb()
    (x, _), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    keras.utils.set_random_seed(FLAGS.seed)  # every subprocess builds the same CNN
    fns = ModelFunctions(nd.models.cnn())
    weights = [tf.constant(w[None]) for w in fns.initial_weights()]
    feats = fns.features(x[:n])[None]
    chunk = FLAGS.jacobian_chunk
    kernel = kernels.make_kernel(fns, "explicit", chunk=chunk)
    rss_loaded = peak_rss_mb()
    warmup, _ = _time_call(kernel, weights, feats[:, :min(n, chunk)])  # traces; chunk's peak
    if n > chunk and n % chunk:
        _time_call(kernel, weights, feats[:, :n % chunk])  # the shorter last chunk's trace
    rss_before = peak_rss_mb()
    seconds, h = _time_call(kernel, weights, feats)
    return {"kernel": "explicit", "n": n, "chunk": chunk, "params": fns.num_params,
            "seconds": seconds, "warmup_seconds": warmup,
            "jacobian_evaluations": evaluations(n, chunk),
            "rss_start_mb": round(rss_start), "rss_loaded_mb": round(rss_loaded),
            "rss_before_mb": round(rss_before), "peak_rss_mb": round(peak_rss_mb()),
            "rss_growth_mb": round(peak_rss_mb() - rss_before),
            "h_mb": round(n * n * 4 / 2 ** 20, 1),
            "symmetric": bool(np.allclose(h[0], h[0].T, rtol=1e-5,
                                          atol=1e-5 * np.abs(h[0]).max())),
            }


def train(model):
    import functools
    import statistics

    import ntkdfl_tf as nd

    clients, test = common.load_partition()
    model_fn = (functools.partial(nd.models.mlp, hidden=(100,)) if model == "mlp"
                else nd.models.cnn)
    algorithm = common.ntkdfl(jacobian_chunk=FLAGS.jacobian_chunk)
    trainer = nd.DecentralizedTrainer(model_fn, algorithm,
                                      nd.topology.RandomGraph(FLAGS.num_neighbors),
                                      seed=FLAGS.seed)
    fns, m = trainer.fns, FLAGS.jacobian_batches
    history = trainer.fit(clients, rounds=FLAGS.rounds, verbose=0)
    times = history.history["round_seconds"]
    kernel = type(nd.kernels.make_kernel(fns, algorithm.kernel)).__name__
    line = {"model": model, "kernel": kernel, "jit_compile": FLAGS.jit_compile,
            "params": fns.num_params, "clients": FLAGS.clients, "kappa": FLAGS.num_neighbors,
            "samples_per_client": FLAGS.samples_per_client, "jacobian_batches": m,
            "flow": FLAGS.flow,
            # a slice's neighbourhood: kappa + 1 clients' shares of the largest client's samples
            "neighbourhood_n": (FLAGS.num_neighbors + 1) * -(-clients.max_samples // m),
            "rounds": len(times), "round_seconds_median": statistics.median(times[1:] or times),
            "round_seconds": [round(t, 2) for t in times],
            "val_accuracy": trainer.evaluate(*test, clients=False)["val_accuracy"],
            "peak_rss_mb": round(peak_rss_mb()),
            "euler_substeps": [round(s, 2) for s in history.history["euler_substeps"]],
            "flow_fallbacks": [int(f) for f in history.history.get("flow_fallbacks", [])]}
    if not fns.is_dense_stack:
        line["chunk"] = FLAGS.jacobian_chunk
    return line


def run_single():
    what, arg = FLAGS.single.split(",")
    result = train(arg) if what == "train" else measure_kernel(int(arg))
    print("RESULT " + json.dumps(result), flush=True)


# -- in the watching process --------------------------------------------------------------------
def run_child(single, time_limit):
    """Runs ``--single=single`` in a subprocess under the memory and time caps.

    Returns:
        ``(result dict or None, failure dict or None)``.
    """
    cap_mb = FLAGS.memory_cap_gb * 1024
    limit = int((FLAGS.memory_cap_gb + FLAGS.address_space_slack_gb) * GIB)
    passed = [FLAGS[name].serialize() for name in (
        "clients", "rounds", "num_neighbors", "alpha", "samples_per_client", "jacobian_batches",
        "client_batch", "jit_compile", "flow", "jacobian_chunk",
        "max_round_seconds", "seed")]
    passed += [FLAGS["data_dir"].serialize()] if FLAGS.data_dir else []
    cmd = [sys.executable, os.path.abspath(__file__), f"--single={single}"] + passed
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        t0, peak, killed = time.perf_counter(), 0.0, None
        while proc.poll() is None:
            rss = rss_mb(proc.pid)
            peak = max(peak, rss)
            if rss > cap_mb:
                killed = f"RSS {rss:.0f} MB above --memory_cap_gb={FLAGS.memory_cap_gb:g}"
            elif time.perf_counter() - t0 > time_limit:
                killed = f"running {time.perf_counter() - t0:.0f} s, above the time cap"
            if killed:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        lines = [l for l in out.read().splitlines() if l.startswith("RESULT ")]
        if killed or proc.returncode or not lines:
            return None, {"failed": killed or f"exit code {proc.returncode}",
                          "watched_peak_rss_mb": round(peak),
                          "seconds": time.perf_counter() - t0,
                          "stderr_tail": err.read()[-300:] if not killed else ""}
        return json.loads(lines[0][len("RESULT "):]), None


def run_training():
    results = {}
    for model in (m for m in FLAGS.models if m):
        # generous: tracing and XLA compilation come on top of the rounds
        limit = FLAGS.max_round_seconds * (FLAGS.rounds + 2) + 600
        result, failure = run_child(f"train,{model}", limit)
        line = result or {"model": model, **failure}
        emit(line)
        if "round_seconds_median" in line:
            results[model] = line
    if "mlp" in results:
        for model, line in results.items():
            if model != "mlp":
                emit({"ratio": f"{model}/mlp",
                      "round_seconds_ratio": line["round_seconds_median"]
                      / results["mlp"]["round_seconds_median"],
                      "val_accuracy_difference": line["val_accuracy"]
                      - results["mlp"]["val_accuracy"]})


def _slope(points):
    """Peak-RSS growth per sample between two measurements (0 for fewer).

    Only measurements with N >= 2 chunks count: below that, the growth is the second chunk's
    Jacobians coming in, which stops once two chunks are held.
    """
    points = [p for p in points if p["n"] >= 2 * FLAGS.jacobian_chunk]
    if len(points) < 2:
        return 0.0
    (a, b) = points[-2:]
    return max((b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["n"] - a["n"]), 0.0)


def run_search():
    cap_mb = FLAGS.memory_cap_gb * 1024
    sizes = sorted(int(s) for s in FLAGS.sizes if s)
    if not sizes:
        return
    chunk = FLAGS.jacobian_chunk
    done, why = [], "all sizes measured"
    for n in sizes:
        if done:
            prev = done[-1]
            predicted_s = prev["seconds"] * evaluations(n, chunk) / evaluations(prev["n"], chunk)
            predicted_mb = prev["peak_rss_mb"] + max(
                4 * 4 * (n * n - prev["n"] ** 2) / 2 ** 20,  # 4 more copies of H
                _slope(done) * (n - prev["n"]))  # or the last measured growth, linear
            if predicted_s > FLAGS.time_cap or predicted_mb > cap_mb:
                why = "time cap" if predicted_s > FLAGS.time_cap else "memory cap"
                emit({"search": "explicit", "n": n, "chunk": chunk, "skipped": True,
                      "predicted_seconds": predicted_s,
                      "predicted_peak_rss_mb": round(predicted_mb),
                      "why": f"predicted above the {why}"})
                why = f"{why} (predicted)"
                break
        # one warm-up chunk plus the call, plus start-up
        result, failure = run_child(f"kernel,{n}", 1.5 * FLAGS.time_cap + 120)
        if failure:
            emit({"search": "explicit", "n": n, "chunk": chunk, **failure})
            why = failure["failed"]
            break
        emit({"search": "explicit", **result})
        done.append(result)
        if result["seconds"] > FLAGS.time_cap:
            why = "time cap (measured)"
            break
    summary = {"search": "explicit", "summary": True, "chunk": chunk,
               "largest_n": done[-1]["n"] if done else None, "stopped_by": why,
               "measured": [[d["n"], d["peak_rss_mb"], round(d["seconds"], 2)] for d in done]}
    if done:  # where the memory model (as for the predictions) reaches the cap
        last, room = done[-1], max(cap_mb - done[-1]["peak_rss_mb"], 0)
        by_h = math.sqrt(room * 2 ** 20 / 16 + last["n"] ** 2)
        slope = _slope(done)
        summary["memory_cap_n_extrapolated"] = int(
            min(by_h, last["n"] + room / slope) if slope > 0 else by_h)
    if len(done) >= 2:
        n_, mem = np.log([d["n"] for d in done]), np.log([d["peak_rss_mb"] for d in done])
        summary["memory_exponent"] = float(np.polyfit(n_, mem, 1)[0])
        summary["time_exponent"] = float(np.polyfit(
            n_, np.log([d["seconds"] for d in done]), 1)[0])
    emit(summary)


def main(argv):
    del argv
    if FLAGS.single:
        return run_single()
    run_training()
    run_search()


if __name__ == "__main__":
    app.run(main)
