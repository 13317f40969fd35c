"""ClientData: every client's samples as one padded, stacked array (no ragged Python lists)."""

import dataclasses
import hashlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientData:
    """Per-client datasets stacked on a leading client axis and zero-padded to equal length.

    Attributes:
        x: inputs, shape (num_clients, max_samples, *input_shape).
        y: integer labels, shape (num_clients, max_samples); padding rows hold 0.
        counts: real samples per client, shape (num_clients,).
        indices: for each client, the indices into the source arrays it was built from
            (None when built from explicit per-client arrays).
    """

    x: np.ndarray
    y: np.ndarray
    counts: np.ndarray
    indices: tuple = None

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

    def fingerprint(self):
        """A short digest of the samples, labels and their split over clients."""
        digest = hashlib.sha256()
        for array in (self.counts, self.y, self.x):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def from_indices(cls, x, y, indices):
        """Builds ClientData from source arrays and one index array per client.

        Raises:
            ValueError: a client has no samples, or x and y disagree in length.
        """
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}; pass matching arrays.")
        counts = np.array([len(i) for i in indices], np.int64)
        if len(counts) == 0 or counts.min() == 0:
            empty = [] if len(counts) == 0 else np.flatnonzero(counts == 0)[:10].tolist()
            raise ValueError(f"Every client needs at least one sample; empty clients: {empty}.")
        n_max = int(counts.max())
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
