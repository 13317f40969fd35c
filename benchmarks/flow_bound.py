"""A floor under the NTK-DFL round: the flow's Euler products alone, on this machine.

    python benchmarks/flow_bound.py
    python benchmarks/flow_bound.py --shapes=30x204,60x204,100x102 --clients=300 --grid_steps=800

The cross-entropy flow needs one batched (N x N)(N x C) product per Euler step, one step per
grid step at best (NTK-DFL.md's grid runs to 800 steps), for every slice of every client. This
times that loop and nothing else (softmax residual and update included; no stiffness estimates,
kernels, candidates or data movement), XLA-compiled like NTK-DFL's flow, on random PSD kernels.
For each client batch B and Jacobian batching m (slice size N = (kappa + 1) * ceil(200 / m):
204 for m = 6, 102 for m = 12, 54 for m = 24) it prints one JSON line: milliseconds per step,
GFLOP/s, and the seconds a ``--clients`` round would spend in these products alone
(steps x m slices x ceil(clients / B) calls; the last call is padded, as in NTK-DFL).
"""

import json
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

flags.DEFINE_list("shapes", ["30x6", "60x6", "100x6", "300x6", "100x12", "100x24"],
                  "Client batch x Jacobian batching m pairs.")
flags.DEFINE_integer("clients", 300, "Clients in the round the floor is computed for.")
flags.DEFINE_integer("grid_steps", 800, "Euler steps per slice (800: the default tau grid).")
flags.DEFINE_integer("samples_per_client", 200, "Samples per client.")
flags.DEFINE_integer("num_neighbors", 5, "kappa.")
flags.DEFINE_integer("timed_steps", 200, "Steps per timed call.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    classes = 10
    for shape in FLAGS.shapes:
        batch, slices = (int(v) for v in shape.split("x"))
        n = (FLAGS.num_neighbors + 1) * -(-FLAGS.samples_per_client // slices)
        rng = np.random.default_rng(0)
        a = rng.normal(size=(batch, n, n)).astype(np.float32)
        h = tf.constant(a @ a.transpose(0, 2, 1) / n)  # PSD, lambda_max(h) ~ 4
        f0 = tf.constant(rng.normal(size=(batch, n, classes)).astype(np.float32))
        y = tf.one_hot(rng.integers(0, classes, (batch, n)), classes)
        steps = FLAGS.timed_steps

        @tf.function(jit_compile=True)
        def flow(h, f):
            def step(k, f):
                return k + 1, f - (0.01 / n) * tf.matmul(h, tf.nn.softmax(f) - y)
            return tf.while_loop(lambda k, _: k < steps, step, (0, f))[1]

        flow(h, f0).numpy()  # compile
        times = []
        for _ in range(5):
            start = time.perf_counter()
            flow(h, f0).numpy()
            times.append(time.perf_counter() - start)
        per_step = statistics.median(times) / steps
        calls = -(-FLAGS.clients // batch)
        round_seconds = per_step * FLAGS.grid_steps * slices * calls
        print(json.dumps({"client_batch": batch, "slice_samples": n, "slices": slices,
                          "ms_per_step": round(per_step * 1e3, 3),
                          "gflops": round(batch * n * n * classes * 2 / per_step / 1e9, 1),
                          "clients": FLAGS.clients, "grid_steps": FLAGS.grid_steps,
                          "flow_products_seconds_per_round": round(round_seconds, 2)}),
              flush=True)


if __name__ == "__main__":
    app.run(main)
