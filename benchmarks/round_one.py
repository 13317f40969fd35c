"""Where does NTK-DFL's round-1 aggregate accuracy at 300 clients come from?

Runs one round per variant (flow integrator x Jacobian batching m x seed) and prints the
aggregate's test accuracy, the mean client's, the mean chosen tau, and the accuracy of the
average of random 30-client subsets of the same round-1 models (does averaging more clients
help or hurt?):

    python benchmarks/round_one.py --flows=euler_adaptive,dopri5 --batches=1,6 --seeds=0,1,2

``--reference_map`` replaces the partition with the reference code's own client split (a pickled
``{client: train indices}`` file from github.com/Gabe-Thomp/ntk-dfl,
``data/user_with_data/fmnist300/a0.1/user_dataidx_map_0.10_0.dat``), indexing the original IDX
training files in their order; the seed then only draws graphs and initial weights.

Writes one CSV row per variant to --out as each finishes.
"""

import dataclasses
import os
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 300, "Number of clients.")
flags.DEFINE_list("flows", ["euler_adaptive", "dopri5"], "Flow integrators.")
flags.DEFINE_list("batches", ["1", "6"], "Jacobian batching m values.")
flags.DEFINE_list("seeds", ["0"], "Root seeds.")
flags.DEFINE_list("taus", None, "Candidate taus (default: the grid).")
flags.DEFINE_integer("subset", 30, "Clients per random subset average.")
flags.DEFINE_integer("subsets", 10, "Random subsets averaged.")
flags.DEFINE_string("out", "round_one.csv", "CSV of the results (appended).")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
flags.DEFINE_string("reference_map", None, "The reference code's pickled client split (above).")

FIELDS = ("clients", "partition", "flow", "m", "seed", "taus", "aggregate", "client_mean", "tau_mean",
          "subset_mean", "subset_min", "subset_max", "seconds")


def subset_accuracy(trainer, x, y, size, count, seed):
    """Test accuracy of the averages of ``count`` random ``size``-client subsets."""
    model = trainer.model
    rng = np.random.default_rng(seed)
    k = int(trainer.client_weights[0].shape[0])
    out = []
    for _ in range(count):
        chosen = rng.choice(k, size, replace=False)
        model.set_weights([np.asarray(w)[chosen].mean(axis=0) for w in trainer.client_weights])
        logits = model.predict(x, batch_size=2000, verbose=0)
        out.append(float(np.mean(np.argmax(logits, axis=1) == y)))
    return out


def reference_clients(path, data_dir):
    """The reference's split of the original IDX training files as ClientData."""
    import gzip
    import pickle

    from ntkdfl_tf import data

    folder = os.path.join(data_dir or os.environ["NTKDFL_DATA_DIR"], "fashion_mnist")
    with gzip.open(os.path.join(folder, "train-images-idx3-ubyte.gz")) as f:
        x = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28, 1)
    with gzip.open(os.path.join(folder, "train-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read()[8:], np.uint8).astype(np.int64)
    with open(path, "rb") as f:
        split = pickle.load(f)  # a public research artefact, read as data
    return data.ClientData.from_indices(x, y, [np.asarray(split[k]) for k in sorted(split)])


def main(argv):
    del argv
    from ntkdfl_tf import data, experiment
    from ntkdfl_tf.io import read_csv, write_csv

    dataset = data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    (_, _), (x_test, y_test) = dataset
    taus = tuple(int(t) for t in FLAGS.taus) if FLAGS.taus else experiment.Config.taus
    rows = read_csv(FLAGS.out)
    for seed in FLAGS.seeds:
        for m in FLAGS.batches:
            for flow in FLAGS.flows:
                cfg = dataclasses.replace(
                    experiment.Config(**{k: v for k, v in experiment.PRESETS["paper_fast"].items()
                                         if k != "logdir"}),
                    num_clients=FLAGS.clients, rounds=1, flow=flow, jacobian_batches=int(m),
                    seed=int(seed), taus=taus, verbose=0, resume=False,
                    data_dir=FLAGS.data_dir, logdir=tempfile.mkdtemp(),
                    save_dir=tempfile.mkdtemp())
                start = time.perf_counter()
                if FLAGS.reference_map:
                    trainer = experiment.make_trainer(cfg)
                    history = trainer.fit(reference_clients(FLAGS.reference_map, FLAGS.data_dir),
                                          rounds=1, validation_data=(x_test, y_test), verbose=0)
                else:
                    trainer, history = experiment.run(cfg, dataset=dataset)
                seconds = time.perf_counter() - start
                h = {k: v[-1] for k, v in history.history.items()}
                subs = subset_accuracy(trainer, x_test, y_test, FLAGS.subset, FLAGS.subsets,
                                       int(seed))
                row = {"clients": FLAGS.clients, "flow": flow,
                       "partition": "reference_map" if FLAGS.reference_map else "ours", "m": m, "seed": seed,
                       "taus": "grid" if len(taus) > 1 else taus[0],
                       "aggregate": round(h["val_accuracy"], 4),
                       "client_mean": round(h["val_client_mean_accuracy"], 4),
                       "tau_mean": round(h["tau"], 1), "subset_mean": round(np.mean(subs), 4),
                       "subset_min": round(min(subs), 4), "subset_max": round(max(subs), 4),
                       "seconds": round(seconds, 1)}
                print(row, flush=True)
                rows.append(row)
                write_csv(FLAGS.out, rows, FIELDS)


if __name__ == "__main__":
    app.run(main)
