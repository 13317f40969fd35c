"""D-PSGD: one local minibatch gradient step per round, then gossip (neighbour) averaging."""

import dataclasses
import typing

from ntkdfl_tf.algorithms.local_sgd import LocalSGD


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGD(LocalSGD):
    """Paper defaults: lr 0.1, batch 10, one step per round."""

    learning_rate: typing.Any = 0.1
    batch_size: int = 10
    local_steps: int = 1

    name: typing.ClassVar[str] = "dpsgd"
