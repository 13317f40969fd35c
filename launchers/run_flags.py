"""The commands' shared flags for scripts in launchers/ (``import run_flags``): see
ntkdfl_tf/cli/flags.py."""

from ntkdfl_tf.cli.flags import config_values, define, run  # noqa: F401
