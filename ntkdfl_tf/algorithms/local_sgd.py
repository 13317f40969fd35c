"""Local training then neighbour averaging: the DFedAvg family's configuration and round.

Every client runs the same number of steps per epoch, ``ceil(n_max / batch_size)``; a client's
batches draw from a permutation that puts its real samples first, so its batches past its own
data are empty and are skipped (no step, no momentum update). The work itself is
``LocalSGDWorker``'s.
"""

import dataclasses
import typing

import numpy as np
import tensorflow as tf

from ntkdfl_tf import protocol
from ntkdfl_tf.algorithms import base


class TrainContext(typing.NamedTuple):
    """What every call of a round shares: the local step size."""

    learning_rate: float


class TrainCall(typing.NamedTuple):
    """Local training of a group of clients on their own data.

    Attributes:
        members: the clients, int32 ``[B]`` (the last group padded by repetition).
        weights: their weights, NumPy ``[B, *shape]`` per variable.
        steps: per-step sample indices ``[steps, B, batch]`` (index ``n_max``: padding).
    """

    members: np.ndarray
    weights: list
    steps: np.ndarray

    @property
    def reads(self):
        return np.unique(self.members)


class TrainResult(typing.NamedTuple):
    """A group's trained weights (NumPy ``[B, *shape]``) and mean batch loss ``[B]``."""

    weights: list
    loss: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalSGD(base.Algorithm):
    """Local (momentum / sharpness-aware) SGD on each client's own data, then neighbour averaging.

    Args:
        learning_rate: local step size; a float or a callable ``round -> float``.
        batch_size: local minibatch size.
        local_epochs: passes over the client's data per round (ignored if ``local_steps``).
        local_steps: fixed number of local steps per round instead of epochs.
        momentum: heavy-ball momentum (0: plain SGD); buffers start at zero every round, as a
            fresh local optimizer does in the reference.
        sam_rho: sharpness-aware minimisation radius (0: off).
        client_batch: clients trained together in one TensorFlow call; each group is one
            step of the trainer's progress bar, so with the default 100 a round of at most
            100 clients is a single step.
    """

    learning_rate: typing.Any = 0.1
    batch_size: int = 25
    local_epochs: int = 20
    local_steps: int = None
    momentum: float = 0.0
    sam_rho: float = 0.0
    client_batch: int = 100

    name: typing.ClassVar[str] = "local_sgd"

    def __post_init__(self):
        if not callable(self.learning_rate):
            base.learning_rate_at(self.learning_rate, 0)
        for name in ("batch_size", "local_epochs", "client_batch"):
            base.positive_int(name, getattr(self, name))
        if self.local_steps is not None:
            base.positive_int("local_steps", self.local_steps)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if not self.sam_rho >= 0:
            raise ValueError(f"sam_rho must be >= 0, got {self.sam_rho!r}.")

    def make_worker(self, fns):
        from ntkdfl_tf.algorithms.local_sgd_worker import LocalSGDWorker

        return LocalSGDWorker(self, fns)

    def schedule(self, counts, n_max, rng):
        """Per-step sample indices [steps, K, batch]: each epoch a fresh per-client shuffle."""
        k = len(counts)
        per_epoch = -(-n_max // self.batch_size)
        epochs = self.local_epochs if self.local_steps is None else -(-self.local_steps // per_epoch)
        order = base.real_first_orders(counts, n_max, rng, repeats=epochs)
        pad = per_epoch * self.batch_size - n_max
        order = np.concatenate([order, np.full((epochs, k, pad), n_max, np.int32)], -1)
        steps = order.reshape(epochs, k, per_epoch, self.batch_size).transpose(0, 2, 1, 3)
        steps = steps.reshape(epochs * per_epoch, k, self.batch_size)
        return steps[:self.local_steps] if self.local_steps is not None else steps

    def run_round(self, round_input, channel, executor):
        r = round_input
        lr = base.learning_rate_at(self.learning_rate, r.index)
        steps = self.schedule(r.counts, r.max_samples, r.rng)
        k = r.num_clients
        own = [w.numpy() for w in r.weights]
        groups = base.client_groups(k, min(self.client_batch, k))
        calls = [TrainCall(g.indices, [w[g.indices] for w in own], steps[:, g.indices])
                 for g in groups]
        results = executor.map(TrainContext(lr), calls, progress=r.progress)
        losses = base.scatter_groups(groups, [res.loss for res in results], k, np.float64)
        trained = [base.scatter_groups(groups, [res.weights[v] for res in results], k)
                   for v in range(len(own))]
        delivery = channel.deliver(protocol.weights_messages(r.graph, trained), own=trained)
        averaged = base.average_received([tf.constant(w) for w in trained], delivery, r)
        logs = {"loss": float(losses.mean()), "local_learning_rate": lr}
        return base.RoundOutput(averaged, logs)
