"""Compare algorithms on identical seeds: the `ntkdfl-compare` command as a script (ntkdfl_tf/cli/compare.py).

    python launchers/compare.py --helpshort
"""

from ntkdfl_tf.cli import compare

if __name__ == "__main__":
    compare.run()
