"""Message types: what one client sends another in a round, with its exact size in bytes.

``WeightsMessage`` carries one client's model weights (its own, or its neighbourhood average).
``JacobianPackage`` is NTK-DFL's reply to a neighbour's averaged weights: the Jacobians, logits
and labels of the sender's samples evaluated at those weights. A package may be *lazy*: in
simulation the receiver's worker evaluates it from the sender's samples when it needs it (so the
closed-form kernel never forms J); its ``specs`` still describe the arrays it stands for, so
``nbytes`` is the same lazy or materialised, and ``materialise`` fills it in.
"""

import dataclasses
import math
import typing

import numpy as np


class ArraySpec(typing.NamedTuple):
    """Shape and dtype of one array a message carries."""

    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class WeightsMessage:
    """Model weights from ``sender`` to ``receiver``.

    Attributes:
        sender, receiver: client ids.
        weights: one NumPy array per trainable variable (views of the sender's stacked row,
            or what the receiver decodes when a codec encoded them).
        codec: the ``codecs.Codec`` it travelled with; None: raw float32.
        mask: None for dense weights, else one boolean array per variable (DisPFL's sparse
            models): the message carries only the values where the mask is set, plus where
            they are (``sparse_position_nbytes``); ``weights`` holds them densely, zero
            elsewhere.
    """

    sender: int
    receiver: int
    weights: tuple
    codec: typing.Any = None
    mask: tuple = None

    @property
    def nbytes(self):
        if self.mask is None:
            if self.codec is None:
                return int(sum(w.nbytes for w in self.weights))
            return self.codec.weights_nbytes([w.shape for w in self.weights])
        kept = [int(np.count_nonzero(m)) for m in self.mask]
        values = (sum(4 * n for n in kept) if self.codec is None
                  else self.codec.weights_nbytes([(n,) for n in kept]))
        return int(values + sum(sparse_position_nbytes(m.size, n)
                                for m, n in zip(self.mask, kept)))


def sparse_position_nbytes(size, kept):
    """Bytes that say which ``kept`` of ``size`` coordinates a sparse tensor carries: a bitmap
    (one bit per coordinate) or int32 indices (4 bytes per kept value), whichever is smaller;
    indices win only below a density of 1/32."""
    return min(math.ceil(size / 8), 4 * kept)


def package_specs(num_samples, num_classes, variable_shapes):
    """The arrays of a package of ``num_samples`` samples, in order.

    Jacobians ``[n, C, *shape]`` float32 per trainable variable, logits ``[n, C]`` float32 and
    labels ``[n]`` int32 (class ids).
    """
    n, c = int(num_samples), int(num_classes)
    specs = [ArraySpec((n, c) + tuple(s), np.dtype(np.float32)) for s in variable_shapes]
    return tuple(specs + [ArraySpec((n, c), np.dtype(np.float32)),
                          ArraySpec((n,), np.dtype(np.int32))])


@dataclasses.dataclass(frozen=True, eq=False)
class JacobianPackage:
    """``sender``'s Jacobians, logits and labels at ``receiver``'s averaged weights.

    Attributes:
        sender, receiver: client ids.
        specs: the arrays the package carries (``package_specs``).
        jacobians: per trainable variable ``[n, C, *shape]``, or None while lazy.
        logits: ``[n, C]`` at the receiver's averaged weights, or None while lazy.
        labels: ``[n]`` int32 class ids, or None while lazy.
        codec: the ``codecs.Codec`` it travels with (None: raw arrays), and ``layout`` the
            model's ``codecs.PackageLayout`` (for the factored size).
        samples: which of the sender's samples it carries (indices), None: all of them.
        tampering: the ``byzantine.PackageAttack`` a Byzantine sender applied (the receiver's
            worker applies it where it evaluates the package), None for an honest package.
    """

    sender: int
    receiver: int
    specs: tuple
    jacobians: tuple = None
    logits: np.ndarray = None
    labels: np.ndarray = None
    codec: typing.Any = None
    layout: typing.Any = None
    samples: np.ndarray = None
    tampering: typing.Any = None

    @property
    def lazy(self):
        return self.jacobians is None

    @property
    def num_samples(self):
        return int(self.specs[-1].shape[0])

    @property
    def nbytes(self):
        if self.codec is not None:  # the encoded payload, from the sizes alone
            return self.codec.package_nbytes(self.num_samples, self.specs[-2].shape[1],
                                             self.layout)
        if self.lazy:
            return int(sum(s.nbytes for s in self.specs))
        return int(sum(a.nbytes for a in (*self.jacobians, self.logits, self.labels)))

    def materialise(self, jacobians, logits, labels):
        """This package with its arrays filled in; they must match ``specs``.

        Raises:
            ValueError: an array of another shape or dtype than the package describes.
        """
        arrays = [np.asarray(a) for a in (*jacobians, logits, labels)]
        got = [ArraySpec(a.shape, a.dtype) for a in arrays]
        if got != list(self.specs):
            raise ValueError(f"package {self.sender}->{self.receiver} describes {self.specs} "
                             f"but was given arrays {got}.")
        return dataclasses.replace(self, jacobians=tuple(arrays[:-2]), logits=arrays[-2],
                                   labels=arrays[-1])


def weights_messages(route, weights, masks=None):
    """One ``WeightsMessage`` per ``route[receiver, sender]``, carrying rows of ``weights``.

    Args:
        route: (K, K) boolean; entry (i, j) sends client j's row to client i.
        weights: list of NumPy ``[K, *shape]`` arrays.
        masks: None (dense), or list of boolean ``[K, *shape]`` arrays: each sender sends
            only its row's masked values (``WeightsMessage.mask``).
    """
    receivers, senders = np.nonzero(route)
    return [WeightsMessage(int(j), int(i), tuple(w[j] for w in weights), None,
                           None if masks is None else tuple(m[j] for m in masks))
            for i, j in zip(receivers, senders)]


def heard_from(messages, num_clients):
    """(K, K) boolean: entry (i, j) when client i received a message from client j."""
    heard = np.zeros((num_clients, num_clients), bool)
    if messages:
        heard[[m.receiver for m in messages], [m.sender for m in messages]] = True
    return heard


class ReceivedStack(typing.NamedTuple):
    """Weights messages stacked per receiver (flat float32), for defences and attacks.

    Attributes:
        receivers: the receiving clients, int64 ``[M]`` (rows of the stack).
        received: ``[M, D, P]`` flat weights, zero-padded; D the largest in-degree.
        valid: ``[M, D]`` bool, real slots. senders: ``[M, D]`` int64 (-1 at padding).
        index: ``[M, D]`` position of each slot's message in the list stacked (-1 at padding).
    """

    receivers: np.ndarray
    received: np.ndarray
    valid: np.ndarray
    senders: np.ndarray
    index: np.ndarray


def stack_by_receiver(messages, receivers=None):
    """``ReceivedStack`` of ``messages`` (``WeightsMessage``s) for ``receivers`` (default:
    every receiver that got one), slots in message order."""
    recv = np.array([m.receiver for m in messages], np.int64)
    receivers = np.unique(recv) if receivers is None else np.asarray(receivers, np.int64)
    chosen = np.flatnonzero(np.isin(recv, receivers))
    row = np.searchsorted(receivers, recv[chosen])
    order = np.argsort(row, kind="stable")
    chosen, row = chosen[order], row[order]
    first = np.searchsorted(row, row)  # each row's first position in the sorted list
    slot = np.arange(len(row)) - first
    depth = int(slot.max()) + 1 if len(slot) else 1
    size = sum(int(np.prod(w.shape)) for w in messages[0].weights) if messages else 0
    received = np.zeros((len(receivers), depth, size), np.float32)
    valid = np.zeros((len(receivers), depth), bool)
    senders = np.full((len(receivers), depth), -1, np.int64)
    index = np.full((len(receivers), depth), -1, np.int64)
    for i, r, s in zip(chosen, row, slot):
        received[r, s] = flatten(messages[i].weights)
    valid[row, slot] = True
    senders[row, slot] = [messages[i].sender for i in chosen]
    index[row, slot] = chosen
    return ReceivedStack(receivers, received, valid, senders, index)


def flatten(arrays):
    """One flat float32 vector of a sequence of arrays."""
    return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])


def unflatten(flat, shapes):
    """A flat vector -> a tuple of arrays of ``shapes``."""
    sizes = [int(np.prod(s)) for s in shapes]
    return tuple(part.reshape(s) for part, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes))
