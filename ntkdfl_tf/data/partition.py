"""Seeded partitioners that split a labelled dataset over clients (all return ClientData)."""

import numpy as np

from ntkdfl_tf.data.client_data import ClientData


def _check(x, y, num_clients):
    y = np.asarray(y)
    if len(x) == 0:
        raise ValueError("The dataset is empty; pass at least one sample per client.")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}; pass matching arrays.")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}.")
    if num_clients > len(y):
        raise ValueError(f"num_clients={num_clients} exceeds the {len(y)} samples; every client "
                         "needs at least one sample: use fewer clients.")
    return y.astype(np.int64)


def dirichlet_partition(x, y, num_clients, alpha, seed=0, samples_per_client=None):
    """Label-skewed split: class proportions drawn from a symmetric Dirichlet(alpha).

    Two rules are offered:

    * ``samples_per_client=None`` (default): for each class, Dirichlet(alpha) proportions over the
      clients split that class's samples into disjoint shards; sizes sum to the dataset. A client
      left empty takes one sample from the largest client.
    * ``samples_per_client=n`` (the NTK-DFL paper's rule): each client draws q ~ Dirichlet(alpha)
      over classes and takes ``int(n * q_c)`` samples of class c from that class's pool, without
      replacement within the client (different clients may share samples).

    Args:
        x: inputs, shape (n, ...).
        y: integer labels, shape (n,).
        num_clients: number of clients.
        alpha: Dirichlet concentration, > 0; small values give few classes per client.
        seed: seed of the partition stream.
        samples_per_client: None for the disjoint split, or n for the paper's rule.

    Returns:
        ClientData.
    """
    y = _check(x, y, num_clients)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha!r}; "
                         "use e.g. 0.1 for strong heterogeneity or 1.0 for mild.")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    if samples_per_client is not None:
        if samples_per_client < len(classes):
            raise ValueError(f"samples_per_client={samples_per_client} is below the number of "
                             f"classes ({len(classes)}); use at least that many.")
        q = rng.dirichlet(np.full(len(classes), alpha), size=num_clients)
        take = np.minimum((samples_per_client * q).astype(np.int64), [len(p) for p in pools])
        indices = [np.concatenate([rng.choice(pool, t, replace=False)
                                   for pool, t in zip(pools, row)]) for row in take]
        return ClientData.from_indices(x, y, indices)
    shards = [[] for _ in range(num_clients)]
    for pool in pools:
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p)[:-1] * len(pool)).astype(np.int64)
        for k, part in enumerate(np.split(pool, cuts)):
            shards[k].append(part)
    indices = [np.concatenate(s) for s in shards]
    for k in range(num_clients):  # deterministic fix-up so that no client is empty
        if len(indices[k]) == 0:
            donor = int(np.argmax([len(i) for i in indices]))
            indices[k], indices[donor] = indices[donor][-1:], indices[donor][:-1]
    return ClientData.from_indices(x, y, indices)


def iid_partition(x, y, num_clients, seed=0, samples_per_client=None):
    """Uniformly random client data: the IID end of the heterogeneity sweep.

    Args:
        x, y, num_clients, seed: as ``dirichlet_partition``.
        samples_per_client: None splits the whole dataset into near-equal disjoint shards
            (sizes differ by at most one); n gives each client n samples drawn uniformly without
            replacement (clients may share samples), the paper's rule with alpha -> infinity.

    Returns:
        ClientData.
    """
    y = _check(x, y, num_clients)
    rng = np.random.default_rng(seed)
    if samples_per_client is not None:
        if not 1 <= samples_per_client <= len(y):
            raise ValueError(f"samples_per_client={samples_per_client} must lie in [1, {len(y)}].")
        return ClientData.from_indices(x, y, [rng.choice(len(y), samples_per_client, replace=False)
                                              for _ in range(num_clients)])
    order = rng.permutation(len(y))
    return ClientData.from_indices(x, y, np.array_split(order, num_clients))


def shard_partition(x, y, num_clients, shards_per_client=2, seed=0):
    """Pathological split: sort by label, cut into equal shards, give each client a few shards."""
    y = _check(x, y, num_clients)
    if shards_per_client < 1 or num_clients * shards_per_client > len(y):
        raise ValueError(f"shards_per_client={shards_per_client} with {num_clients} clients needs "
                         f"1 <= clients*shards <= {len(y)} samples.")
    rng = np.random.default_rng(seed)
    order = np.argsort(y + rng.random(len(y)), kind="stable")  # by label, random within a label
    shards = np.array_split(order, num_clients * shards_per_client)
    assignment = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return ClientData.from_indices(x, y, [np.concatenate([shards[s] for s in row])
                                          for row in assignment])


PARTITIONS = {"dirichlet": dirichlet_partition, "iid": iid_partition, "shards": shard_partition}
