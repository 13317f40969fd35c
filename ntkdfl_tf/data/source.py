"""DatasetSource: where a ClientData's samples come from, so that another process can load them.

A ClientData built by a partitioner keeps, per client, the indices of its samples in the arrays
it was cut from (``ClientData.indices``). When those arrays are a split of a dataset that
``nd.data.load`` loads by name, ``clients.with_source(DatasetSource(name, data_dir))`` records
that, and a remote executor (``RayExecutor``) sends its actors the indices instead of the
samples: each actor loads the dataset files on its own node.
"""

import dataclasses
import hashlib

import numpy as np

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A split of a dataset that ``nd.data.load`` loads by name.

    Attributes:
        name: the dataset, as ``nd.data.load`` takes it (``"fashion_mnist"``, ``"mnist"``, a
            tfds name).
        data_dir: the folder holding its original files *on the nodes that load it*; None
            searches each node's ``$NTKDFL_DATA_DIR`` (and Debian's folder, and tfds) as
            ``nd.data.load`` does.
        tfds_data_dir: where tfds keeps its prepared copy on those nodes (tfds's default: None).
        split: ``"train"`` or ``"test"``: the arrays the indices point into.
    """

    name: str
    data_dir: str = None
    tfds_data_dir: str = None
    split: str = "train"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DatasetSource needs a dataset name, got {self.name!r}.")
        if self.split not in SPLITS:
            raise ValueError(f"DatasetSource split must be one of {', '.join(SPLITS)}, got "
                             f"{self.split!r}.")

    def load(self):
        """``(x, y)`` of the split, read from the dataset files as ``nd.data.load`` reads them."""
        from ntkdfl_tf.data.load import load  # tfds is imported only when loading

        train, test = load(self.name, data_dir=self.data_dir, tfds_data_dir=self.tfds_data_dir)
        return train if self.split == "train" else test


def client_digests(x, y):
    """A short digest of each client's padded samples and labels, ``[K]`` of 16-byte strings.

    The driver sends these with the indices, and whoever rebuilds the clients from the source
    compares: a source that does not describe the data (other files, other indices) fails loudly
    instead of training on other samples.
    """
    return [hashlib.blake2b(np.ascontiguousarray(x[k]).tobytes()
                            + np.ascontiguousarray(y[k]).tobytes(), digest_size=16).digest()
            for k in range(len(x))]
