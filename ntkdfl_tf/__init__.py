"""ntkdfl_tf: decentralized federated learning (NTK-DFL and baselines) the Keras way."""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter quiet

from ntkdfl_tf import (algorithms, callbacks, data, defences, executors, kernels,  # noqa: E402
                       models, privacy, protocol, robustness, selection, topology)
from ntkdfl_tf.defences import Defence  # noqa: E402
from ntkdfl_tf.errors import CheckpointError, DivergenceError  # noqa: E402
from ntkdfl_tf.faults import Faults  # noqa: E402
from ntkdfl_tf.protocol import Byzantine  # noqa: E402
from ntkdfl_tf.trainer import DecentralizedTrainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Byzantine", "CheckpointError", "DecentralizedTrainer", "Defence", "DivergenceError",
           "Faults", "algorithms", "callbacks", "data", "defences", "executors", "kernels",
           "models", "privacy", "protocol", "robustness", "selection", "topology"]
