"""How far each cross-entropy flow's update is from the exact flow's, and what it costs.

    python benchmarks/flow_fidelity.py
    python benchmarks/flow_fidelity.py --etas=0.01 --train_epochs=0,2 --neighbourhoods=3
    python benchmarks/flow_fidelity.py --etas=0.01 --products=float32,bfloat16 --jit_compile

Real Fashion-MNIST neighbourhoods (client i and ``--num_neighbors`` others of a Dirichlet
split, ``--samples_per_client`` each: N ~ 1,200), the MLP at its initial weights (or after
``--train_epochs`` epochs of SGD on the neighbourhoods' data: more confident predictions, as in
later rounds), the dense kernel H, and for each grid step eta the
candidate updates Delta w(tau) = -(eta/N) J^T R_tau (one VJP each) for the default tau grid.
The reference is ``flow="exact"`` (Dormand-Prince 5(4), rtol 1e-6). For every ``NTKDFL(flow=...)``
value it prints one JSON line: eta * lambda_max(H/N) (median and max over the neighbourhoods),
the relative error ||Delta w - Delta w_exact|| / ||Delta w_exact|| (per neighbourhood the worst
tau; median and max over neighbourhoods), integrator steps and products with H per grid step
(Euler 1 per step, Dormand-Prince 6 per attempted step, rkc its own count, its stiffness
estimate included; the Euler flows' power iterations not counted), and flow
seconds per neighbourhood (the faster of two calls for all of them, traced beforehand, divided by
their number; the flow alone, as NTKDFL runs it without XLA unless ``--jit_compile``).
"""

import json
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

import ntkdfl_tf as nd
from ntkdfl_tf.algorithms.ntkdfl import ADAPTIVE_FLOWS, FLOWS
from ntkdfl_tf.functional import ModelFunctions
from ntkdfl_tf.kernels import flow as flow_lib

flags.DEFINE_integer("neighbourhoods", 6, "Neighbourhoods (receivers) evolved in one call.")
flags.DEFINE_integer("num_neighbors", 5, "kappa: members per neighbourhood besides i.")
flags.DEFINE_integer("clients", 300, "Clients of the Dirichlet split the members come from.")
flags.DEFINE_float("alpha", 0.1, "Dirichlet concentration.")
flags.DEFINE_integer("samples_per_client", 200, "Samples per client (the paper's rule).")
flags.DEFINE_list("etas", ["0.005", "0.01", "0.016"], "Grid steps eta (0.01: NTK-DFL.md's).")
flags.DEFINE_list("train_epochs", ["0"], "SGD epochs on the neighbourhoods' data before the "
                  "kernel is taken (0: the initial weights).")
flags.DEFINE_list("taus", ["100", "200", "300", "400", "500", "600", "800"], "Candidate taus.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the flows.")
flags.DEFINE_list("products", ["float32"], "Precision of the products with H (float32, bfloat16, "
                  "float16; inputs rounded, result cast back to float32); the reference, the "
                  "exact flow, always takes float32 products.")
flags.DEFINE_integer("seed", 0, "Seed of the split, the neighbourhoods and the weights.")
FLAGS = flags.FLAGS


def neighbourhoods(rng):
    """Raw images ``[B, N, 28, 28, 1]``, one-hot labels and mask of ``--neighbourhoods``
    neighbourhoods: each a receiver and kappa random other clients of the split."""
    (x, y), _ = nd.data.load("fashion_mnist")
    split = nd.data.dirichlet_partition(x, y, FLAGS.clients, FLAGS.alpha, seed=FLAGS.seed,
                                        samples_per_client=FLAGS.samples_per_client)
    members = [rng.choice(FLAGS.clients, FLAGS.num_neighbors + 1, replace=False)
               for _ in range(FLAGS.neighbourhoods)]
    xs, labels, mask = split.neighbourhoods(members, 10)
    return xs, tf.constant(labels), tf.constant(mask)


def weights_after(epochs, xs, labels, mask, seed):
    """The MLP's initial weights, or after ``epochs`` of SGD on all neighbourhoods' data."""
    import keras

    keras.utils.set_random_seed(seed)
    model = nd.models.mlp()
    if epochs:
        real = mask.numpy().reshape(-1) > 0
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.CategoricalCrossentropy(from_logits=True))
        model.fit(xs.reshape((-1,) + xs.shape[2:])[real],
                  labels.numpy().reshape(-1, 10)[real], batch_size=25, epochs=epochs,
                  verbose=0)
    return model


def make_flow(flow, taus, products="float32"):
    """A traced ``(h, f0, y, mask, n, eta) -> (R, steps)`` for one ``NTKDFL(flow=...)`` value,
    its products with H in the precision ``products``."""
    def run(h, f0, y, mask, n, eta):
        if products != "float32":  # the flow takes a callable H as it takes a matrix-free one
            low = tf.cast(h, products)

            def h(v):
                return tf.cast(tf.matmul(low, tf.cast(v, products)), tf.float32)
        if flow in ADAPTIVE_FLOWS:
            spec = ADAPTIVE_FLOWS[flow]
            r, _, steps, _ = spec.whole(h, f0, y, mask, n, eta, taus, rtol=spec.rtol,
                                        atol=spec.atol)
        elif flow == "euler_bound":
            steps = flow_lib.euler_substeps(h, n, eta, mask=mask)
            r, _ = flow_lib.euler_flow(h, f0, y, mask, n, eta, tf.constant(taus), steps,
                                       record_outputs=False)
            steps = tf.cast(steps, tf.float32)
        else:
            r, _, steps, _ = flow_lib.adaptive_euler_flow(h, f0, y, mask, n, eta, taus)
        return r, steps

    return tf.function(run, jit_compile=FLAGS.jit_compile, autograph=False)  # explicit loops


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    taus = [int(t) for t in FLAGS.taus]
    xs, labels, mask = neighbourhoods(rng)
    n = tf.reduce_sum(mask, 1)
    # the reference first
    order = [("exact", "float32")] + [(f, p) for p in FLAGS.products for f in FLOWS
                                      if (f, p) != ("exact", "float32")]
    traced = {(f, p): make_flow(f, taus, p) for f, p in order}
    for epochs in (int(e) for e in FLAGS.train_epochs):
        fns = ModelFunctions(weights_after(epochs, xs, labels, mask, FLAGS.seed))
        weights = [tf.constant(np.repeat(w[None], FLAGS.neighbourhoods, 0))
                   for w in fns.initial_weights()]
        feats = tf.reshape(fns.features(xs.reshape((-1,) + xs.shape[2:])), xs.shape[:2] + (-1,))
        h = nd.kernels.make_kernel(fns, "dense")(weights, feats, mask)
        lam = (nd.kernels.lambda_max(h, 100) / n).numpy()
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(weights)
            f0 = fns.forward(weights, feats)

        def updates(r_sums, eta):  # [T, B, P]: -(eta/N) J^T R_tau per candidate
            out = []
            for r in r_sums:
                grads = tape.gradient(f0, weights, output_gradients=r * (eta / n)[:, None, None])
                out.append(tf.concat([tf.reshape(g, [g.shape[0], -1]) for g in grads], 1))
            return np.stack([-u.numpy() for u in out]).astype(np.float64)

        for eta_value in (float(e) for e in FLAGS.etas):
            eta = tf.constant(eta_value, tf.float32)
            exact = None
            for flow, products in order:
                fn = traced[flow, products]
                args = (h, f0, labels, mask, n, eta)
                fn(*args)  # traced (and compiled) at the first eta; warm otherwise
                seconds = []
                for _ in range(2):
                    start = time.perf_counter()
                    r_sums, steps = fn(*args)
                    r_sums = r_sums.numpy()
                    seconds.append((time.perf_counter() - start) / FLAGS.neighbourhoods)
                dw = updates(r_sums, eta_value)
                if exact is None:
                    exact = dw
                err = (np.linalg.norm(dw - exact, axis=-1) /
                       np.linalg.norm(exact, axis=-1)).max(0)  # worst tau, per neighbourhood
                print(json.dumps({
                    "train_epochs": epochs, "eta": eta_value,
                    "eta_lambda_max_median": round(float(np.median(lam * eta_value)), 2),
                    "eta_lambda_max_max": round(float(np.max(lam * eta_value)), 2),
                    "flow": flow, "products": products,
                    "dw_error_median": float(f"{np.median(err):.2g}"),
                    "dw_error_max": float(f"{np.max(err):.2g}"),
                    "steps_per_grid_step": round(float(steps), 2),
                    "products_per_grid_step": round(
                        float(steps) * (ADAPTIVE_FLOWS[flow].products_per_step
                                        if flow in ADAPTIVE_FLOWS else 1), 1),
                    "flow_seconds": round(min(seconds), 2), "N_median": int(np.median(n))}),
                      flush=True)
        del tape


if __name__ == "__main__":
    app.run(main)
