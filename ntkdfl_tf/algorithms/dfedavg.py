"""DFedAvg: E local SGD epochs per round on the client's own data, then neighbour averaging."""

import dataclasses
import typing

from ntkdfl_tf.algorithms.local_sgd import LocalSGD


@dataclasses.dataclass(frozen=True, kw_only=True)
class DFedAvg(LocalSGD):
    """Defaults from the NTK-DFL paper's baseline table: lr 0.1, batch 25, 20 local epochs."""

    learning_rate: typing.Any = 0.1
    batch_size: int = 25
    local_epochs: int = 20

    name: typing.ClassVar[str] = "dfedavg"
