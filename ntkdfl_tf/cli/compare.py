r"""Compare algorithms on identical seeds, optionally over sweeps (`ntkdfl-compare`).

    ntkdfl-compare --algorithms=ntk_dfl,dfedavg --rounds=20 --logdir=runs/cmp
    ntkdfl-compare --algorithms=ntk_dfl --alphas=0.05,0.1,0.5,1.0
    ntkdfl-compare --algorithms=ntk_dfl --num_neighbors=2,5,10 --topologies=random,ring
    ntkdfl-compare --algorithms=ntk_dfl --ablation
    ntkdfl-compare --algorithms=ntk_dfl,dfedavg --dropouts=0,0.1,0.3,0.5
    ntkdfl-compare --algorithms=ntk_dfl,dfedavg --codecs='identity;factored' \
        --weight_codecs='identity;quantize:bits=8'

Takes every flag of ntkdfl-train except the swept ones.
Writes <logdir>/<run>/history.csv, <logdir>/summary.csv, accuracy.png, accuracy_vs_bytes.png.
"""

from absl import flags

from ntkdfl_tf import compare, experiment
from ntkdfl_tf.cli import flags as cli_flags

SWEPT = ("algorithm", "alpha", "num_neighbors", "topology", "dropout", "codec", "weight_codec",
         "run_name", "save_dir")
cli_flags.define(skip=SWEPT)
flags.DEFINE_list("algorithms", ["ntk_dfl", "dfedavg"], "Algorithms to compare.")
flags.DEFINE_list("alphas", None, "Dirichlet alphas to sweep, 'iid' for an IID partition "
                  "(default: 0.1).")
flags.DEFINE_list("num_neighbors", None, "Random-graph degrees to sweep (default: 5).")
flags.DEFINE_list("topologies", None, "Topologies to sweep, e.g. random,ring (default: random).")
flags.DEFINE_list("dropouts", None, "Client dropout probabilities to sweep (default: 0).")
flags.DEFINE_boolean("ablation", False, "Also run NTK-DFL without per-round averaging.")
flags.DEFINE_string("codecs", None, "NTK-DFL package codecs to sweep, separated by ';' "
                    "(commas belong to codec parameters), e.g. 'identity;factored;"
                    "subsample:fraction=0.25' (default: identity).")
flags.DEFINE_string("weight_codecs", None, "Weight-message codecs to sweep, separated by ';', "
                    "e.g. 'identity;quantize:bits=8' (default: identity).")
flags.DEFINE_float("target_accuracy", 0.85, "Accuracy whose first round summary.csv reports.")
FLAGS = flags.FLAGS


def _codec_list(text):
    return [c.strip() for c in (text or "").split(";") if c.strip()] or None


def main(argv):
    del argv
    values = cli_flags.config_values(skip=SWEPT)
    if FLAGS["logdir"].value is None:
        values["logdir"] = "runs/compare"
    compare.compare(experiment.Config(**values), FLAGS.algorithms,
                    alphas=[a if a == "iid" else float(a) for a in FLAGS.alphas or []],
                    num_neighbors=[int(k) for k in FLAGS.num_neighbors or []],
                    topologies=FLAGS.topologies, ablation=FLAGS.ablation,
                    target_accuracy=FLAGS.target_accuracy,
                    dropouts=[float(p) for p in FLAGS.dropouts or []],
                    codecs=_codec_list(FLAGS.codecs),
                    weight_codecs=_codec_list(FLAGS.weight_codecs))


def run():
    """The ``ntkdfl-compare`` command."""
    cli_flags.run(main, __doc__)
