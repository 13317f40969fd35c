"""The Byzantine matrix, one part at a time: the `ntkdfl-byzantine` command as a script (ntkdfl_tf/cli/byzantine.py).

    python launchers/byzantine.py --helpshort
"""

from ntkdfl_tf.cli import byzantine

if __name__ == "__main__":
    byzantine.run()
