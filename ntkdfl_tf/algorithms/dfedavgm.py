"""DFedAvgM: DFedAvg with heavy-ball momentum in the local steps."""

import dataclasses
import typing

from ntkdfl_tf.algorithms.local_sgd import LocalSGD


@dataclasses.dataclass(frozen=True, kw_only=True)
class DFedAvgM(LocalSGD):
    """Paper defaults: lr 0.01, batch 50, 20 local epochs, momentum 0.9.

    The momentum buffers start at zero every round, as a fresh local optimizer does in the
    reference.
    """

    learning_rate: typing.Any = 0.01
    batch_size: int = 50
    local_epochs: int = 20
    momentum: float = 0.9

    name: typing.ClassVar[str] = "dfedavgm"
