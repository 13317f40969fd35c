"""Which client models to average: `python launchers/selection.py [--flag=value ...]`.

Trains like launchers/train.py (or resumes: a logdir whose checkpoint already holds --rounds
runs no rounds), then splits the test set into validation and test (50:50 as in the paper),
and writes

  <logdir>/selection.csv  test accuracy against the number of models averaged, for the
                          best-first, random and worst-first orders (validation ranks them)
  <logdir>/selection.png  the same as a figure, with the greedy choice and the uniform average

and prints a one-line summary, then one JSON line: the greedy validation choice and its test
accuracy against the uniform average of all present clients.
"""

import json
import os
import sys

from absl import app, flags, logging

import run_flags
from ntkdfl_tf import data, experiment, selection

run_flags.define()
flags.DEFINE_float("validation_fraction", 0.5, "Share of the test set held out for validation.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds reports every file it reads at INFO
    try:
        cfg = experiment.Config(**run_flags.config_values())
        experiment.validate(cfg)
        dataset = data.load(cfg.dataset, data_dir=cfg.data_dir)
        # split first: a bad --validation_fraction fails before any training
        val, test = selection.split_validation(*dataset[1], fraction=FLAGS.validation_fraction,
                                               seed=cfg.seed)
        trainer, _ = experiment.run(cfg, dataset=dataset)
        report = selection.compare_orders(trainer, *val, *test, seed=cfg.seed)
        csv_path = selection.write_csv(os.path.join(cfg.logdir, "selection.csv"), report)
        figure = selection.plot(os.path.join(cfg.logdir, "selection.png"), report)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:  # one clear line
        sys.exit(f"error: {e}")
    summary = report.summary()
    verdict = "beats" if report.gain > 0 else "ties" if report.gain == 0 else "loses to"
    print(f"greedy selection ({summary['selected_count']} of {summary['present_clients']} "
          f"models) {verdict} the uniform average on test: "
          f"{summary['selected_test_accuracy']:.4f} vs {summary['uniform_test_accuracy']:.4f}",
          flush=True)
    print(json.dumps({"logdir": cfg.logdir, **summary, "csv": csv_path, "figure": figure}),
          flush=True)


if __name__ == "__main__":
    app.run(main)
