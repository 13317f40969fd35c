"""Round time of NTK-DFL with lazy packages against materialised ones (codecs that change values).

    python benchmarks/package_cost.py --clients=20 --samples_per_client=100

Prints one JSON line per codec: the median round seconds after a warm-up round and the bytes
per round. ``identity``, ``factored`` and ``subsample`` keep the lazy path (no J formed);
``topk`` and ``quantize`` make every receiver's worker form its packages' Jacobians per slice.
"""

import json
import statistics

from absl import app, flags

import ntkdfl_tf as nd
from ntkdfl_tf import experiment

flags.DEFINE_integer("clients", 20, "Clients.")
flags.DEFINE_integer("samples_per_client", 100, "Samples per client.")
flags.DEFINE_integer("num_neighbors", 5, "kappa.")
flags.DEFINE_integer("rounds", 3, "Rounds; the first is a warm-up.")
flags.DEFINE_integer("jacobian_batches", 1, "Jacobian batching m.")
flags.DEFINE_list("codecs", ["identity", "factored", "subsample:fraction=0.25",
                             "topk:fraction=0.01", "quantize:bits=8"], "Codecs to time.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    (x, y), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    clients = nd.data.dirichlet_partition(x, y, FLAGS.clients, 0.1, seed=0,
                                          samples_per_client=FLAGS.samples_per_client)
    for spec in FLAGS.codecs:
        trainer = experiment.make_trainer(experiment.Config(
            taus=(100,), jacobian_batches=FLAGS.jacobian_batches,
            num_neighbors=FLAGS.num_neighbors, codec=spec))
        h = trainer.fit(clients, rounds=FLAGS.rounds, verbose=0).history
        print(json.dumps({"codec": spec, "clients": FLAGS.clients,
                          "samples_per_client": FLAGS.samples_per_client,
                          "jacobian_batches": FLAGS.jacobian_batches,
                          "round_seconds_median": round(statistics.median(h["round_seconds"][1:]), 2),
                          "bytes_per_round": h["bytes_sent"][-1],
                          "loss": round(h["loss"][-1], 4)}), flush=True)


if __name__ == "__main__":
    app.run(main)
