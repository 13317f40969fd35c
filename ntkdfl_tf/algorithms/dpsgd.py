"""D-PSGD: one local epoch of minibatch SGD per round, then gossip (neighbour) averaging."""

import dataclasses
import typing

from ntkdfl_tf.algorithms.local_sgd import LocalSGD


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGD(LocalSGD):
    """Paper defaults: lr 0.1, batch 10, one local epoch per round (NTK-DFL.md's "0.1 / 10 / 1";
    the reference runs its DFedAvgM script with one local epoch and no momentum). Lian et al.'s
    original D-PSGD takes one step per round: ``local_steps=1``."""

    learning_rate: typing.Any = 0.1
    batch_size: int = 10
    local_epochs: int = 1

    name: typing.ClassVar[str] = "dpsgd"
