"""DFedSAM: DFedAvg whose local steps are sharpness-aware (SAM)."""

import dataclasses
import typing

from ntkdfl_tf.algorithms.local_sgd import LocalSGD


@dataclasses.dataclass(frozen=True, kw_only=True)
class DFedSAM(LocalSGD):
    """Paper defaults: lr 0.01, batch 32, 5 local epochs, rho 0.01."""

    learning_rate: typing.Any = 0.01
    batch_size: int = 32
    local_epochs: int = 5
    sam_rho: float = 0.01

    name: typing.ClassVar[str] = "dfedsam"
