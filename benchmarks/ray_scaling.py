"""Round time with the local executor against Ray with 1 and 2 actors, in one run.

    python benchmarks/ray_scaling.py --clients=300 --algorithm=dfedavg
    python benchmarks/ray_scaling.py --clients=50 --algorithm=ntk_dfl

Prints one JSON line per executor: median seconds per round after a warm-up round, the bytes
that crossed the Ray object store per round (all of it, and the part that is client data: in
the first round each actor's own block and its neighbours across the block boundary, after that
the neighbours it did not hold the round before), the clients each actor holds at the end, and
the ratio to the local executor. Ray is started here on loopback with this machine's CPUs; each
actor gets one CPU.

By default the clients name their source (``ClientData.with_source``), as ``experiment.run``'s
do, so the actors load their samples from the dataset files and only indices cross the object
store; ``--nosource`` ships the samples through the object store instead.
"""

import json
import statistics

import numpy as np
import ray
from absl import app, flags

import ntkdfl_tf as nd
from ntkdfl_tf import experiment
from ntkdfl_tf.executors import RayExecutor

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 300, "Clients.")
flags.DEFINE_string("algorithm", "dfedavg", "Algorithm (ntk_dfl uses m=6, client_batch=30).")
flags.DEFINE_integer("rounds", 3, "Rounds per executor; the first is a warm-up.")
flags.DEFINE_list("actors", ["1", "2"], "Ray actor counts.")
flags.DEFINE_integer("local_epochs", 5, "DFedAvg local epochs.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
flags.DEFINE_bool("source", True, "Actors load their clients' samples from the dataset files "
                  "(--nosource: the driver ships them through the object store).")


def time_rounds(cfg, clients, executor):
    trainer = nd.DecentralizedTrainer(experiment.make_model_fn(cfg), experiment.make_algorithm(cfg),
                                      experiment.make_topology(cfg), seed=cfg.seed,
                                      executor=executor)
    h = trainer.fit(clients, rounds=FLAGS.rounds, verbose=0).history
    return trainer, h


def main(argv):
    del argv
    cfg = experiment.Config(algorithm=FLAGS.algorithm, num_clients=FLAGS.clients,
                            local_epochs=FLAGS.local_epochs if FLAGS.algorithm != "ntk_dfl" else None,
                            jacobian_batches=6 if FLAGS.algorithm == "ntk_dfl" else 1,
                            client_batch=30 if FLAGS.algorithm == "ntk_dfl" else 1)
    (x, y), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    clients = experiment.partition(cfg, x, y)
    if FLAGS.source:
        clients = clients.with_source(nd.data.DatasetSource("fashion_mnist", FLAGS.data_dir))
    ray.init(num_cpus=max(int(a) for a in FLAGS.actors), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    base_trainer, base = time_rounds(cfg, clients, "local")
    local = statistics.median(base["round_seconds"][1:])
    print(json.dumps({"executor": "local", "clients": FLAGS.clients, "algorithm": FLAGS.algorithm,
                      "round_seconds_median": round(local, 3),
                      "round_seconds": [round(t, 3) for t in base["round_seconds"]]}), flush=True)
    for actors in (int(a) for a in FLAGS.actors):
        executor = RayExecutor(num_actors=actors)
        trainer, h = time_rounds(cfg, clients, executor)
        median = statistics.median(h["round_seconds"][1:])
        gap = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                  for a, b in zip(base_trainer.client_weights, trainer.client_weights))
        print(json.dumps({"executor": "ray", "actors": actors, "clients": FLAGS.clients,
                          "actors_load_data": executor.actors_load_data,
                          "algorithm": FLAGS.algorithm, "round_seconds_median": round(median, 3),
                          "round_seconds": [round(t, 3) for t in h["round_seconds"]],
                          "ratio_to_local": round(median / local, 3),
                          "object_store_mb_per_round": round(
                              statistics.median(h["object_store_bytes"][1:]) / 2**20, 1),
                          "object_store_mb_first_round": round(
                              h["object_store_bytes"][0] / 2**20, 1),
                          "client_data_mb_per_round": round(
                              statistics.median(h["client_data_bytes"][1:]) / 2**20, 3),
                          "client_data_mb_first_round": round(
                              h["client_data_bytes"][0] / 2**20, 3),
                          "clients_held_per_actor": [len(held)
                                                     for held in executor.held_clients()],
                          "max_weight_gap_vs_local": gap}), flush=True)
        executor.shutdown()


if __name__ == "__main__":
    app.run(main)
