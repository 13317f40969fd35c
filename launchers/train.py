"""Train one DFL run: the `ntkdfl-train` command as a script (ntkdfl_tf/cli/train.py).

    python launchers/train.py --helpshort
"""

from ntkdfl_tf.cli import train

if __name__ == "__main__":
    train.run()
