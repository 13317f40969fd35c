"""Train one DFL run: `python launchers/train.py [--preset=quick|paper] [--flag=value ...]`.

Flags left unset take the preset's value, then the library default (ntkdfl_tf.experiment.Config).
"""

import sys

from absl import app, logging

import run_flags
from ntkdfl_tf import experiment

run_flags.define()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds reports every file it reads at INFO
    try:
        experiment.run(experiment.Config(**run_flags.config_values()))
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:  # one clear line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
