"""Datasets, partitioners and the stacked per-client data container."""

from ntkdfl_tf.data.arrays import from_arrays
from ntkdfl_tf.data.client_data import ClientData, Neighbourhoods
from ntkdfl_tf.data.load import (DATASETS, DataChecksumError, DataNotFoundError, check_name,
                                 load)
from ntkdfl_tf.data.partition import (PARTITIONS, dirichlet_partition, iid_partition,
                                      shard_partition)
from ntkdfl_tf.data.source import DatasetSource

# Pixel mean and std (in [0, 1] units) of the bundled datasets, used by the models' built-in
# standardisation; models.for_data computes them from other data.
STATS = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
