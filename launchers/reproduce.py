"""The paper's table at the paper's scale: the `ntkdfl-reproduce` command as a script
(ntkdfl_tf/cli/reproduce.py).

    python launchers/reproduce.py --helpshort
"""

from ntkdfl_tf.cli import reproduce

if __name__ == "__main__":
    reproduce.run()
