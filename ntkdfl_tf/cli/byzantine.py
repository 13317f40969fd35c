"""The Byzantine matrix, one part at a time (ntkdfl_tf.robustness; `ntkdfl-byzantine`):

    ntkdfl-byzantine --part=no_attack --logdir=runs/byzantine
    ntkdfl-byzantine --part=attacks --logdir=runs/byzantine
    ntkdfl-byzantine --part=fractions --logdir=runs/byzantine
    ntkdfl-byzantine --part=seeds --logdir=runs/byzantine
    ntkdfl-byzantine --part=dpsgd --logdir=runs/byzantine

Writes <logdir>/<cell>/history.csv, <logdir>/matrix.csv, matrix.md and heatmap.png; a killed part
resumes where it stopped when run again. To publish a logdir's results (as RESULTS.md §8 does):

    ntkdfl-byzantine --logdir=runs/byzantine --export=docs/results/byzantine
"""

from absl import flags

from ntkdfl_tf import experiment, robustness
from ntkdfl_tf.cli import flags as cli_flags

SWEPT = ("algorithm", "attack", "attack_params", "byzantine_fraction", "defence",
         "final_aggregation", "run_name", "save_dir")
cli_flags.define(skip=SWEPT)
flags.DEFINE_enum("part", "attacks", list(robustness.PARTS), "Which part of the matrix to run.")
flags.DEFINE_list("algorithms", ["ntk_dfl", "dfedavg"], "Algorithms of the matrix.")
flags.DEFINE_float("fraction", 0.2, "Byzantine share of the attacks and seeds parts.")
flags.DEFINE_string("only", None, "Run only the cells whose name contains this text.")
flags.DEFINE_string("headline", None, "For the fractions, seeds and dpsgd parts: each algorithm's "
                    "strongest attack and best defence, e.g. ntk_dfl=jacobian_sign_flip/"
                    "balance+screen,dfedavg=gaussian/clipping (default: read from the attacks "
                    "rows).")
flags.DEFINE_string("export", None, "Copy the logdir's results (matrix.csv, histories, "
                    "matrix.md, heatmap.png) into this directory and exit; runs nothing.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS["preset"].using_default_value:
        FLAGS.preset = "byzantine"
    values = cli_flags.config_values(skip=SWEPT)
    headline = robustness.parse_headline(FLAGS.headline) if FLAGS.headline else None
    if FLAGS.export:
        rows = robustness.export(values["logdir"], FLAGS.export, headline)
        print(f"{len(rows)} cells exported to {FLAGS.export}")
        return
    robustness.run_part(experiment.Config(**values), FLAGS.part, FLAGS.algorithms,
                        FLAGS.fraction, headline=headline, only=FLAGS.only)


def run():
    """The ``ntkdfl-byzantine`` command."""
    cli_flags.run(main, __doc__)
