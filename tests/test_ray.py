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


def test_only_weights_cross_the_object_store_each_round(tiny, local_ray):
    trainer, history = _fit("dfedavg", tiny, local_ray, rounds=2)
    # 8 clients in groups of 3: 9 client slots of weights go out and come back
    weights = sum(w.numpy().nbytes for w in trainer.client_weights) * 9 / 8
    data = tiny[0].x.size * 4  # the features, were they re-sent
    # the first round ships each actor its own block once: every client's data, exactly once
    assert history["client_data_bytes"][0] > data
    assert history["client_data_bytes"][1] == 0  # DFedAvg reads no other client's data
    for sent, client_data in zip(history["object_store_bytes"], history["client_data_bytes"]):
        assert 2 * weights <= sent - client_data < 2 * weights + data / 4


def test_actors_hold_their_block_and_this_rounds_neighbours_only(small_fashion, local_ray):
    clients, _ = small_fashion  # 20 clients on a ring: actor 0 serves 0-9, actor 1 10-19
    algorithm = nd.algorithms.NTKDFL(taus=(20, 50), client_batch=5, jacobian_batches=2)
    trainer = nd.DecentralizedTrainer(nd.models.mlp, algorithm, nd.topology.Ring(), seed=0,
                                      executor=local_ray)
    history = trainer.fit(clients, rounds=2, verbose=0).history
    held = local_ray.held_clients()
    assert held == [list(range(0, 11)) + [19], [0] + list(range(9, 20))]
    per_client = clients.mask.shape[1] * (784 + 10 + 1) * 4  # features, one-hot labels, mask
    # every round each actor fetches its block's two ring neighbours across the boundary
    assert history["client_data_bytes"][1] == 4 * per_client
    assert history["client_data_bytes"][0] == (20 + 4) * per_client  # plus the blocks, once


def test_actor_killed_mid_round_is_restarted_and_the_round_retried(tiny, local_ray, monkeypatch):
    expected, expected_history = _fit("ntk_dfl", tiny, "local")
    executor = local_ray
    real_get, calls, killed = ray.get, [], []

    def get_after_killing(refs, *args, **kwargs):
        calls.append(1)
        # the 2nd map is round 2's evolution: its calls are in flight when actor 0 dies
        if len(calls) == 2 and not killed and isinstance(refs, list):
            killed.append(real_get(executor.actors[0].pid.remote()))
            ray.kill(executor.actors[0], no_restart=False)
        return real_get(refs, *args, **kwargs)

    monkeypatch.setattr(ray, "get", get_after_killing)
    trainer, history = _fit("ntk_dfl", tiny, executor)
    monkeypatch.setattr(ray, "get", real_get)
    assert killed, "the test did not kill an actor"
    assert executor.pids()[0] != killed[0]  # a new process serves actor 0
    for a, b in zip(expected.client_weights, trainer.client_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(expected_history["val_loss"], history["val_loss"], atol=1e-6)


def test_sequential_order_is_refused_with_ray():
    with pytest.raises(ValueError, match="executor='local'"):
        nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(order="sequential"),
                                nd.topology.Ring(), executor=RayExecutor())
