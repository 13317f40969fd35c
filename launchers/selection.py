"""Which client models to average: the `ntkdfl-selection` command as a script (ntkdfl_tf/cli/selection.py).

    python launchers/selection.py --helpshort
"""

from ntkdfl_tf.cli import selection

if __name__ == "__main__":
    selection.run()
