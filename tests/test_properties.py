"""Properties over random small configurations.

1. Every corrupted configuration raises a documented error, and where: a corruption of the
   configuration or the data raises before any round starts; a corruption that can only show in
   training (a learning rate that makes the numbers blow up) raises ``DivergenceError`` in the
   round where it happens, before that round completes. Every corruption kind is exercised
   (``parametrize``), hypothesis draws the rest of the configuration.
2. An uncorrupted configuration runs (finite weights) or raises a documented error before
   training (e.g. a kappa-regular graph that cannot exist).

"Documented" means one of ``ntkdfl_tf.errors.DOCUMENTED_ERRORS`` (ValueError, TypeError,
DivergenceError), raised by ntkdfl_tf's own code (the innermost frame is in the package), with a
message, never an error from deep inside TensorFlow, NumPy or Keras.
"""

import os
import traceback

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import ntkdfl_tf as nd
from ntkdfl_tf.errors import DOCUMENTED_ERRORS, DivergenceError

PACKAGE = os.path.dirname(nd.__file__)

BEFORE_TRAINING, IN_TRAINING = "before training", "in training"

# name -> (overrides of the drawn configuration, when it must raise). A corruption pins what it
# needs to be a corruption at all: taus only exist for NTK-DFL, num_neighbors only for the
# random regular graph; labels are shifted by C = 10, so that every label is out of range.
# A learning rate of 1e30 is valid configuration and can only show in training; with NTK-DFL
# the second round's kernel and flow overflow (the first round's weights are ~1e30, finite).
# The ring and no dropout keep the rest of the configuration valid and every client training.
CORRUPTIONS = {
    "learning_rate=0": ({"learning_rate": 0.0}, BEFORE_TRAINING),
    "learning_rate=nan": ({"learning_rate": float("nan")}, BEFORE_TRAINING),
    "learning_rate=1e30": ({"algorithm": "ntk_dfl", "learning_rate": 1e30, "rounds": 2,
                            "topology": "ring", "dropout": 0.0}, IN_TRAINING),
    "taus decreasing": ({"algorithm": "ntk_dfl", "taus": [8, 4]}, BEFORE_TRAINING),
    "taus empty": ({"algorithm": "ntk_dfl", "taus": []}, BEFORE_TRAINING),
    "rounds=0": ({"rounds": 0}, BEFORE_TRAINING),
    "labels >= C": ({"label_shift": 10}, BEFORE_TRAINING),
    "nan pixel": ({"nan_pixel": True}, BEFORE_TRAINING),
    "wrong image size": ({"height": 27}, BEFORE_TRAINING),
    "dropout=1": ({"dropout": 1.0}, BEFORE_TRAINING),
    "unknown algorithm": ({"algorithm": "fedprox"}, BEFORE_TRAINING),
    "too many neighbours": ({"topology": "random", "num_neighbors": 9}, BEFORE_TRAINING),
    # bounded cross-entropy gradients carry the weights to ~1e30 without NaN: caught by size
    "learning_rate=1e30 (local SGD)": ({"algorithm": "dfedavg", "learning_rate": 1e30,
                                        "rounds": 2, "topology": "ring", "dropout": 0.0},
                                       IN_TRAINING),
    "learning_rate=1e39": ({"learning_rate": 1e39}, BEFORE_TRAINING),
}

base_configs = st.fixed_dictionaries({
    "algorithm": st.sampled_from(["ntk_dfl", "dfedavg", "dpsgd", "dfedavgm", "dfedsam"]),
    "num_clients": st.integers(2, 6),
    "samples": st.integers(1, 6),
    "topology": st.sampled_from(["random", "ring", "erdos_renyi"]),
    "num_neighbors": st.integers(0, 3),  # an odd kappa x clients is a documented error too
    "learning_rate": st.sampled_from([0.01, 0.1]),
    "taus": st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True).map(sorted),
    "rounds": st.integers(1, 2),
    "label_shift": st.just(0), "nan_pixel": st.just(False), "height": st.just(28),
    "dropout": st.sampled_from([0.0, 0.5]),
})


class RoundRecorder(keras.callbacks.Callback):
    """Counts the rounds (Keras epochs) that started and that completed."""

    def __init__(self):
        super().__init__()
        self.begun, self.ended = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.begun += 1

    def on_epoch_end(self, epoch, logs=None):
        self.ended += 1


def _build_and_fit(c, progress):
    """Builds and trains configuration ``c``; ``progress`` receives the trainer and recorder."""
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(c["num_clients"]):
        x = rng.random((c["samples"], c["height"], 28, 1)).astype(np.float32)
        if c["nan_pixel"] and k == 0:
            x[0, 0, 0, 0] = np.nan
        y = (rng.integers(0, 10, c["samples"]) + c["label_shift"]).astype(np.int64)
        pairs.append((x, y))
    lr = c["learning_rate"]
    if c["algorithm"] == "ntk_dfl":
        algorithm = nd.algorithms.NTKDFL(learning_rate=lr, taus=c["taus"])
    else:
        algorithm = nd.algorithms.get(c["algorithm"], learning_rate=lr, local_epochs=1)
    topology = {"random": lambda: nd.topology.RandomGraph(c["num_neighbors"]),
                "ring": nd.topology.Ring,
                "erdos_renyi": lambda: nd.topology.ErdosRenyi(0.5)}[c["topology"]]()
    faults = nd.Faults(dropout=c["dropout"]) if c["dropout"] else None
    trainer = nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)), algorithm, topology,
                                      faults=faults)
    progress["trainer"] = trainer
    trainer.fit(pairs, rounds=c["rounds"], verbose=0, callbacks=[progress["recorder"]],
                validation_data=(pairs[0][0], np.clip(pairs[0][1], 0, 9)))
    return trainer


def _check_documented(error):
    origin = traceback.extract_tb(error.__traceback__)[-1].filename
    assert origin.startswith(PACKAGE), f"{type(error).__name__} from {origin}: {error}"
    assert str(error).strip(), "an error without a message"


# no shrinking: a failure is reported as drawn (shrinking retrains many configurations)
FAST = settings(deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@settings(FAST, max_examples=4)
@given(base=base_configs)
def test_every_corruption_raises_a_documented_error_in_time(corruption, base):
    overrides, when = CORRUPTIONS[corruption]
    config = {**base, **overrides}
    progress = {"trainer": None, "recorder": RoundRecorder()}
    recorder = progress["recorder"]
    with pytest.raises(DOCUMENTED_ERRORS) as info:
        _build_and_fit(config, progress)
    error = info.value
    _check_documented(error)
    event(f"raised {type(error).__name__}")
    trainer = progress["trainer"]
    if when == BEFORE_TRAINING:
        assert recorder.begun == 0, (
            f"{corruption}: {type(error).__name__} only after {recorder.begun} round(s) began "
            f"({recorder.ended} completed): {error}")
        assert trainer is None or trainer.round == 0
    else:
        assert isinstance(error, DivergenceError), f"{corruption}: {type(error).__name__}: {error}"
        assert error.round is not None and 1 <= error.round <= config["rounds"], error.round
        assert recorder.ended == error.round - 1, (
            f"the diverging round {error.round} completed ({recorder.ended} rounds ended)")
        assert trainer.round == error.round - 1  # the diverging round was not kept


@settings(FAST, max_examples=20)
@given(config=base_configs)
def test_uncorrupted_configuration_runs_or_raises_a_documented_error(config):
    progress = {"trainer": None, "recorder": RoundRecorder()}
    try:
        trainer = _build_and_fit(config, progress)
    except DOCUMENTED_ERRORS as e:
        _check_documented(e)
        assert not isinstance(e, DivergenceError), f"a sane configuration diverged: {e}"
        assert progress["recorder"].begun == 0, f"raised after training started: {e}"
        event(f"raised {type(e).__name__}")  # pytest --hypothesis-show-statistics shows the mix
        return
    event("ran")
    assert progress["recorder"].ended == config["rounds"]
    for w in trainer.client_weights:  # it ran: the weights are finite
        assert np.isfinite(w.numpy()).all()


def test_corruption_table_covers_both_kinds():
    """The table names at least one corruption of each kind, and nothing else."""
    kinds = {when for _, when in CORRUPTIONS.values()}
    assert kinds == {BEFORE_TRAINING, IN_TRAINING}
