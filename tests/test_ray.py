"""The Ray executor: same results as the local one, and it survives an actor dying mid-round."""

import numpy as np
import pytest
import ray

import ntkdfl_tf as nd
from ntkdfl_tf.executors import RayExecutor


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield RayExecutor(num_actors=2)  # its two actors serve every test (reused across fits)
    ray.shutdown()


ALGORITHMS = {
    # client batches of 2 and Jacobian batching: the slices are dealt remotely
    "ntk_dfl": lambda: nd.algorithms.NTKDFL(taus=(20, 50), client_batch=2, jacobian_batches=2),
    "dfedavg": lambda: nd.algorithms.get("dfedavg", local_epochs=1, client_batch=3),
}


def _fit(name, tiny, executor, rounds=3):
    clients, test = tiny
    trainer = nd.DecentralizedTrainer(nd.models.mlp, ALGORITHMS[name](),
                                      nd.topology.RandomGraph(3), seed=0, executor=executor)
    history = trainer.fit(clients, rounds=rounds, validation_data=test, verbose=0)
    return trainer, history.history


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_ray_executor_gives_the_local_results(tiny, local_ray, name):
    local, local_history = _fit(name, tiny, "local")
    remote, remote_history = _fit(name, tiny, local_ray)
    for a, b in zip(local.client_weights, remote.client_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    for key in ("loss", "val_loss", "val_accuracy", "val_client_mean_accuracy"):
        np.testing.assert_allclose(local_history[key], remote_history[key], rtol=0, atol=1e-6)
    assert all(b > 0 for b in remote_history["object_store_bytes"])


def _client_bytes(clients, k):
    """What one client's data weighs in the object store: features, one-hot labels, mask."""
    return k * clients.mask.shape[1] * (784 + 10 + 1) * 4


def test_only_weights_cross_the_object_store_each_round(tiny, local_ray):
    trainer, history = _fit("dfedavg", tiny, local_ray, rounds=2)
    # 8 clients in groups of 3: 9 client slots of weights go out and come back
    weights = sum(w.numpy().nbytes for w in trainer.client_weights) * 9 / 8
    # the first round ships each actor its own block: every client's data, exactly once
    assert history["client_data_bytes"] == [_client_bytes(tiny[0], 8), 0]
    for sent, client_data in zip(history["object_store_bytes"], history["client_data_bytes"]):
        assert 2 * weights <= sent - client_data < 2 * weights + 4096  # plus index arrays


def _index_bytes(clients, ids):
    """What a client weighs when the actors load the samples: its indices and a digest."""
    return int(sum(8 * clients.counts[i] + 16 for i in ids))


def _fit_ring(clients, executor):
    algorithm = nd.algorithms.NTKDFL(taus=(20, 50), client_batch=5, jacobian_batches=2)
    trainer = nd.DecentralizedTrainer(nd.models.mlp, algorithm, nd.topology.Ring(), seed=0,
                                      executor=executor)
    return trainer, trainer.fit(clients, rounds=2, verbose=0).history


@pytest.fixture(scope="module")
def ring_local_weights(small_fashion):
    return _fit_ring(small_fashion[0], "local")[0].client_weights


@pytest.mark.parametrize("from_files", [False, True], ids=["object_store", "dataset_files"])
def test_actors_hold_their_block_and_their_neighbours_only(small_fashion, local_ray,
                                                           ring_local_weights, from_files):
    clients, _ = small_fashion  # 20 clients on a ring: actor 0 serves 0-9, actor 1 10-19
    if from_files:  # the actors read Fashion-MNIST themselves: only indices cross
        clients = clients.with_source(nd.data.DatasetSource("fashion_mnist"))
    remote, history = _fit_ring(clients, local_ray)
    assert local_ray.actors_load_data == from_files
    assert local_ray.held_clients() == [list(range(0, 11)) + [19], [0] + list(range(9, 20))]
    # round 1: the blocks, plus the two ring neighbours across each boundary; round 2: the
    # same neighbours again, already held
    sent = list(range(20)) + [10, 19, 0, 9]
    expected = _index_bytes(clients, sent) if from_files else _client_bytes(clients, len(sent))
    assert history["client_data_bytes"] == [expected, 0]
    for a, b in zip(ring_local_weights, remote.client_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_source_that_does_not_describe_the_data_fails_loudly(tiny, local_ray):
    clients, _ = tiny  # its indices point into small_fashion's stacked arrays, not the dataset
    wrong = clients.with_source(nd.data.DatasetSource("fashion_mnist"))
    trainer = nd.DecentralizedTrainer(nd.models.mlp, ALGORITHMS["dfedavg"](),
                                      nd.topology.RandomGraph(3), seed=0, executor=local_ray)
    with pytest.raises(ValueError, match="differ from the driver's samples"):
        trainer.fit(wrong, rounds=1, verbose=0)


def test_only_partitioned_data_names_a_source(one_line_error):
    own = nd.data.ClientData.from_arrays([(np.zeros((3, 28, 28, 1), np.uint8),
                                           np.zeros(3, np.int64))])
    one_line_error(own.with_source, nd.data.DatasetSource("fashion_mnist"), names=["indices"])
    one_line_error(nd.data.DatasetSource, "fashion_mnist", None, None, "validation",
                   names=["split", "validation"])


def test_experiment_runs_name_the_dataset_their_clients_come_from(monkeypatch, tmp_path):
    """So that the launchers' Ray actors load their samples from the files."""
    from ntkdfl_tf import experiment

    seen = {}

    class Stop(Exception):
        pass

    def fit(trainer, clients, **kwargs):
        seen["source"] = clients.source
        raise Stop

    monkeypatch.setattr(nd.DecentralizedTrainer, "fit", fit)
    with pytest.raises(Stop):
        experiment.run(experiment.Config(num_clients=8, rounds=1, logdir=str(tmp_path / "logs"),
                                         save_dir=str(tmp_path), verbose=0))
    assert seen["source"] == nd.data.DatasetSource("fashion_mnist")


def test_actor_killed_mid_round_is_restarted_and_the_round_retried(tiny, local_ray, monkeypatch):
    expected, expected_history = _fit("ntk_dfl", tiny, "local")
    executor = local_ray
    real_get, calls, killed = ray.get, [], []

    def get_after_killing(refs, *args, **kwargs):
        if not isinstance(refs, list):
            return real_get(refs, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # round 1's map, before its results: note the actor's process
            killed.append(real_get(executor.actors[0].pid.remote()))
        if len(calls) == 2:  # round 2's calls are in flight: kill without waiting for them
            ray.kill(executor.actors[0], no_restart=False)
        return real_get(refs, *args, **kwargs)

    monkeypatch.setattr(ray, "get", get_after_killing)
    trainer, history = _fit("ntk_dfl", tiny, executor)
    monkeypatch.setattr(ray, "get", real_get)
    assert len(calls) >= 2, "the test did not reach round 2"
    assert executor.pids()[0] != killed[0]  # a new process serves actor 0
    for a, b in zip(expected.client_weights, trainer.client_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(expected_history["val_loss"], history["val_loss"], atol=1e-6)


def test_ray_reports_every_client_group_as_a_step(tiny, local_ray):
    """The actors' blocks of calls come back one by one; each group is one Keras step."""
    import keras

    steps = []
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: steps.append(batch))
    clients, test = tiny
    trainer = nd.DecentralizedTrainer(nd.models.mlp, ALGORITHMS["dfedavg"](),
                                      nd.topology.RandomGraph(3), seed=0, executor=local_ray)
    trainer.fit(clients, rounds=1, callbacks=[recorder], verbose=0)
    assert steps == [0, 1, 2]  # 8 clients in groups of 3
