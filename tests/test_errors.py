"""Bad input gets a clear error naming the bad value, before any training starts."""

import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import experiment


def _tiny_clients(num_clients=4, classes=10, shape=(28, 28, 1)):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (num_clients * 10,) + shape).astype(np.uint8)
    y = np.arange(num_clients * 10) % classes
    return nd.data.iid_partition(x, y, num_clients, seed=0)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="'cifar'"):
        nd.data.load("cifar")


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="'fedprox'"):
        nd.algorithms.get("fedprox")


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha(alpha):
    x, y = np.zeros((100, 2)), np.arange(100) % 10
    with pytest.raises(ValueError, match="alpha must be > 0"):
        nd.data.dirichlet_partition(x, y, num_clients=5, alpha=alpha)


def test_more_neighbours_than_clients():
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(5,)),
                                      nd.topology.RandomGraph(num_neighbors=5), seed=0)
    with pytest.raises(ValueError, match="num_neighbors=5"):
        trainer.fit(_tiny_clients(4), rounds=1, verbose=0)


def test_empty_data():
    with pytest.raises(ValueError, match="empty"):
        nd.data.iid_partition(np.zeros((0, 28, 28, 1)), np.zeros(0), num_clients=3)
    with pytest.raises(ValueError, match="empty clients"):
        nd.data.ClientData.from_indices(np.zeros((5, 2)), np.zeros(5), [np.arange(5), []])


def test_model_output_size_does_not_match_classes():
    trainer = nd.DecentralizedTrainer(lambda: nd.models.mlp(num_classes=5),
                                      nd.algorithms.NTKDFL(taus=(5,)), nd.topology.Ring(), seed=0)
    with pytest.raises(ValueError, match=r"\[0, 9\].*5 outputs"):
        trainer.fit(_tiny_clients(4, classes=10), rounds=1, verbose=0)


def test_input_shape_does_not_match_model():
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(5,)),
                                      nd.topology.Ring(), seed=0)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(28, 28, 1\)"):
        trainer.fit(_tiny_clients(4, shape=(32, 32, 3)), rounds=1, verbose=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(taus=(200, 100)), "strictly increasing"),
    (dict(taus=()), "strictly increasing"),
    (dict(learning_rate=-0.1), "positive"),
    (dict(loss="hinge"), "'hinge'"),
    (dict(kernel="fast"), "'fast'"),
    (dict(packages="dense"), "'dense'; choose one of lazy, explicit"),
    (dict(packages="explicit", kernel="matrix_free"), "packages='explicit'"),
    (dict(loss="mse", kernel="matrix_free"), "kernel='dense'"),
    (dict(client_batch=0), "client_batch"),
    (dict(jacobian_chunk=0), "jacobian_chunk"),
    (dict(flow_budget=0), r"flow_budget must be a positive integer \(.*\) or None.*, got 0"),
    (dict(flow_budget=2.5), "flow_budget must be a positive integer"),
    (dict(flow="x"), "Unknown flow 'x'; choose one of dopri5, exact, rkc, euler_adaptive, "
                     "euler_bound"),
    (dict(tau_search="greedy"), "Unknown tau_search 'greedy'; choose one of full, early_stop"),
])
def test_bad_ntkdfl_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nd.algorithms.NTKDFL(**kwargs)


@pytest.mark.parametrize("field, value, match", [
    ("rounds", 0, "--rounds"), ("num_clients", -3, "--num_clients"),
    ("learning_rate", 0.0, "--learning_rate"), ("alpha", 0.0, "--alpha"),
    ("dataset", "svhn", "'svhn'"), ("partition", "zipf", "'zipf'"),
    ("topology", "torus", "'torus'"), ("num_neighbors", 40, "num_neighbors=40"),
    ("model", "resnet", "'resnet'"), ("taus", (200, 100), "strictly increasing"),
    ("dropout", 1.0, "dropout"), ("message_loss", -0.1, "message_loss"),
    ("leave", "3-5", "--leave"), ("leave", "40:2", "only 30 clients"),
    ("tau_search", "greedy", "tau_search 'greedy'"),
])
def test_launcher_config_validated_up_front(tmp_path, field, value, match):
    cfg = experiment.Config(logdir=str(tmp_path / "logs"), save_dir=str(tmp_path / "models"))
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        experiment.validate(cfg)


def test_softmax_output_is_rejected():
    import keras

    def model_fn():
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(10, activation="softmax")])
    with pytest.raises(ValueError, match="softmax"):
        nd.DecentralizedTrainer(model_fn, nd.algorithms.NTKDFL(), nd.topology.Ring())


def test_evaluate_before_fit_and_bad_labels():
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(5,)),
                                      nd.topology.Ring(), seed=0)
    with pytest.raises(RuntimeError, match="fit"):
        trainer.evaluate(np.zeros((2, 28, 28, 1)), np.zeros(2, np.int64))
    clients = _tiny_clients(4)
    with pytest.raises(ValueError, match="argmax"):
        trainer.fit(clients, rounds=1, verbose=0,
                    validation_data=(np.zeros((3, 28, 28, 1)), np.eye(10)[:3]))


def test_nan_in_any_client_is_rejected():
    clients = _tiny_clients(4)
    x = clients.x.astype(np.float32)
    x[3, 0, 0, 0, 0] = np.nan
    bad = nd.data.ClientData(x=x, y=clients.y, counts=clients.counts)
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(5,)),
                                      nd.topology.Ring(), seed=0)
    with pytest.raises(ValueError, match="NaN"):
        trainer.fit(bad, rounds=1, verbose=0)


def test_unwritable_logdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = experiment.Config(logdir=str(blocker / "logs"), save_dir=str(tmp_path / "models"))
    with pytest.raises(ValueError, match="a_file/logs.*writable"):
        experiment.validate(cfg)


def test_faults_naming_missing_clients_are_refused():
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.get("dfedavg"),
                                      nd.topology.Ring(), faults=nd.Faults(leave={9: 1}))
    with pytest.raises(ValueError, match=r"client\(s\) \[9\].*only 4 clients"):
        trainer.fit(_tiny_clients(4), rounds=1, verbose=0)
