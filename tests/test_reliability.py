"""Resume after a crash, client failures and divergence (issue 5)."""

import csv
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import checkpoint, compare, selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = {
    "ntk_dfl": lambda: nd.algorithms.NTKDFL(taus=(20, 50)),
    "dfedavg": lambda: nd.algorithms.get("dfedavg", local_epochs=1),
    "dfedavgm": lambda: nd.algorithms.get("dfedavgm", local_epochs=1),
    "dpsgd": lambda: nd.algorithms.get("dpsgd"),
    "dfedsam": lambda: nd.algorithms.get("dfedsam", local_epochs=1),
}


def _trainer(name, faults=None, seed=0, channel=None):
    return nd.DecentralizedTrainer(nd.models.mlp, ALGORITHMS[name](), nd.topology.RandomGraph(3),
                                   seed=seed, faults=faults, channel=channel)


def _rows(path):
    """history.csv without the timing column (wall time differs between runs)."""
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trips_and_rejects_damage(tmp_path):
    state = {"round": 3, "seed": 7, "streams": {"init": 0}, "algorithm": "x", "num_clients": 2,
             "weights": [np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32),
                         np.arange(5.0)]}
    path = str(tmp_path / "c.npz")
    checkpoint.save(path, state)
    back = checkpoint.load(path)
    assert {k: back[k] for k in ("round", "seed", "streams", "algorithm")} == \
        {"round": 3, "seed": 7, "streams": {"init": 0}, "algorithm": "x"}
    np.testing.assert_array_equal(back["weights"][0], state["weights"][0])
    np.testing.assert_array_equal(back["weights"][1], state["weights"][1])
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


# -- atomic writes ------------------------------------------------------------------------------
def _record_fsyncs(monkeypatch):
    """Patches os.fsync to record the inode of every file or folder it flushes."""
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_atomic_path_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    from ntkdfl_tf.io import atomic_path

    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "out.keras"
    target.write_text("old")
    with atomic_path(str(target), suffix=".keras") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".keras")
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"  # nothing visible before the rename
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.keras"]
    assert target.stat().st_ino in synced and tmp_path.stat().st_ino in synced
    (tmp_path / "plain").write_text("")  # what open() would give: the umask, not 0600
    plain_mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE(target.stat().st_mode) == plain_mode
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("stop")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.keras", "plain"]


def _report(curve_length):
    """A SelectionReport stand-in for selection.write_csv; a short test curve fails mid-write."""
    return types.SimpleNamespace(
        validation_curve=[0.5, 0.6, 0.7],
        test_curves={o: [0.1, 0.2, 0.3][:curve_length] for o in selection.ORDERS},
        selection=types.SimpleNamespace(count=2))


def _history(path, fail, monkeypatch):
    cb = nd.callbacks.HistoryCSV(path)
    cb.on_train_begin()
    if fail:
        def disk_full(writer, rows):
            writer.writerow(rows[0])
            raise OSError("No space left on device")

        monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    cb.on_epoch_end(1 if fail else 0, {"loss": 1.0})


def _summary(path, fail, monkeypatch):
    compare.write_summary(path, [{"run": "a", "unknown_column": 1}] if fail else [{"run": "a"}])


def _selection(path, fail, monkeypatch):
    selection.write_csv(path, _report(1 if fail else 3))


def _checkpoint(path, fail, monkeypatch):
    state = {"round": 1, "weights": [np.zeros((2, 3), np.float32)]}
    if fail:  # an array that would need pickling: refused before the file is touched
        state["weights"].append(np.array([{"a": 1}], dtype=object))
    checkpoint.save(path, state)


WRITERS = {"history_csv": _history, "summary": _summary, "selection_csv": _selection,
           "checkpoint": _checkpoint}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writers_sync_their_file_and_keep_it_when_a_write_fails(tmp_path, monkeypatch, writer):
    write = WRITERS[writer]
    path = str(tmp_path / "out.file")
    synced = _record_fsyncs(monkeypatch)
    write(path, False, monkeypatch)
    assert os.stat(path).st_ino in synced and tmp_path.stat().st_ino in synced
    before = open(path, "rb").read()
    with pytest.raises((ValueError, IndexError, OSError)):
        write(path, True, monkeypatch)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["out.file"]  # no temporary file left behind


def test_final_aggregation_saves_the_model_atomically(tiny, tmp_path, monkeypatch):
    clients, _ = tiny
    synced = _record_fsyncs(monkeypatch)
    final = nd.callbacks.FinalAggregation(str(tmp_path), "agg")
    trainer = _trainer("dfedavg")
    trainer.fit(clients, rounds=1, verbose=0, callbacks=[final])
    assert os.listdir(tmp_path) == ["agg.keras"] and os.stat(final.path).st_ino in synced
    for a, b in zip(keras.models.load_model(final.path).get_weights(),
                    trainer.aggregated_weights()):
        np.testing.assert_array_equal(a, b)
    before = open(final.path, "rb").read()

    def save_then_fail(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        final.on_train_end()
    assert open(final.path, "rb").read() == before and os.listdir(tmp_path) == ["agg.keras"]


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
def test_faults_drop_clients_and_the_channel_loses_links():
    rng = np.random.default_rng(0)
    active = nd.Faults(dropout=0.3, leave={5: 0}).participants(200, 0, rng)
    assert not active[5]
    assert 0.6 < active.mean() < 0.8
    channel = nd.protocol.Channel(message_loss=0.2).round(200, rng)
    everyone = ~np.eye(200, dtype=bool)
    sent = nd.protocol.weights_messages(everyone, [np.zeros((200, 1), np.float32)])
    kept = nd.protocol.heard_from(channel.deliver(sent).messages, 200)
    assert 0.75 < kept.sum() / everyone.sum() < 0.85
    assert (kept != kept.T).any()  # a link fails in one direction only


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_keeps_training_with_failures(tiny, name):
    """Dropped clients keep their weights; the rest train; departed clients leave the aggregate."""
    clients, test = tiny
    faults = nd.Faults(dropout=0.3, leave={7: 1})
    lossy = nd.protocol.Channel(message_loss=0.1)
    trainer = _trainer(name, faults=faults, channel=lossy)
    first_loss = trainer.fit(clients, rounds=1, verbose=0).history["loss"][0]
    before = [w.numpy() for w in trainer.client_weights]
    history = trainer.fit(clients, rounds=3, validation_data=test, verbose=0)
    active = faults.participants(8, 1, nd.trainer.stream_rng(0, "failures", 1))
    assert 0 < active.sum() < 8
    # round 2 (index 1) alone: rerun it from `before` to isolate who moved
    probe = _trainer(name, faults=faults, channel=lossy)
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
    # the clients' training loss still falls (D-PSGD's is one short epoch's: noisy, hence min)
    assert min(history.history["loss"]) < first_loss


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
    assert "(learning_rate 1e+30 in round 2)" in str(e.value)  # round 2's rate, not round 1's
    saved = checkpoint.load(ckpt.path)
    assert saved["round"] == 1
    assert all(np.isfinite(w).all() for w in saved["weights"])


# -- resume from the previous checkpoint; the crash between history row and checkpoint ----------
RESUME_ALGORITHM = "dfedavgm"  # a baseline with local momentum (buffers restart each round)
ROUNDS = 5


def _run_callbacks(folder, *between):
    """HistoryCSV, ``between``, then RoundCheckpoint: the launchers' order."""
    return [nd.callbacks.HistoryCSV(str(folder / "history.csv")), *between,
            nd.callbacks.RoundCheckpoint(str(folder), verbose=0)]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The reference: ROUNDS rounds in one go; returns (client weights, history rows)."""
    clients, test = tiny
    folder = tmp_path_factory.mktemp("uninterrupted")
    trainer = _trainer(RESUME_ALGORITHM)
    trainer.fit(clients, rounds=ROUNDS, validation_data=test, callbacks=_run_callbacks(folder),
                verbose=0)
    return [w.numpy() for w in trainer.client_weights], _rows(folder / "history.csv")


def _assert_same_run(trainer, folder, uninterrupted):
    weights, rows = uninterrupted
    for a, b in zip(weights, trainer.client_weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert _rows(folder / "history.csv") == rows
    assert [r["round"] for r in rows] == [str(r) for r in range(1, ROUNDS + 1)]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)


def _flip_middle(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(16)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


class _HistoryProbe(keras.callbacks.Callback):
    """Records the rounds in history.csv when the first round of a fit begins."""

    def __init__(self, path):
        super().__init__()
        self.path, self.rounds_at_start = path, None

    def on_epoch_begin(self, epoch, logs=None):
        if self.rounds_at_start is None:
            self.rounds_at_start = [r["round"] for r in _rows(self.path)]


@pytest.mark.parametrize("damage", [_truncate, _flip_middle], ids=["torn", "flipped"])
def test_resume_skips_a_damaged_newest_checkpoint(tiny, tmp_path, uninterrupted, damage):
    clients, test = tiny
    _trainer(RESUME_ALGORITHM).fit(clients, rounds=3, validation_data=test, verbose=0,
                                   callbacks=_run_callbacks(tmp_path))
    newest = os.path.join(str(tmp_path), "checkpoint.npz")
    previous = checkpoint.previous_path(newest)
    damage(newest)
    with pytest.raises(nd.CheckpointError, match=re.escape(newest)):
        checkpoint.load(newest)
    warned = f"{re.escape(newest)}.*damaged.*{re.escape(previous)}"

    # nothing to run (rounds=2 is the previous checkpoint's round): history is cut back to it
    with pytest.warns(UserWarning, match=warned):
        _trainer(RESUME_ALGORITHM).fit(clients, rounds=2, validation_data=test, verbose=0,
                                       callbacks=_run_callbacks(tmp_path))
    assert _rows(tmp_path / "history.csv") == uninterrupted[1][:2]

    probe = _HistoryProbe(tmp_path / "history.csv")
    cbs = _run_callbacks(tmp_path, probe)
    resumed = _trainer(RESUME_ALGORITHM)
    with pytest.warns(UserWarning, match=warned):
        resumed.fit(clients, rounds=ROUNDS, validation_data=test, callbacks=cbs, verbose=0)
    assert cbs[-1].restored_round == 2
    assert probe.rounds_at_start == ["1", "2"]
    assert len(resumed.model.history.history["loss"]) == ROUNDS - 2
    _assert_same_run(resumed, tmp_path, uninterrupted)
    assert checkpoint.load(newest)["round"] == ROUNDS
    assert checkpoint.load(previous)["round"] == ROUNDS - 1


def test_fresh_start_never_falls_back_to_an_older_runs_checkpoint(tiny, tmp_path):
    """--noresume: the old run's previous checkpoint goes at the first save, not kept as a
    fallback for the new run."""
    clients, _ = tiny
    _trainer("dfedavg").fit(clients, rounds=2, verbose=0,
                            callbacks=[nd.callbacks.RoundCheckpoint(str(tmp_path), verbose=0)])
    newest = os.path.join(str(tmp_path), "checkpoint.npz")
    assert os.path.exists(checkpoint.previous_path(newest))
    _trainer("dfedavg").fit(clients, rounds=1, verbose=0, callbacks=[
        nd.callbacks.RoundCheckpoint(str(tmp_path), resume=False, verbose=0)])
    assert checkpoint.load(newest)["round"] == 1
    assert not os.path.exists(checkpoint.previous_path(newest))


class _Crash(Exception):
    """Stands for the process dying."""


class _CrashAfterRow(keras.callbacks.Callback):
    """Dies in round 2 after HistoryCSV wrote the row and before RoundCheckpoint saved it."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise _Crash


def _crash_in_second_save(monkeypatch):
    """Makes RoundCheckpoint's second save (round 2) die before anything is written."""
    real, calls = checkpoint.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)


@pytest.mark.parametrize("where", ["callback", "save"])
def test_crash_between_history_row_and_checkpoint(tiny, tmp_path, uninterrupted, monkeypatch,
                                                  where):
    """History has round 2's row, the checkpoint is of round 1: the resumed run writes each
    round exactly once and equals the uninterrupted run."""
    clients, test = tiny
    between = [_CrashAfterRow()] if where == "callback" else []
    if where == "save":
        _crash_in_second_save(monkeypatch)
    with pytest.raises(_Crash):
        _trainer(RESUME_ALGORITHM).fit(clients, rounds=ROUNDS, validation_data=test, verbose=0,
                                       callbacks=_run_callbacks(tmp_path, *between))
    monkeypatch.undo()  # the new process saves normally
    assert [r["round"] for r in _rows(tmp_path / "history.csv")] == ["1", "2"]
    assert checkpoint.load(os.path.join(str(tmp_path), "checkpoint.npz"))["round"] == 1
    resumed = _trainer(RESUME_ALGORITHM)
    cbs = _run_callbacks(tmp_path)
    resumed.fit(clients, rounds=ROUNDS, validation_data=test, callbacks=cbs, verbose=0)
    assert cbs[-1].restored_round == 1
    _assert_same_run(resumed, tmp_path, uninterrupted)


# -- CI -----------------------------------------------------------------------------------------
def test_ci_keeps_the_readme_environment():
    """.ci/run builds its own environment and never touches .venv (the README's)."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [shlex.split(line, comments=True) for line in f]
    commands = [w for w in lines if w]
    assert not [c for c in commands if any(w.rstrip("/") in (".venv", "./.venv") for w in c)]
    venv = next(c[-1] for c in commands if c[:3] == ["python3", "-m", "venv"])
    assert venv.startswith(".ci/")
    assert ["rm", "-rf", venv] in commands and [".", f"{venv}/bin/activate"] in commands
    assert commands[-1] == ["python", "-m", "pytest", "tests"]
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert venv.rstrip("/") + "/" in f.read().split()
