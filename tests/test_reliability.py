"""Resume after a crash, client failures and divergence (issue 5)."""

import csv
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = {
    "ntk_dfl": lambda: nd.algorithms.NTKDFL(taus=(20, 50)),
    "dfedavg": lambda: nd.algorithms.get("dfedavg", local_epochs=1),
    "dfedavgm": lambda: nd.algorithms.get("dfedavgm", local_epochs=1),
    "dpsgd": lambda: nd.algorithms.get("dpsgd"),
    "dfedsam": lambda: nd.algorithms.get("dfedsam", local_epochs=1),
}


def _trainer(name, faults=None, seed=0):
    return nd.DecentralizedTrainer(nd.models.mlp, ALGORITHMS[name](), nd.topology.RandomGraph(3),
                                   seed=seed, faults=faults)


def _rows(path):
    """history.csv without the timing column (wall time differs between runs)."""
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trips_and_rejects_damage(tmp_path):
    state = {"round": 3, "seed": 7, "streams": {"init": 0}, "algorithm": "x", "num_clients": 2,
             "weights": [np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)],
             "algorithm_state": [np.arange(5.0)]}
    path = str(tmp_path / "c.npz")
    checkpoint.save(path, state)
    back = checkpoint.load(path)
    assert {k: back[k] for k in ("round", "seed", "streams", "algorithm")} == \
        {"round": 3, "seed": 7, "streams": {"init": 0}, "algorithm": "x"}
    np.testing.assert_array_equal(back["weights"][0], state["weights"][0])
    np.testing.assert_array_equal(back["algorithm_state"][0], state["algorithm_state"][0])
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary file left behind
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(nd.CheckpointError, match="delete it"):
        checkpoint.load(path)


@pytest.mark.parametrize("name", ["ntk_dfl", "dfedavgm"])
def test_resumed_run_equals_uninterrupted_run(tiny, tmp_path, name):
    clients, test = tiny

    def callbacks(folder):
        return [nd.callbacks.HistoryCSV(str(folder / "history.csv")),
                nd.callbacks.RoundCheckpoint(str(folder))]

    whole = _trainer(name)
    whole.fit(clients, rounds=3, validation_data=test, callbacks=callbacks(tmp_path / "a"),
              verbose=0)
    first = _trainer(name)  # "crashes" after round 1: a new process would start from here
    first.fit(clients, rounds=1, validation_data=test, callbacks=callbacks(tmp_path / "b"),
              verbose=0)
    resumed = _trainer(name)
    cbs = callbacks(tmp_path / "b")
    resumed.fit(clients, rounds=3, validation_data=test, callbacks=cbs, verbose=0)
    assert cbs[1].restored_round == 1
    assert len(resumed.model.history.history["loss"]) == 2  # only rounds 2 and 3 ran again
    for a, b in zip(whole.client_weights, resumed.client_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert _rows(tmp_path / "a" / "history.csv") == _rows(tmp_path / "b" / "history.csv")


def test_checkpoint_of_another_run_is_refused(tiny, tmp_path):
    clients, _ = tiny
    _trainer("dfedavg").fit(clients, rounds=1, verbose=0,
                            callbacks=[nd.callbacks.RoundCheckpoint(str(tmp_path))])
    other = _trainer("dfedavg", seed=1)
    with pytest.raises(nd.CheckpointError, match="seed=0.*--noresume"):
        other.fit(clients, rounds=2, verbose=0,
                  callbacks=[nd.callbacks.RoundCheckpoint(str(tmp_path))])


TINY = ["--num_clients=6", "--samples_per_client=30", "--num_neighbors=2", "--taus=10,20",
        "--rounds=5", "--verbose=2", "--hidden=20"]


def _launch(logdir, *extra):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launchers", "train.py"), *TINY,
         f"--logdir={logdir}", f"--save_dir={logdir}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _saved_round(logdir):
    try:
        return checkpoint.load(os.path.join(logdir, "checkpoint.npz"))["round"]
    except (nd.CheckpointError, FileNotFoundError):
        return 0


def test_sigkill_then_resume_gives_the_same_history_and_model(tmp_path):
    """The launcher killed with SIGKILL mid-run, then rerun: as if it had never stopped."""
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    reference = _launch(whole)
    victim = _launch(killed)
    deadline = time.time() + 300
    while _saved_round(killed) < 2 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    at_kill = _saved_round(killed)
    assert 2 <= at_kill < 5, f"killed at round {at_kill}: the test did not interrupt the run"
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    resumed = _launch(killed)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert _rows(os.path.join(whole, "history.csv")) == _rows(os.path.join(killed, "history.csv"))
    assert [r["round"] for r in _rows(os.path.join(killed, "history.csv"))] == \
        ["1", "2", "3", "4", "5"]
    a = keras.models.load_model(os.path.join(whole, "whole.keras")).get_weights()
    b = keras.models.load_model(os.path.join(killed, "killed.keras")).get_weights()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_backup_and_restore_still_resumes(tiny, tmp_path):
    """Keras' own BackupAndRestore: an interrupted fit restarts at the round it reached."""
    clients, _ = tiny

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    trainer = _trainer("dfedavg")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(clients, rounds=4, verbose=0, callbacks=[backup, Interrupt()])
    again = _trainer("dfedavg")
    history = again.fit(clients, rounds=4, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert len(history.history["loss"]) == 2  # rounds 3 and 4: round 2 was backed up first
    assert again.round == 4


# -- failures -----------------------------------------------------------------------------------
def test_faults_cut_every_edge_of_dropped_clients_and_lose_messages():
    adjacency = ~np.eye(200, dtype=bool)
    rng = np.random.default_rng(0)
    active, kept = nd.Faults(dropout=0.3, message_loss=0.2, leave={5: 0}).apply(adjacency, 0, rng)
    assert not active[5]
    assert 0.6 < active.mean() < 0.8
    assert not kept[~active].any() and not kept[:, ~active].any()
    among = adjacency[np.ix_(active, active)]
    assert 0.75 < kept[np.ix_(active, active)].sum() / among.sum() < 0.85
    assert (kept != kept.T).any()  # a lost message is lost in one direction only


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_keeps_training_with_failures(tiny, name):
    """Dropped clients keep their weights; the rest train; departed clients leave the aggregate."""
    clients, test = tiny
    faults = nd.Faults(dropout=0.3, message_loss=0.1, leave={7: 1})
    trainer = _trainer(name, faults=faults)
    first_loss = trainer.fit(clients, rounds=1, verbose=0).history["loss"][0]
    before = [w.numpy() for w in trainer.client_weights]
    history = trainer.fit(clients, rounds=3, validation_data=test, verbose=0)
    active = faults.apply(trainer.topology.draw(8, nd.trainer.stream_rng(0, "topology", 1)), 1,
                          nd.trainer.stream_rng(0, "failures", 1))[0]
    assert 0 < active.sum() < 8
    # round 2 (index 1) alone: rerun it from `before` to isolate who moved
    probe = _trainer(name, faults=faults)
    probe.fit(clients, rounds=1, verbose=0)
    probe.fit(clients, rounds=2, verbose=0)
    after = [w.numpy() for w in probe.client_weights]
    moved = np.array([any(not np.array_equal(b[i], a[i]) for b, a in zip(before, after))
                      for i in range(8)])
    np.testing.assert_array_equal(moved, active)
    assert history.history["active_clients"][0] == active.sum()
    assert not trainer.present_clients()[7]
    expected = [w.numpy()[:7].mean(0) for w in trainer.client_weights]
    for e, got in zip(expected, trainer.aggregated_weights()):
        np.testing.assert_allclose(got, e, rtol=1e-6)
    assert np.isfinite(history.history["val_loss"]).all()
    assert history.history["loss"][-1] < first_loss  # the clients' training loss still falls


# -- divergence ---------------------------------------------------------------------------------
def test_divergence_names_round_and_clients_and_keeps_last_checkpoint(tiny, tmp_path):
    clients, _ = tiny
    algorithm = nd.algorithms.get("dfedavg", local_epochs=1,
                                  learning_rate=lambda r: 0.05 if r == 0 else 1e30)
    trainer = nd.DecentralizedTrainer(nd.models.mlp, algorithm, nd.topology.RandomGraph(3))
    ckpt = nd.callbacks.RoundCheckpoint(str(tmp_path))
    with pytest.raises(nd.DivergenceError, match=r"round 2: client\(s\) \[\d.*last checkpoint") as e:
        trainer.fit(clients, rounds=3, verbose=0, callbacks=[ckpt])
    assert e.value.round == 2 and e.value.clients
    saved = checkpoint.load(ckpt.path)
    assert saved["round"] == 1
    assert all(np.isfinite(w).all() for w in saved["weights"])
