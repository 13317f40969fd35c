"""One table runs every algorithm through the same checks; baselines reduce to known cases."""

import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd

FAST = {  # every algorithm, with settings small enough for a unit test
    "ntk_dfl": dict(taus=(20, 50)),
    "dfedavg": dict(local_epochs=2),
    "dfedavgm": dict(local_epochs=2),
    "dpsgd": dict(),
    "dfedsam": dict(local_epochs=2),
    "dispfl": dict(),  # its defaults: 5 epochs of one 128-batch on ~100 samples
}


@pytest.fixture(scope="module")
def tiny(small_fashion):
    clients, (x_test, y_test) = small_fashion
    return clients, (x_test[:500], y_test[:500])


@pytest.mark.parametrize("name", sorted(FAST))
def test_every_algorithm_trains_deterministically(name, tiny):
    """Finite flat logs, learning above chance, same seed -> bitwise same weights."""
    clients, test = tiny
    runs = []
    for _ in range(2):
        trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.get(name, **FAST[name]),
                                          nd.topology.RandomGraph(3), seed=3)
        history = trainer.fit(clients, rounds=3, validation_data=test, verbose=0)
        runs.append(trainer)
    h = history.history
    assert {"loss", "bytes_sent", "val_accuracy", "val_client_mean_accuracy"} <= set(h)
    assert all(np.isfinite(v).all() for v in h.values())
    assert h["val_accuracy"][-1] > 0.3
    for a, b in zip(runs[0].client_weights, runs[1].client_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert a.shape[0] == clients.num_clients


@pytest.mark.parametrize("name", ["dfedavg", "dfedavgm", "dpsgd", "dfedsam"])
def test_baselines_send_one_weight_vector_per_edge(name, tiny):
    clients, test = tiny
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.get(name, **FAST[name]),
                                      nd.topology.RandomGraph(3), seed=0)
    h = trainer.fit(clients, rounds=1, verbose=0).history
    assert h["bytes_sent"] == [4.0 * clients.num_clients * 3 * trainer.fns.num_params]


def _sgd_reference(w0, x, y, lr, steps):
    """Full-batch gradient descent on mean cross-entropy with plain TensorFlow."""
    import keras
    model = nd.models.mlp(hidden=(8,))
    model.set_weights(w0)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            logits = model(x)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        for v, g in zip(model.trainable_variables, grads):
            v.assign_sub(lr * g)
    return model.get_weights()


def test_single_isolated_client_is_plain_local_sgd(small_fashion):
    """One client, no neighbours: DFedAvg equals full-batch SGD done by hand."""
    clients, _ = small_fashion
    n = int(clients.counts[0])
    x, y = clients.x[0, :n], clients.y[0, :n]
    one = nd.data.ClientData.from_arrays([(x, y)])
    trainer = nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)),
                                      nd.algorithms.DFedAvg(learning_rate=0.05, batch_size=n,
                                                            local_epochs=3),
                                      nd.topology.FullyConnected(), seed=0)
    w0 = trainer.model.get_weights()
    trainer.fit(one, rounds=1, verbose=0)
    expected = _sgd_reference(w0, x.astype(np.float32), y, 0.05, 3)
    for got, want in zip(trainer.client_weights, expected):
        np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["dfedavg", "dfedavgm", "dfedsam"])
def test_identical_data_gives_identical_models(name, small_fashion):
    """Same data on every client and full batches: every client ends with the same model."""
    clients, _ = small_fashion
    n = int(clients.counts[0])
    data = [(clients.x[0, :n], clients.y[0, :n])] * 4
    alg = nd.algorithms.get(name, batch_size=n, local_epochs=2)
    trainer = nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)), alg,
                                      nd.topology.Ring(), seed=0)
    trainer.fit(nd.data.ClientData.from_arrays(data), rounds=2, verbose=0)
    for w in trainer.client_weights:
        w = w.numpy()
        np.testing.assert_allclose(w, np.broadcast_to(w[:1], w.shape), rtol=1e-5, atol=1e-6)


def test_local_schedule_covers_each_clients_samples_once_per_epoch():
    alg = nd.algorithms.DFedAvg(batch_size=4, local_epochs=2)
    counts = np.array([10, 3, 7])
    steps = alg.schedule(counts, 10, np.random.default_rng(0))  # [steps, K, batch]
    per_epoch = steps.shape[0] // 2
    for e in range(2):
        block = steps[e * per_epoch:(e + 1) * per_epoch]
        for k, n in enumerate(counts):
            seen = block[:, k].ravel()
            assert sorted(seen[seen < n].tolist()) == list(range(n))


@pytest.mark.parametrize("name, steps", [  # NTK-DFL.md's batch and local epochs, by hand:
    ("dfedavg", 20 * 8),    # 20 epochs of ceil(200 / 25) batches
    ("dfedavgm", 20 * 4),   # 20 of ceil(200 / 50)
    ("dpsgd", 1 * 20),      # 1 of ceil(200 / 10)
    ("dfedsam", 5 * 7)])    # 5 of ceil(200 / 32)
def test_baselines_local_work_per_round_is_the_papers(name, steps):
    alg = nd.algorithms.get(name)
    schedule = alg.schedule(np.array([200, 120]), 200, np.random.default_rng(0))
    assert schedule.shape[0] == steps
    seen = schedule[:, 1].ravel()  # the smaller client sees each of its samples once an epoch
    assert np.bincount(seen[seen < 120], minlength=120).tolist() == [steps // (
        -(-200 // alg.batch_size))] * 120


def test_bad_local_sgd_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        nd.algorithms.DFedAvg(batch_size=0)
    with pytest.raises(ValueError, match="momentum"):
        nd.algorithms.DFedAvgM(momentum=1.5)
    with pytest.raises(ValueError, match="positive"):
        nd.algorithms.DPSGD(learning_rate=0)


def test_momentum_skips_empty_batches(small_fashion):
    """A 3-sample client among 40-sample ones takes exactly one (full-batch) step per epoch."""
    clients, _ = small_fashion
    data = [(clients.x[0, :40], clients.y[0, :40]), (clients.x[1, :3], clients.y[1, :3])]
    trainer = nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)),
                                      nd.algorithms.DFedAvgM(learning_rate=0.05, batch_size=4,
                                                             local_epochs=1, momentum=0.9),
                                      nd.topology.ErdosRenyi(0.0), seed=0)
    w0 = trainer.model.get_weights()
    trainer.fit(nd.data.ClientData.from_arrays(data), rounds=1, verbose=0)
    expected = _sgd_reference(w0, clients.x[1, :3].astype(np.float32), clients.y[1, :3], 0.05, 1)
    for got, want in zip(trainer.client_weights, expected):
        np.testing.assert_allclose(got.numpy()[1], want, rtol=1e-4, atol=1e-6)


def test_local_steps_reaches_the_baselines_from_the_configuration():
    """--local_steps=1 gives Lian et al.'s one-step D-PSGD: one batch per round, not an epoch."""
    from ntkdfl_tf import experiment

    def steps(**fields):
        alg = experiment.make_algorithm(experiment.Config(algorithm="dpsgd", **fields))
        return alg.schedule(np.array([200, 120]), 200, np.random.default_rng(0)).shape[0]

    assert steps() == 20  # one epoch of ceil(200 / 10) batches
    assert steps(local_steps=1) == 1
    assert steps(local_steps=3) == 3
