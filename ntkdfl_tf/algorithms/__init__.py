"""DFL algorithms behind one small interface (``base.Algorithm``): configuration and a round."""

from ntkdfl_tf.algorithms.base import Algorithm, RoundInput, RoundOutput, Worker
from ntkdfl_tf.algorithms.dfedavg import DFedAvg
from ntkdfl_tf.algorithms.dfedavgm import DFedAvgM
from ntkdfl_tf.algorithms.dfedsam import DFedSAM
from ntkdfl_tf.algorithms.dispfl import DisPFL
from ntkdfl_tf.algorithms.dpsgd import DPSGD
from ntkdfl_tf.algorithms.local_sgd import LocalSGD
from ntkdfl_tf.algorithms.ntkdfl import NTKDFL

ALGORITHMS = {cls.name: cls for cls in (NTKDFL, DFedAvg, DFedAvgM, DPSGD, DFedSAM, DisPFL)}


def get(name, **kwargs):
    """Builds the algorithm registered as ``name`` with its keyword arguments."""
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}.")
    return ALGORITHMS[name](**kwargs)
