"""Wall-clock time until the aggregated model reaches a target accuracy: NTK-DFL vs DFedAvg.

    python benchmarks/time_to_accuracy.py --clients=300 --target=0.85
    python benchmarks/time_to_accuracy.py --algorithms=dfedavg,ntk_dfl --budget_factor=1.3

Same seed, partition (Fashion-MNIST, Dirichlet alpha=0.1, 200 samples per client), topology
(random kappa=5 graph per round) and MLP 784-100-10 for every algorithm, run one after another
in this process. Only the aggregate is evaluated each round (``nd.callbacks.TimeToAccuracy``).
Prints one JSON line per round, one per algorithm (rounds and seconds to target), and the ratio.
"""

import json

import keras
from absl import app, flags

import common
import ntkdfl_tf as nd

common.define_setting_flags(clients=300)
flags.DEFINE_float("target", 0.85, "Target test accuracy of the aggregated model.")
flags.DEFINE_list("algorithms", ["ntk_dfl", "dfedavg"], "Algorithms, first is the numerator.")
flags.DEFINE_list("max_rounds", ["ntk_dfl=40", "dfedavg=100"], "Round budget per algorithm.")
flags.DEFINE_float("budget_factor", None, "If set, every algorithm after the first stops at "
                   "this multiple of the first's wall time to target (it cannot win after it).")
flags.DEFINE_integer("local_epochs", None, "DFedAvg local epochs (default: the paper's 20).")
FLAGS = flags.FLAGS


class _PrintRound(keras.callbacks.Callback):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def on_epoch_end(self, epoch, logs=None):
        print(json.dumps({"algorithm": self.name, "round": epoch + 1,
                          "accuracy": round(logs["val_accuracy"], 4),
                          "round_seconds": round(logs["round_seconds"], 2),
                          "train_seconds": round(logs["train_seconds"], 1),
                          "wall_seconds": round(logs["wall_seconds"], 1)}), flush=True)


def make_algorithm(name):
    if name == "ntk_dfl":
        return common.ntkdfl()
    options = {} if FLAGS.local_epochs is None else {"local_epochs": FLAGS.local_epochs}
    return nd.algorithms.get(name, **options)


def main(argv):
    del argv
    max_rounds = dict(item.split("=") for item in FLAGS.max_rounds)
    clients, (x_test, y_test) = common.load_partition()
    results = {}
    for name in FLAGS.algorithms:
        trainer = nd.DecentralizedTrainer(nd.models.mlp, make_algorithm(name),
                                          nd.topology.RandomGraph(FLAGS.num_neighbors),
                                          seed=FLAGS.seed, executor=common.executor())
        budget = None
        first_timer = results.get(FLAGS.algorithms[0])
        if FLAGS.budget_factor and first_timer and first_timer.reached_wall_seconds:
            budget = FLAGS.budget_factor * first_timer.reached_wall_seconds
        timer = nd.callbacks.TimeToAccuracy(x_test, y_test, FLAGS.target, budget_seconds=budget)
        history = trainer.fit(clients, rounds=int(max_rounds.get(name, 100)), verbose=0,
                              callbacks=[timer, _PrintRound(name)])
        acc = history.history["val_accuracy"]
        results[name] = timer
        print(json.dumps({
            "algorithm": name, "clients": FLAGS.clients, "target": FLAGS.target,
            "reached": timer.reached_round is not None,
            "rounds_to_target": None if timer.reached_round is None else timer.reached_round + 1,
            "train_seconds_to_target": timer.reached_train_seconds,
            "wall_seconds_to_target": timer.reached_wall_seconds,
            "rounds_run": len(acc), "budget_seconds": budget, "best_accuracy": round(max(acc), 4),
            "median_round_seconds": round(sorted(history.history["round_seconds"])[len(acc) // 2],
                                          2)}), flush=True)
    first, *rest = FLAGS.algorithms
    for other in rest:
        a, b = results[first], results[other]
        if a.reached_round is not None and b.reached_round is not None:
            print(json.dumps({"ratio": f"{first}/{other}", "train_seconds_to_target":
                              round(a.reached_train_seconds / b.reached_train_seconds, 3),
                              "wall_seconds_to_target":
                              round(a.reached_wall_seconds / b.reached_wall_seconds, 3)}))
        else:
            print(json.dumps({"ratio": f"{first}/{other}", "note": "not both reached the target "
                              "within their round budgets; see the lines above"}))


if __name__ == "__main__":
    app.run(main)
