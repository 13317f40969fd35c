"""ClientData: every client's samples as one padded, stacked array (no ragged Python lists)."""

import dataclasses
import hashlib

import typing

import numpy as np


class Neighbourhoods(typing.NamedTuple):
    """The pooled data of several groups of clients, one group per row.

    Attributes:
        x: inputs, shape (groups, members * max_samples, *input_shape).
        labels: one-hot labels (zero on padding rows), float32, (groups, members *
            max_samples, num_classes).
        mask: float32 (groups, members * max_samples): 1 for real samples, 0 for padding.
    """

    x: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class ClientData:
    """Per-client datasets stacked on a leading client axis and zero-padded to equal length.

    Attributes:
        x: inputs, shape (num_clients, max_samples, *input_shape).
        y: integer labels, shape (num_clients, max_samples); padding rows hold 0.
        counts: real samples per client, shape (num_clients,).
        indices: for each client, the indices into the source arrays it was built from
            (None when built from explicit per-client arrays).
        source: a ``DatasetSource`` naming the dataset split those arrays are, so that a
            remote executor's actors can load the samples themselves (see ``with_source``);
            None when only these arrays hold them.
    """

    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray
    indices: tuple = None
    source: object = None

    @property
    def num_clients(self):
        return self.x.shape[0]

    @property
    def max_samples(self):
        return self.x.shape[1]

    @property
    def mask(self):
        """Float mask (num_clients, max_samples): 1 for real samples, 0 for padding."""
        return (np.arange(self.max_samples)[None, :] < self.counts[:, None]).astype(np.float32)

    def class_counts(self, num_classes):
        """Samples of each class per client, shape (num_clients, num_classes)."""
        counts = np.zeros((self.num_clients, num_classes), np.int64)
        for k in range(num_classes):
            counts[:, k] = ((self.y == k) * self.mask).sum(axis=1)
        return counts

    def neighbourhoods(self, groups, num_classes):
        """The data of each group of clients pooled in one row, as a receiver sees its
        neighbourhood's (members in the order given, each padded to ``max_samples``).

        Args:
            groups: client indices, shape (num_groups, members).
            num_classes: width of the one-hot labels.
        """
        groups = np.asarray(groups, np.int64)
        pooled = (len(groups), -1)
        mask = self.mask[groups].reshape(pooled)
        labels = np.eye(num_classes, dtype=np.float32)[self.y[groups].reshape(pooled)]
        return Neighbourhoods(x=self.x[groups].reshape(pooled + self.x.shape[2:]),
                              labels=labels * mask[..., None], mask=mask)

    def fingerprint(self):
        """A short digest of the samples, labels and their split over clients."""
        digest = hashlib.sha256()
        for array in (self.counts, self.y, self.x):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def with_source(self, source):
        """This data, noting that ``indices`` point into ``source`` (a ``DatasetSource``).

        With a source, ``RayExecutor`` sends its actors the clients' indices and each actor
        loads the dataset files on its node, instead of the driver shipping every sample.
        Each actor checks the samples it loads against these arrays (a per-client digest).

        Raises:
            ValueError: this data has no indices (built from per-client arrays), or ``source``
                is not a DatasetSource.
        """
        from ntkdfl_tf.data.source import DatasetSource

        if not isinstance(source, DatasetSource):
            raise ValueError(f"source must be an nd.data.DatasetSource, got {source!r}.")
        if self.indices is None:
            raise ValueError("This ClientData was built from per-client arrays and has no sample "
                             "indices; only partitioner output (from_indices) can name a source.")
        return dataclasses.replace(self, source=source)

    @classmethod
    def from_indices(cls, x, y, indices, max_samples=None):
        """Builds ClientData from source arrays and one index array per client.

        ``max_samples`` pads to that length instead of the largest client's (a subset of
        clients rebuilt with the shape of the whole).

        Raises:
            ValueError: a client has no samples, x and y disagree in length, or a client has
                more than ``max_samples``.
        """
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}; pass matching arrays.")
        counts = np.array([len(i) for i in indices], np.int64)
        if len(counts) == 0 or counts.min() == 0:
            empty = [] if len(counts) == 0 else np.flatnonzero(counts == 0)[:10].tolist()
            raise ValueError(f"Every client needs at least one sample; empty clients: {empty}.")
        n_max = int(counts.max()) if max_samples is None else int(max_samples)
        if counts.max() > n_max:
            raise ValueError(f"A client has {int(counts.max())} samples, more than "
                             f"max_samples={n_max}.")
        padded = np.zeros((len(indices), n_max), np.int64)
        for k, idx in enumerate(indices):  # one vector copy per client, not per sample
            padded[k, :len(idx)] = idx
        valid = np.arange(n_max)[None, :] < counts[:, None]
        return cls(x=x[padded] * valid.reshape(valid.shape + (1,) * (x.ndim - 1)).astype(x.dtype),
                   y=np.where(valid, y[padded], 0).astype(np.int64),
                   counts=counts, indices=tuple(np.asarray(i, np.int64) for i in indices))

    @classmethod
    def from_arrays(cls, client_arrays):
        """Builds ClientData from a list of per-client ``(x_i, y_i)`` pairs."""
        xs = [np.asarray(x) for x, _ in client_arrays]
        ys = [np.asarray(y) for _, y in client_arrays]
        offsets = np.cumsum([0] + [len(x) for x in xs])
        indices = [np.arange(offsets[k], offsets[k + 1]) for k in range(len(xs))]
        data = cls.from_indices(np.concatenate(xs), np.concatenate(ys), indices)
        return dataclasses.replace(data, indices=None)
