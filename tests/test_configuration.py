"""A checkpoint resumes only a run of the same configuration; the error names the field."""

import numpy as np
import pytest

import ntkdfl_tf as nd


def _pairs(seed=0, label_offset=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 255, (6, 28, 28, 1)).astype(np.uint8),
             (rng.integers(0, 10, 6) + label_offset) % 10) for _ in range(4)]


def _trainer(algorithm=None, topology=None, faults=None, channel=None):
    return nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)),
                                   algorithm or nd.algorithms.NTKDFL(taus=(2, 4)),
                                   topology or nd.topology.Ring(), seed=0, faults=faults,
                                   channel=channel)


def _saved_state():
    trainer = _trainer()
    trainer.fit(_pairs(), rounds=1, verbose=0)
    return trainer.get_state()


@pytest.mark.parametrize("changed, field", [
    (dict(algorithm=nd.algorithms.NTKDFL(taus=(2, 8))), "algorithm.taus"),
    (dict(algorithm=nd.algorithms.NTKDFL(taus=(2, 4), learning_rate=0.02)),
     "algorithm.learning_rate"),
    (dict(algorithm=nd.algorithms.NTKDFL(taus=(2, 4), jacobian_batches=2)),
     "algorithm.jacobian_batches"),
    (dict(algorithm=nd.algorithms.NTKDFL(taus=(2, 4), loss="mse")), "algorithm.loss"),
    (dict(topology=nd.topology.FullyConnected()), "topology.name"),
    (dict(topology=nd.topology.RandomGraph(2)), "topology.name"),
    (dict(faults=nd.Faults(dropout=0.1)), "faults"),
    (dict(channel=nd.protocol.Channel(message_loss=0.1)), "channel.message_loss"),
    (dict(data=_pairs(label_offset=1)), "data"),
])
def test_a_checkpoint_of_another_configuration_is_refused(changed, field):
    state = _saved_state()
    data = changed.pop("data", _pairs())
    other = _trainer(**changed)
    other.fit(data, rounds=1, verbose=0)
    with pytest.raises(nd.CheckpointError, match=rf"run with {field}\b"):
        other.set_state(state, source="ckpt")


def test_the_same_configuration_resumes():
    state = _saved_state()
    again = _trainer()
    again.fit(_pairs(), rounds=1, verbose=0)
    again.set_state(state)
    assert again.round == 1
    for a, b in zip(again.client_weights, state["weights"]):
        np.testing.assert_array_equal(a.numpy(), b)


def test_a_schedule_is_described_by_name_not_address():
    """Two runs of one launcher build equal descriptions of a decayed learning rate."""
    from ntkdfl_tf import experiment

    cfg = experiment.Config(lr_decay=0.07)
    assert experiment.make_algorithm(cfg).config == experiment.make_algorithm(cfg).config
    assert "decayed_learning_rate" in str(experiment.make_algorithm(cfg).config["learning_rate"])
