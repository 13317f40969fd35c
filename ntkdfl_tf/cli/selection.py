"""Which client models to average: `ntkdfl-selection [--flag=value ...]`.

Trains like ntkdfl-train (or resumes: a logdir whose checkpoint already holds --rounds
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

from absl import flags

from ntkdfl_tf import data, experiment, selection
from ntkdfl_tf.cli import flags as cli_flags

cli_flags.define()
flags.DEFINE_float("validation_fraction", 0.5, "Share of the test set held out for validation.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg = experiment.Config(**cli_flags.config_values())
    experiment.validate(cfg)
    dataset = data.load(cfg.dataset, data_dir=cfg.data_dir)
    # split first: a bad --validation_fraction fails before any training
    val, test = selection.split_validation(*dataset[1], fraction=FLAGS.validation_fraction,
                                           seed=cfg.seed)
    trainer, _ = experiment.run(cfg, dataset=dataset)
    report = selection.compare_orders(trainer, *val, *test, seed=cfg.seed)
    csv_path = selection.write_csv(os.path.join(cfg.logdir, "selection.csv"), report)
    figure = selection.plot(os.path.join(cfg.logdir, "selection.png"), report)
    summary = report.summary()
    verdict = "beats" if report.gain > 0 else "ties" if report.gain == 0 else "loses to"
    print(f"greedy selection ({summary['selected_count']} of {summary['present_clients']} "
          f"models) {verdict} the uniform average on test: "
          f"{summary['selected_test_accuracy']:.4f} vs {summary['uniform_test_accuracy']:.4f}",
          flush=True)
    print(json.dumps({"logdir": cfg.logdir, **summary, "csv": csv_path, "figure": figure}),
          flush=True)


def run():
    """The ``ntkdfl-selection`` command."""
    cli_flags.run(main, __doc__)
