"""Property: over random small configurations, the trainer runs or raises a documented error.

"Documented" means one of ``ntkdfl_tf.errors.DOCUMENTED_ERRORS`` (ValueError, TypeError,
DivergenceError), raised by ntkdfl_tf's own code (the innermost frame is in the package), never
an error from deep inside TensorFlow, NumPy or Keras.
"""

import os
import traceback

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ntkdfl_tf as nd
from ntkdfl_tf.errors import DOCUMENTED_ERRORS

PACKAGE = os.path.dirname(nd.__file__)

# A plausible small configuration plus at most one corruption, so that both outcomes occur.
CORRUPTIONS = {
    "learning_rate=0": {"learning_rate": 0.0}, "learning_rate=nan": {"learning_rate": float("nan")},
    "learning_rate=1e30": {"learning_rate": 1e30}, "taus decreasing": {"taus": [8, 4]},
    "taus empty": {"taus": []}, "rounds=0": {"rounds": 0}, "labels >= C": {"label_shift": 9},
    "nan pixel": {"nan_pixel": True}, "wrong image size": {"height": 27},
    "dropout=1": {"dropout": 1.0}, "unknown algorithm": {"algorithm": "fedprox"},
    "too many neighbours": {"num_neighbors": 9},
}

configs = st.builds(
    lambda base, corruption: {**base, **CORRUPTIONS.get(corruption, {})},
    st.fixed_dictionaries({
        "algorithm": st.sampled_from(["ntk_dfl", "dfedavg", "dpsgd", "dfedavgm"]),
        "num_clients": st.integers(2, 6),
        "samples": st.integers(1, 6),
        "topology": st.sampled_from(["random", "ring", "erdos_renyi"]),
        "num_neighbors": st.integers(0, 3),  # an odd kappa x clients is a documented error too
        "learning_rate": st.sampled_from([0.01, 0.1]),
        "taus": st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True).map(sorted),
        "rounds": st.integers(1, 2),
        "label_shift": st.just(0), "nan_pixel": st.just(False), "height": st.just(28),
        "dropout": st.sampled_from([0.0, 0.5]),
    }),
    st.sampled_from([None] * len(CORRUPTIONS) + sorted(CORRUPTIONS)))


def _build_and_fit(c):
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
    trainer.fit(pairs, rounds=c["rounds"], verbose=0,
                validation_data=(pairs[0][0], np.clip(pairs[0][1], 0, 9)))
    return trainer


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_trainer_runs_or_raises_a_documented_error(config):
    try:
        trainer = _build_and_fit(config)
    except DOCUMENTED_ERRORS as e:
        origin = traceback.extract_tb(e.__traceback__)[-1].filename
        assert origin.startswith(PACKAGE), f"{type(e).__name__} from {origin}: {e}"
        assert str(e).strip(), "an error without a message"
        event(f"raised {type(e).__name__}")  # pytest --hypothesis-show-statistics shows the mix
        return
    event("ran")
    for w in trainer.client_weights:  # it ran: the weights are finite
        assert np.isfinite(w.numpy()).all()
