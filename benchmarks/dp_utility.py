"""What the ``dp`` codec (per-sample clipping and Gaussian noise) does to NTK-DFL.

    python benchmarks/dp_utility.py --noises=-1,0,0.001,0.01,0.1,1 --out=docs/results/dp

The clip norm is the median per-sample norm of (Jacobian, logits) at the initial weights over
``--clip_samples`` training images, so clipping alone changes about half the samples. Every
setting uses ``--base_codec`` before ``dp``. For each noise multiplier it prints, as one JSON
line:

1. what one receiver computes from a real neighbourhood (its own 200 samples and 5
   neighbours', at the initial weights): the relative error of its kernel H against the
   noiseless one, lambda_max(H/N), the Euler sub-steps per grid step the flow then needs, and
   the cosine between the noisy and noiseless update J^T R at the first grid step;
2. epsilon(delta) from ``dp-accounting``'s RDP accountant (``ntkdfl_tf.privacy``) over
   rounds x kappa releases per sample (one package per neighbour and round), with noise
   multiplier noise / 2: replacing one sample moves its clipped row by up to 2 * clip.
   Subsampling amplification is not claimed. It covers the packages' Jacobian rows and logits
   only (the codec's docstring lists what else a client reveals);
3. the aggregated test accuracy per round of a ``--clients`` run, when the flow needs at most
   ``--max_substeps`` sub-steps per grid step (beyond that a round takes hours here).

Noise ``-1``: no ``dp`` stage. Writes ``dp.csv`` into ``--out``.
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import ntkdfl_tf as nd
from ntkdfl_tf import experiment, functional, io, privacy
from ntkdfl_tf.protocol import codecs

flags.DEFINE_list("noises", ["-1", "0", "0.001", "0.01", "0.1", "1"],
                  "Noise multipliers (-1: no dp).")
flags.DEFINE_string("base_codec", "subsample:fraction=0.1+project:fraction=0.01",
                    "Stages before dp.")
flags.DEFINE_integer("clients", 30, "Clients of the training runs.")
flags.DEFINE_integer("rounds", 5, "Rounds.")
flags.DEFINE_integer("num_neighbors", 5, "kappa.")
flags.DEFINE_integer("jacobian_batches", 1, "Jacobian batching m (1: the flow starts from "
                     "the packages' noised logits; with m > 1 senders re-evaluate them).")
flags.DEFINE_integer("max_substeps", 20, "Train only when the flow needs at most this many.")
flags.DEFINE_float("delta", 1e-5, "delta of epsilon(delta).")
flags.DEFINE_integer("clip_samples", 256, "Images whose median norm sets the clip.")
flags.DEFINE_string("out", None, "Folder for dp.csv.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
FLAGS = flags.FLAGS


def sample_norms(package):
    """Per-sample L2 norm of a package's (Jacobian, logits)."""
    n = package.num_samples
    return np.sqrt(sum(np.sum(np.square(a.reshape(n, -1), dtype=np.float64), 1)
                       for a in (*package.jacobians, package.logits)))


def receiver_view(fns, weights, clients, codec, seed=0):
    """Client 0's kernel and first update from its own data and clients 1-5's packages."""
    rng, noise_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    sketch = codecs.make_sketch(codec, fns.num_params, seed)
    rows, residuals = [], []
    for sender in range(6):
        x, y = clients[sender]
        n = codec.kept_samples(len(x)) if sender else len(x)
        pick = rng.permutation(len(x))[:n]
        package = privacy.jacobian_package(fns, weights, x[pick], y[pick], sender, 0)
        decoded = codecs.encode_package_values(codec, package.jacobians, package.logits,
                                               noise_rng, sketch, sent=sender > 0)
        rows.append(np.concatenate([j.reshape(n, fns.num_classes, -1)
                                    for j in decoded.jacobians], -1))
        residuals.append(tf.nn.softmax(decoded.logits).numpy() - np.eye(10)[y[pick]])
    jac, residual = tf.constant(np.concatenate(rows)), np.concatenate(residuals)
    h = nd.kernels.explicit.traced_kernel(jac, jac).numpy()
    update = np.einsum("ncp,nc->p", jac.numpy(), residual)
    if sketch is not None:  # S^T back to the parameters
        update = update[sketch.bucket] * sketch.sign
    return h, update


def main(argv):
    del argv
    (x, y), test = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    keras.utils.set_random_seed(0)  # the initial weights, and so the clip, are reproducible
    fns = functional.ModelFunctions(nd.models.mlp())
    weights = fns.initial_weights()
    probe = privacy.jacobian_package(fns, weights, x[:FLAGS.clip_samples],
                                     y[:FLAGS.clip_samples])
    clip = float(np.median(sample_norms(probe)))
    del probe
    base = experiment.Config(num_clients=FLAGS.clients, num_neighbors=FLAGS.num_neighbors,
                             jacobian_batches=FLAGS.jacobian_batches)
    clients = experiment.partition(base, x, y)
    pairs = [(clients.x[i, :c], clients.y[i, :c]) for i, c in enumerate(clients.counts[:6])]
    clean_h, clean_update = receiver_view(fns, weights, pairs, codecs.parse(FLAGS.base_codec))
    rows = []
    for noise in map(float, FLAGS.noises):
        spec = FLAGS.base_codec if noise < 0 else \
            f"{FLAGS.base_codec}+dp:clip={clip:.4g},noise={noise:g}"
        h, update = receiver_view(fns, weights, pairs, codecs.parse(spec))
        n = len(h)
        substeps = int(nd.kernels.euler_substeps(tf.constant(h[None], tf.float32),
                                                 tf.constant([float(n)]), 0.01))
        releases = FLAGS.rounds * FLAGS.num_neighbors
        row = {"codec": spec, "noise": noise, "clip": round(clip, 4),
               "kernel_error": float(np.linalg.norm(h - clean_h) / np.linalg.norm(clean_h)),
               "lambda_max_h_over_n": float(np.linalg.eigvalsh(h / n)[-1]),
               "euler_substeps": substeps,
               "update_cosine": float(update @ clean_update / np.linalg.norm(update)
                                      / np.linalg.norm(clean_update)),
               "releases": releases, "delta": FLAGS.delta,
               "epsilon": (float("inf") if noise <= 0 else
                           privacy.gaussian_epsilon(noise / 2, releases, FLAGS.delta)),
               "accuracy": None, "client_mean_accuracy": None, "seconds": None}
        if substeps <= FLAGS.max_substeps:
            trainer = experiment.make_trainer(dataclasses.replace(base, codec=spec))
            start = time.time()
            history = trainer.fit(clients, rounds=FLAGS.rounds, validation_data=test,
                                  verbose=0).history
            row.update(accuracy=[round(a, 4) for a in history["val_accuracy"]],
                       client_mean_accuracy=round(history["val_client_mean_accuracy"][-1], 4),
                       seconds=round(time.time() - start, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        io.write_csv(os.path.join(FLAGS.out, "dp.csv"), rows, rows[0])


if __name__ == "__main__":
    app.run(main)
