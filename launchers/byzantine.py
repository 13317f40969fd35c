"""The Byzantine matrix, one part at a time (ntkdfl_tf.robustness):

    python launchers/byzantine.py --part=no_attack --logdir=runs/byzantine
    python launchers/byzantine.py --part=attacks --logdir=runs/byzantine
    python launchers/byzantine.py --part=fractions --logdir=runs/byzantine
    python launchers/byzantine.py --part=seeds --logdir=runs/byzantine
    python launchers/byzantine.py --part=dpsgd --logdir=runs/byzantine

Writes <logdir>/<cell>/history.csv, <logdir>/matrix.csv and <logdir>/heatmap.png; a killed part
resumes where it stopped when run again.
"""

import sys

from absl import app, flags, logging

import run_flags
from ntkdfl_tf import experiment, robustness

SWEPT = ("algorithm", "attack", "attack_params", "byzantine_fraction", "defence",
         "final_aggregation", "run_name", "save_dir")
run_flags.define(skip=SWEPT)
flags.DEFINE_enum("part", "attacks", list(robustness.PARTS), "Which part of the matrix to run.")
flags.DEFINE_list("algorithms", ["ntk_dfl", "dfedavg"], "Algorithms of the matrix.")
flags.DEFINE_float("fraction", 0.2, "Byzantine share of the attacks and seeds parts.")
flags.DEFINE_string("only", None, "Run only the cells whose name contains this text.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS["preset"].using_default_value:
        FLAGS.preset = "byzantine"
    values = run_flags.config_values(skip=SWEPT)
    try:
        robustness.run_part(experiment.Config(**values), FLAGS.part, FLAGS.algorithms,
                            FLAGS.fraction, only=FLAGS.only)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:  # one clear line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
