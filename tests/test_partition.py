"""Partitioners and the padded ClientData container, on synthetic labelled data."""

import numpy as np
import pytest

from ntkdfl_tf.data import ClientData, dirichlet_partition, iid_partition, shard_partition

NUM_CLASSES = 10


def _data(n=1000, seed=0):
    """Distinct, non-zero inputs (row i holds i + 1) and random labels covering all classes."""
    rng = np.random.default_rng(seed)
    x = np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], 3, axis=1)
    return x, rng.permutation(np.arange(n) % NUM_CLASSES)


def _classes_per_client(data, share=0.05):
    counts = data.class_counts(NUM_CLASSES)
    return (counts >= share * data.counts[:, None]).sum(1)


def _assert_consistent(data, x, y):
    """mask/counts agree; real rows are the source rows; padding rows are zero with label 0."""
    assert np.array_equal(data.mask.sum(1), data.counts)
    for k, idx in enumerate(data.indices):
        n = data.counts[k]
        assert len(idx) == n and np.all(data.mask[k, :n] == 1) and np.all(data.mask[k, n:] == 0)
        np.testing.assert_array_equal(data.x[k, :n], x[idx])
        np.testing.assert_array_equal(data.y[k, :n], y[idx])
        assert np.all(data.x[k, n:] == 0) and np.all(data.y[k, n:] == 0)


def _assert_covers_once(data, n):
    np.testing.assert_array_equal(np.sort(np.concatenate(data.indices)), np.arange(n))


def test_dirichlet_disjoint_split():
    """Default rule: disjoint cover of the dataset, no empty client, consistent padding."""
    x, y = _data()
    data = dirichlet_partition(x, y, num_clients=20, alpha=0.1, seed=3)
    assert data.num_clients == 20 and data.counts.min() >= 1
    assert data.counts.sum() == len(y)
    _assert_covers_once(data, len(y))
    _assert_consistent(data, x, y)


def test_dirichlet_seeding():
    """The same seed reproduces the split; another seed changes it."""
    x, y = _data()
    a, b, c = (dirichlet_partition(x, y, 10, alpha=0.5, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(i, j) for i, j in zip(a.indices, b.indices))
    assert not all(np.array_equal(i, j) for i, j in zip(a.indices, c.indices))


def test_dirichlet_alpha_controls_heterogeneity():
    """alpha=0.05 gives far fewer classes per client than alpha=100 (nearly all 10 classes)."""
    x, y = _data()
    skewed = _classes_per_client(dirichlet_partition(x, y, 20, alpha=0.05, seed=0)).mean()
    uniform = _classes_per_client(dirichlet_partition(x, y, 20, alpha=100.0, seed=0)).mean()
    assert uniform >= 9 and skewed <= uniform / 3


def test_dirichlet_paper_rule():
    """samples_per_client=200: 191-200 samples each, no repeats within a client, skewed classes."""
    x, y = _data(n=3000)
    data = dirichlet_partition(x, y, 15, alpha=0.1, seed=0, samples_per_client=200)
    assert np.all(data.counts > 200 - NUM_CLASSES) and np.all(data.counts <= 200)
    assert all(len(np.unique(i)) == len(i) for i in data.indices)
    _assert_consistent(data, x, y)
    assert _classes_per_client(data).mean() < 5


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_rejects_bad_alpha(alpha):
    """alpha <= 0 or NaN raises ValueError naming the value."""
    x, y = _data(100)
    with pytest.raises(ValueError, match=f"alpha.*{alpha!r}"):
        dirichlet_partition(x, y, 5, alpha=alpha)


@pytest.mark.parametrize("partition", [
    lambda x, y, k: dirichlet_partition(x, y, k, alpha=1.0),
    iid_partition,
    shard_partition,
], ids=["dirichlet", "iid", "shards"])
def test_too_many_clients_or_empty_data_raise(partition):
    """More clients than samples, and an empty dataset, raise ValueError."""
    x, y = _data(8)
    with pytest.raises(ValueError, match="num_clients=9"):
        partition(x, y, 9)
    with pytest.raises(ValueError, match="empty"):
        partition(x[:0], y[:0], 2)


def test_iid_partition():
    """Near-equal sizes (differ by <= 1), disjoint cover, seeded."""
    x, y = _data(1003)
    data = iid_partition(x, y, 10, seed=4)
    assert data.counts.max() - data.counts.min() <= 1
    _assert_covers_once(data, len(y))
    _assert_consistent(data, x, y)
    again = iid_partition(x, y, 10, seed=4)
    assert all(np.array_equal(i, j) for i, j in zip(data.indices, again.indices))


def test_iid_partition_with_samples_per_client():
    """The paper's rule without label skew: n distinct samples per client, labels near uniform."""
    x, y = _data(5000)
    data = iid_partition(x, y, 40, seed=1, samples_per_client=200)
    assert np.all(data.counts == 200)
    assert all(len(np.unique(i)) == 200 for i in data.indices)
    _assert_consistent(data, x, y)
    shares = np.bincount(np.concatenate([y[i] for i in data.indices]), minlength=10) / 8000
    assert np.all(np.abs(shares - np.bincount(y, minlength=10) / len(y)) < 0.02)
    with pytest.raises(ValueError, match="samples_per_client=0"):
        iid_partition(x, y, 4, samples_per_client=0)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_shard_partition(shards):
    """Each client holds at most 2 classes per shard; the shards cover the dataset once."""
    x, y = _data()
    data = shard_partition(x, y, 20, shards_per_client=shards, seed=5)
    assert np.all(_classes_per_client(data, share=1e-9) <= 2 * shards)
    _assert_covers_once(data, len(y))
    _assert_consistent(data, x, y)


def test_client_data_from_arrays():
    """from_arrays pads ragged clients; class_counts counts real samples only."""
    rng = np.random.default_rng(6)
    sizes = [3, 1, 5]
    arrays = [(rng.random((n, 2)) + 1, rng.integers(1, NUM_CLASSES, n)) for n in sizes]
    data = ClientData.from_arrays(arrays)
    assert data.x.shape == (3, 5, 2) and np.array_equal(data.counts, sizes)
    assert np.array_equal(data.mask, np.arange(5)[None] < np.array(sizes)[:, None])
    for k, (xk, yk) in enumerate(arrays):
        np.testing.assert_array_equal(data.x[k, :sizes[k]], xk)
        assert np.all(data.x[k, sizes[k]:] == 0) and np.all(data.y[k, sizes[k]:] == 0)
        np.testing.assert_array_equal(data.class_counts(NUM_CLASSES)[k],
                                      np.bincount(yk, minlength=NUM_CLASSES))
    with pytest.raises(ValueError, match="empty clients: \\[1\\]"):
        ClientData.from_arrays([arrays[0], (np.zeros((0, 2)), np.zeros(0, int))])


def test_neighbourhoods_pool_each_group_of_clients_with_padding_masked():
    """Hand-built: clients hold 1, 2 and 2 samples (padded to 2); group (2, 0) pools client 2's
    two samples, then client 0's one sample and its padding row."""
    data = ClientData.from_arrays([(np.array([[1.0]]), np.array([1])),
                                   (np.array([[2.0], [3.0]]), np.array([0, 2])),
                                   (np.array([[4.0], [5.0]]), np.array([2, 0]))])
    pooled = data.neighbourhoods([[2, 0], [1, 1]], num_classes=3)
    np.testing.assert_array_equal(pooled.x[..., 0], [[4, 5, 1, 0], [2, 3, 2, 3]])
    np.testing.assert_array_equal(pooled.mask, [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(pooled.labels[0], [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pooled.labels[1].argmax(1), [0, 2, 0, 2])
    assert pooled.labels.dtype == np.float32
