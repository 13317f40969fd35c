"""DisPFL (Dai et al., ICML 2022): decentralized sparse training of personalised models.

Every client keeps its own sparse mask over the model's weights (ERK-initialised at a fixed
density, each client drawn independently), trains only its masked weights, and averages with
its neighbours mask-aware: each coordinate over the neighbours (itself included) whose sent
mask contains it, then restricted to its own mask. Each round the mask evolves as in RigL:
the ``drop`` smallest-magnitude active weights are pruned and as many inactive coordinates
regrown by largest gradient magnitude, ``drop`` decaying with a cosine schedule.

Round ``r`` here: (1) from round 1, each client evolves the mask it trained with in round
``r - 1``, at its trained weights, with the schedule's fraction for ``r - 1``; (2) clients send
their trained weights with the mask they were trained under and average mask-aware onto their
evolved mask; (3) local training under the evolved mask. This is the reference's order
(train, evolve, then next round aggregate) with the evolution moved to the start of the next
round, so the state between rounds is one mask per client, not two.

Defaults are the authors' code (``fedml_experiments/standalone/DisPFL``): dense ratio 0.5
(sparsity 0.5), anneal factor 0.5, ERK power 1, SGD lr 0.1 decayed by 0.998 per round, 5 local
epochs, batch 128, weight decay 5e-4, gradient-norm clip 10, no momentum; regrowth by the
gradient of one batch at the trained weights (the paper's rule; the released scripts pass
``--dis_gradient_check``, which regrows at random instead).
"""

import dataclasses
import math
import typing

import numpy as np
import tensorflow as tf

from ntkdfl_tf import protocol
from ntkdfl_tf.algorithms import base
from ntkdfl_tf.algorithms.local_sgd import LocalSGD, TrainContext


class DisPFLState(typing.NamedTuple):
    """Each client's personal mask: one boolean ``[K, *shape]`` array per trainable variable."""

    masks: list


class EvolveContext(typing.NamedTuple):
    """What every mask-evolution call shares: the fraction of active weights to replace."""

    drop_fraction: float


class EvolveCall(typing.NamedTuple):
    """Mask evolution of a group of clients at their trained weights.

    Attributes:
        members: the clients, int32 ``[B]`` (the last group padded by repetition).
        weights: their trained weights, NumPy ``[B, *shape]`` per variable.
        masks: the masks they trained under, bool ``[B, *shape]`` per variable.
        batch: sample indices of the batch whose gradient ranks regrowth ``[B, batch]``
            (index ``n_max``: padding).
    """

    members: np.ndarray
    weights: list
    masks: list
    batch: np.ndarray

    @property
    def reads(self):
        return np.unique(self.members)


class EvolveResult(typing.NamedTuple):
    """A group's evolved masks, bool ``[B, *shape]`` per variable."""

    masks: list


class MaskedTrainCall(typing.NamedTuple):
    """Local training of a group of clients restricted to their masks.

    Attributes:
        members: the clients, int32 ``[B]``; weights: NumPy ``[B, *shape]`` per variable.
        masks: bool ``[B, *shape]`` per variable; steps: ``[steps, B, batch]`` sample indices.
    """

    members: np.ndarray
    weights: list
    masks: list
    steps: np.ndarray

    @property
    def reads(self):
        return np.unique(self.members)


def erk_densities(shapes, density, power_scale=1.0):
    """Per-variable densities of the Erdős–Rényi-kernel rule whose total is ``density``.

    A variable of shape s gets density ``eps * (sum(s) / prod(s)) ** power_scale``; variables
    whose density would pass 1 are made dense and ``eps`` re-solved over the rest (as RigL and
    DisPFL's ``calculate_sparsities``, which applies it to every parameter, biases included).

    Args:
        shapes: the trainable variables' shapes. density: the overall fraction kept, (0, 1].
        power_scale: the exponent on the raw ERK score.

    Returns:
        A list of floats in (0, 1], one per variable.
    """
    sizes = np.array([math.prod(s) for s in shapes], np.float64)
    raw = np.array([(sum(s) / math.prod(s)) ** power_scale for s in shapes])
    dense = np.zeros(len(shapes), bool)
    while True:
        kept_budget = density * sizes[~dense].sum() - (1 - density) * sizes[dense].sum()
        epsilon = kept_budget / (raw[~dense] * sizes[~dense]).sum()
        over = ~dense & (raw * epsilon > 1)
        if not over.any():
            return [1.0 if d else float(epsilon * p) for d, p in zip(dense, raw)]
        dense |= ~dense & (raw == raw[~dense].max())  # densify the largest, then re-solve


def drop_fraction(anneal_factor, round_index, anneal_rounds):
    """The fraction of active weights replaced after round ``round_index``: cosine decay from
    ``anneal_factor`` at round 0 towards 0 at ``anneal_rounds``."""
    return anneal_factor / 2 * (1 + math.cos(round_index * math.pi / anneal_rounds))


def _ranks(scores):
    """Each entry's position in its row's ascending order (ties by index): ``[B, P]`` int."""
    order = np.argsort(scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None], axis=1)
    return ranks


def evolve_masks(masks, weights, gradients, fraction):
    """RigL's prune-and-regrow step on every client's mask; the density stays the same.

    Per client and variable, ``n = ceil(fraction * active)`` active coordinates with the
    smallest ``|weight|`` are pruned, then the ``n`` inactive coordinates (the pruned ones
    included) with the largest ``|gradient|`` are regrown. Ties go to the lower index.

    Args:
        masks: bool ``[B, *shape]`` per variable. weights, gradients: ``[B, *shape]`` each.
        fraction: the share of active coordinates replaced, in [0, 1].

    Returns:
        The new masks, bool ``[B, *shape]`` per variable.
    """
    out = []
    for mask, w, g in zip(masks, weights, gradients):
        shape = np.shape(mask)
        b = shape[0]
        mask = np.asarray(mask, bool).reshape(b, -1)
        w, g = np.asarray(w).reshape(b, -1), np.asarray(g).reshape(b, -1)
        replaced = np.ceil(fraction * mask.sum(1)).astype(np.int64)[:, None]
        # inactive coordinates score +inf so pruning never picks them
        kept = mask & (_ranks(np.where(mask, np.abs(w), np.inf)) >= replaced)
        # active ones score +inf in the descending (negated) order so regrowth never picks them
        grown = ~kept & (_ranks(np.where(kept, np.inf, -np.abs(g))) < replaced)
        out.append((kept | grown).reshape(shape))
    return out


def masked_average(sent, sent_masks, own_masks, delivery):
    """Each client's mask-aware average of its own and its neighbours' sent weights.

    Coordinate by coordinate, the mean over the senders (the client itself included) whose
    sent mask holds it, zero where none does; then zero outside the client's own mask.

    Args:
        sent: NumPy ``[K, *shape]`` per variable, the weights every client sends.
        sent_masks: bool ``[K, *shape]`` per variable, the masks they are sent with.
        own_masks: bool ``[K, *shape]`` per variable, each client's mask for this round.
        delivery: the ``protocol.Delivery`` of the weights messages (``mask`` set; a message
            without one, e.g. a Byzantine forgery, counts as dense).

    Returns:
        List of float32 NumPy ``[K, *shape]`` arrays.
    """
    k = sent[0].shape[0]
    if delivery.unchanged:  # the senders' own rows: one product with the closed neighbourhood
        closed = (protocol.heard_from(delivery.messages, k) | np.eye(k, dtype=bool))
        closed = tf.constant(closed, tf.float32)
        def spread(a):
            return tf.matmul(closed, tf.reshape(tf.constant(a, tf.float32), [k, -1])).numpy()
        totals = [spread(np.where(m, w, 0)).reshape(w.shape) for w, m in zip(sent, sent_masks)]
        counts = [spread(m).reshape(m.shape) for m in sent_masks]
    else:  # decoded or forged arrays: sum them per receiver
        totals = [np.where(m, w, 0).astype(np.float32) for w, m in zip(sent, sent_masks)]
        counts = [m.astype(np.float32) for m in sent_masks]
        for msg in delivery.messages:
            for v, w in enumerate(msg.weights):
                m = np.ones(w.shape, bool) if msg.mask is None else msg.mask[v]
                totals[v][msg.receiver] += np.where(m, w, 0)
                counts[v][msg.receiver] += m
    return [np.where(own & (c > 0), t / np.maximum(c, 1), 0).astype(np.float32)
            for t, c, own in zip(totals, counts, own_masks)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DisPFL(LocalSGD):
    """Personalised sparse models: masked local SGD, mask-aware averaging, mask evolution.

    Args:
        learning_rate: local step size at round 0 (float or ``round -> float``), times
            ``lr_decay ** round``.
        lr_decay: per-round factor on the learning rate.
        batch_size, local_epochs, local_steps, client_batch: as ``LocalSGD``.
        weight_decay: L2 coefficient added to the gradient (PyTorch SGD's ``weight_decay``).
        clip_norm: each client's gradient is rescaled to at most this global 2-norm (None:
            no clipping).
        sparsity: the fraction of weights each mask leaves out (the paper's 0.5).
        anneal_factor: the fraction of active weights replaced after round 0; it decays
            with a cosine to 0 at ``anneal_rounds``.
        anneal_rounds: the cosine's length; None: the rounds of the ``fit``.
        erk_power_scale: ERK's exponent (1: the reference).
    """

    learning_rate: typing.Any = 0.1
    lr_decay: float = 0.998
    batch_size: int = 128
    local_epochs: int = 5
    weight_decay: float = 5e-4
    clip_norm: float = 10.0
    sparsity: float = 0.5
    anneal_factor: float = 0.5
    anneal_rounds: int = None
    erk_power_scale: float = 1.0

    name: typing.ClassVar[str] = "dispfl"
    state_type: typing.ClassVar[type] = DisPFLState

    def __post_init__(self):
        super().__post_init__()
        if self.momentum or self.sam_rho:
            raise ValueError("DisPFL trains with plain SGD (the reference's momentum 0); "
                             f"got momentum={self.momentum!r}, sam_rho={self.sam_rho!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}.")
        if not 0.0 <= self.anneal_factor <= 1.0:
            raise ValueError(f"anneal_factor must be in [0, 1], got {self.anneal_factor!r}.")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}.")
        if self.weight_decay < 0 or (self.clip_norm is not None and self.clip_norm <= 0):
            raise ValueError(f"weight_decay must be >= 0 and clip_norm > 0 or None, got "
                             f"{self.weight_decay!r} and {self.clip_norm!r}.")
        if self.anneal_rounds is not None:
            base.positive_int("anneal_rounds", self.anneal_rounds)

    def make_worker(self, fns):
        from ntkdfl_tf.algorithms.dispfl_worker import DisPFLWorker

        return DisPFLWorker(self, fns)

    def initial_state(self, num_clients, fns, rng):
        """Each client's own random mask with the ERK density of every variable."""
        densities = erk_densities(fns.shapes, 1.0 - self.sparsity, self.erk_power_scale)
        masks = []
        for shape, density in zip(fns.shapes, densities):
            size = math.prod(shape)
            kept = int(density * size)  # as the reference's init_masks
            chosen = np.argsort(rng.random((num_clients, size)), axis=1)[:, :kept]
            mask = np.zeros((num_clients, size), bool)
            np.put_along_axis(mask, chosen, True, axis=1)
            masks.append(mask.reshape((num_clients,) + tuple(shape)))
        return DisPFLState(masks)

    def run_round(self, round_input, channel, executor):
        r = round_input
        if r.state is None:
            raise ValueError("DisPFL needs its masks: RoundInput.state from initial_state().")
        if r.defence is not None and r.defence.weight_rule != "none":
            raise ValueError(f"DisPFL averages mask-aware; the robust weight rule of "
                             f"{r.defence.name!r} does not apply to sparse models.")
        lr = base.learning_rate_at(self.learning_rate, r.index) * self.lr_decay ** r.index
        steps = self.schedule(r.counts, r.max_samples, r.rng)
        k = r.num_clients
        sent = [np.asarray(w) for w in r.weights]
        sent_masks = [np.asarray(m, bool) for m in r.state.masks]
        groups = base.client_groups(k, min(self.client_batch, k))
        fraction = 0.0
        masks = sent_masks
        if r.index > 0:
            fraction = drop_fraction(self.anneal_factor, r.index - 1,
                                     self.anneal_rounds or r.total_rounds)
        if fraction > 0:  # regrowth ranks the gradient of this round's first batch
            calls = [EvolveCall(g.indices, [w[g.indices] for w in sent],
                                [m[g.indices] for m in sent_masks], steps[0, g.indices])
                     for g in groups]
            results = executor.map(EvolveContext(fraction), calls)
            masks = [base.scatter_groups(groups, [res.masks[v] for res in results], k, bool)
                     for v in range(len(sent))]
        delivery = channel.deliver(protocol.weights_messages(r.graph, sent, sent_masks),
                                   own=sent)
        averaged = masked_average(sent, sent_masks, masks, delivery)
        calls = [MaskedTrainCall(g.indices, [w[g.indices] for w in averaged],
                                 [m[g.indices] for m in masks], steps[:, g.indices])
                 for g in groups]
        # progress: the training groups (the regrowth map above is one batch per client)
        results = executor.map(TrainContext(lr), calls, progress=r.progress)
        losses = base.scatter_groups(groups, [res.loss for res in results], k, np.float64)
        trained = [base.scatter_groups(groups, [res.weights[v] for res in results], k)
                   for v in range(len(sent))]
        changed = sum(int((a != b).sum()) for a, b in zip(masks, sent_masks))
        logs = {"loss": float(losses.mean()), "local_learning_rate": lr,
                "mask_drop_fraction": fraction,
                "mask_density": float(sum(m.sum() for m in masks) / sum(m.size for m in masks)),
                "mask_changed_fraction": changed / float(sum(m.size for m in masks))}
        return base.RoundOutput([tf.constant(w) for w in trained], logs, DisPFLState(masks))
