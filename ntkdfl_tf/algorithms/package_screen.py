"""The package screen: NTK-DFL's defence against Byzantine Jacobian packages.

A receiver holds, per neighbour slot, the kernel block its package produces and the logits and
labels it sent. An honest neighbour's package looks like the receiver's own in three ways that
a receiver can check with what it already computes (the kernel H and the sent logits), so the
screen costs no extra Jacobian:

1. **Scale.** Its samples' kernel diagonal (||J(x)||² / C) is comparable to the receiver's own:
   a slot whose mean diagonal exceeds ``clip_ratio`` times the median of the receiver's own is
   scaled down to that ratio (its Jacobians by sqrt(clip_ratio / ratio)). H is quadratic in
   J, so without this one scaled package dominates the flow.
2. **Direction.** Its samples' kernel against the receiver's own samples is positive on
   average: for a ReLU network the output layer alone contributes h(x)·h(x') + 1 > 0 to every
   entry. A slot whose mean cross-kernel cosine with the own samples is at most
   ``min_cosine`` (a negated or noise-dominated Jacobian) is dropped.
3. **Fit.** Its sent logits and labels agree about as well as everyone else's at the
   receiver's averaged weights: a slot whose mean cross-entropy exceeds ``loss_ratio`` times
   the reference loss (flipped labels, shifted logits) and is worse than ``loss_floor`` times
   a uniform guess's (ln C) is dropped. The reference is the lower of the median over the
   neighbourhood's slots and the receiver's own slot's loss: with the median alone, a
   neighbourhood where half the slots are Byzantine (in the matrix some honest client meets
   one every round) has a Byzantine median, which raises the bar above the Byzantine slots
   themselves; the receiver's own loss cannot be raised by a sender. The floor is what keeps honest
   non-IID neighbours: once the clients fit their own data, the reference is small and an
   honest neighbour's unfamiliar classes exceed a few times it, but rarely ln C, which flipped
   labels exceed by far (RESULTS.md §8).

The receiver's own slot is never clipped or dropped. A dropped slot's rows leave the kernel,
the flow, the update and the tau choice (its mask is zeroed).
"""

import typing

import numpy as np

SCREEN_PARAMS = {"clip_ratio": 4.0, "min_cosine": 0.0, "loss_ratio": 3.0, "loss_floor": 1.0}


class ScreenResult(typing.NamedTuple):
    """What the screen decided, per neighbourhood row and per slot.

    Attributes:
        row_scale: ``[B, N]`` float32 factor on each row's Jacobian (1 unless clipped).
        row_keep: ``[B, N]`` float32, 0 on the rows of dropped slots.
        clipped, dropped: ``[B, S]`` bool per slot.
    """

    row_scale: np.ndarray
    row_keep: np.ndarray
    clipped: np.ndarray
    dropped: np.ndarray


def slot_means(values, mask, slots):
    """Mean of ``values`` ``[B, N]`` over each slot's real rows: ``[B, S]`` (NaN if none)."""
    b, n = mask.shape
    v = (values * mask).reshape(b, slots, n // slots).sum(-1)
    count = mask.reshape(b, slots, n // slots).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, v / np.maximum(count, 1), np.nan)


def own_diagonal(h, mask, slots):
    """The median kernel diagonal over each receiver's own real samples (slot 0): ``[B]``."""
    n = mask.shape[1] // slots
    diag = np.diagonal(h, axis1=1, axis2=2)[:, :n]
    own = np.where(mask[:, :n] > 0, diag, np.nan)
    with np.errstate(all="ignore"):
        return np.nanmedian(np.where(np.isnan(own).all(1, keepdims=True), 1.0, own), axis=1)


def screen(h, logits, labels, mask, slots, params=None):
    """The screen's decision for one slice of a group of receivers.

    Args:
        h: ``[B, N, N]`` kernel as received (after any tampering), N = slots * n.
        logits: ``[B, N, C]`` the logits the packages carry (at the averaged weights).
        labels: ``[B, N, C]`` one-hot labels as sent; mask: ``[B, N]`` real rows.
        slots: S, the neighbourhood's slots (slot 0 the receiver's own).
        params: ``SCREEN_PARAMS`` overrides.

    Returns:
        A ``ScreenResult``.
    """
    p = dict(SCREEN_PARAMS, **(params or {}))
    h, logits, labels, mask = (np.asarray(a, np.float64) for a in (h, logits, labels, mask))
    b, n_rows = mask.shape
    n = n_rows // slots
    present = ~np.isnan(slot_means(np.ones_like(mask), mask, slots))  # [B, S]
    present[:, 0] = False  # the receiver's own slot is never screened
    diag = np.diagonal(h, axis1=1, axis2=2)
    ratio = slot_means(diag, mask, slots) / np.maximum(own_diagonal(h, mask, slots), 1e-30)[:, None]
    clipped = present & (ratio > p["clip_ratio"])
    slot_scale = np.where(clipped, np.sqrt(p["clip_ratio"] / np.where(clipped, ratio, 1.0)), 1.0)
    row_scale = np.repeat(slot_scale, n, axis=1)
    # cosine of each slot's rows with the own rows, after clipping (scale-free anyway)
    own_rows = mask[:, :n]
    cross = np.einsum("bi,bij->bj", own_rows, h[:, :n, :]) / np.maximum(own_rows.sum(1), 1)[:, None]
    own_mean_diag = (diag[:, :n] * own_rows).sum(1) / np.maximum(own_rows.sum(1), 1)
    cosine = slot_means(cross / np.sqrt(np.maximum(own_mean_diag[:, None] * diag, 1e-30)), mask,
                        slots)
    wrong_way = present & ~(cosine > p["min_cosine"])
    shifted = logits - logits.max(-1, keepdims=True)
    loss = -(labels * (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))).sum(-1)
    slot_loss = slot_means(loss, mask, slots)
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(np.isnan(slot_loss).all(1, keepdims=True), 0.0, slot_loss),
                              axis=1)
    reference = np.fmin(median, slot_loss[:, 0])  # fmin: the median where there are no own rows
    uniform = np.log(labels.shape[-1])  # a uniform guess's cross-entropy
    misfit = present & (slot_loss > np.maximum(p["loss_ratio"] * reference[:, None],
                                               p["loss_floor"] * uniform))
    dropped = wrong_way | misfit
    row_keep = 1.0 - np.repeat(dropped, n, axis=1)
    return ScreenResult(row_scale.astype(np.float32), row_keep.astype(np.float32),
                        clipped & ~dropped, dropped)


def adaptive_factor(h, mask, slots, clip_ratio, margin, max_factor):
    """The ``adaptive`` attack's Jacobian scale per slot ``[B, S]``: the largest the screen's
    clipping threshold lets through (times ``margin``), capped at ``max_factor``; without a
    screen (``clip_ratio`` None) ``max_factor``."""
    b, s = mask.shape[0], slots
    if clip_ratio is None:
        return np.full((b, s), max_factor, np.float32)
    ratio = slot_means(np.diagonal(np.asarray(h, np.float64), axis1=1, axis2=2), mask, slots) / \
        np.maximum(own_diagonal(np.asarray(h, np.float64), mask, slots), 1e-30)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.sqrt(margin * clip_ratio / ratio)
    return np.clip(np.nan_to_num(factor, nan=1.0), 0.0, max_factor).astype(np.float32)
