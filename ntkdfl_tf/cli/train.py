"""Train one DFL run: `ntkdfl-train [--preset=quick|paper|...] [--flag=value ...]`.

Flags left unset take the preset's value, then the library default (ntkdfl_tf.experiment.Config).
Writes <logdir>/history.csv, TensorBoard events (scalars, client accuracies, the configuration as
hparams) and the aggregated model <save_dir>/<run_name>.keras.
"""

from ntkdfl_tf import experiment
from ntkdfl_tf.cli import flags as cli_flags

cli_flags.define()


def main(argv):
    del argv
    experiment.run(experiment.Config(**cli_flags.config_values()))


def run():
    """The ``ntkdfl-train`` command."""
    cli_flags.run(main, __doc__)
