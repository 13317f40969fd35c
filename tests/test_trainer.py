"""End to end on real Fashion-MNIST through DecentralizedTrainer.fit with stock Keras callbacks."""

import csv
import functools
import glob
import os

import keras
import numpy as np
import pytest

import ntkdfl_tf as nd

ROUNDS = 3


@pytest.fixture(scope="module")
def trained(small_fashion, tmp_path_factory):
    """One fit with every stock callback the issue names, plus the project callbacks."""
    clients, (x_test, y_test) = small_fashion
    out = tmp_path_factory.mktemp("run")
    trainer = nd.DecentralizedTrainer(
        model_fn=nd.models.mlp, algorithm=nd.algorithms.NTKDFL(),
        topology=nd.topology.RandomGraph(num_neighbors=5), seed=0)
    initial = trainer.model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    cbs = [keras.callbacks.CSVLogger(str(out / "keras.csv")),
           keras.callbacks.TensorBoard(str(out / "tb"), write_graph=False),
           keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=10),
           keras.callbacks.ModelCheckpoint(str(out / "ckpt.weights.h5"), save_weights_only=True),
           keras.callbacks.BackupAndRestore(str(out / "backup")),
           nd.callbacks.HistoryCSV(str(out / "history.csv")),
           nd.callbacks.ClientMetrics(str(out / "tb")),
           nd.callbacks.FinalAggregation(str(out / "models"), "agg")]
    history = trainer.fit(clients, rounds=ROUNDS, validation_data=(x_test, y_test),
                          callbacks=cbs, verbose=1)
    return trainer, history, initial, out, (x_test, y_test)


def test_history_has_flat_per_round_logs(trained):
    """fit returns a Keras History with one finite scalar per round for every documented key."""
    _, history, _, _, _ = trained
    assert isinstance(history, keras.callbacks.History)
    keys = {"loss", "tau", "bytes_sent", "val_loss", "val_accuracy", "val_client_mean_accuracy",
            "val_client_min_accuracy", "val_client_max_accuracy"}
    assert keys <= set(history.history)
    for key in keys:
        assert len(history.history[key]) == ROUNDS and np.all(np.isfinite(history.history[key]))
    assert history.epoch == list(range(ROUNDS))


def test_aggregate_learns_well_above_chance(trained):
    """The aggregated model beats chance by far and its own round-0 accuracy."""
    _, history, initial, _, _ = trained
    acc = history.history["val_accuracy"]
    assert acc[-1] > 0.5  # chance is 0.1
    assert acc[-1] > initial["accuracy"] + 0.2
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_client_accuracy_summary_is_consistent(trained):
    """min <= mean <= max of client accuracies, matching the per-client array."""
    trainer, history, _, _, _ = trained
    h = history.history
    accs = trainer.last_client_accuracy
    assert len(accs) == 20
    assert h["val_client_min_accuracy"][-1] <= h["val_client_mean_accuracy"][-1]
    assert h["val_client_mean_accuracy"][-1] <= h["val_client_max_accuracy"][-1]
    assert h["val_client_mean_accuracy"][-1] == pytest.approx(accs.mean())


def test_saved_model_loads_and_reproduces_accuracy(trained):
    """FinalAggregation's .keras file classifies raw images with the reported accuracy."""
    trainer, history, _, out, (x_test, y_test) = trained
    model = keras.models.load_model(out / "models" / "agg.keras")
    pred = np.argmax(model.predict(x_test, verbose=0), axis=-1)
    assert np.mean(pred == y_test) == pytest.approx(history.history["val_accuracy"][-1], abs=1e-6)
    for a, b in zip(model.get_weights(), trainer.aggregated_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)


def test_aggregate_is_mean_of_clients(trained):
    """aggregate() returns a model whose weights are the mean of the client weights."""
    trainer, _, _, _, _ = trained
    model = trainer.aggregate()
    for w, stacked in zip(model.get_weights(), trainer.client_weights):
        np.testing.assert_allclose(w, stacked.numpy().mean(axis=0), rtol=1e-6)
    assert not np.allclose(trainer.client_weights[0].numpy()[0],
                           trainer.client_weights[0].numpy()[1])


def test_stock_callbacks_wrote_their_files(trained):
    """CSVLogger, TensorBoard, ModelCheckpoint, HistoryCSV and ClientMetrics all produced output."""
    _, _, _, out, _ = trained
    with open(out / "keras.csv") as f:
        assert len(list(csv.DictReader(f))) == ROUNDS
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == list(range(1, ROUNDS + 1))
    assert {"val_accuracy", "val_client_mean_accuracy", "loss", "bytes_sent"} <= set(rows[0])
    assert os.path.exists(out / "ckpt.weights.h5")
    assert glob.glob(str(out / "tb" / "validation" / "events.*"))
    assert glob.glob(str(out / "tb" / "clients" / "events.*"))
    assert not os.path.exists(out / "backup")  # BackupAndRestore cleans up after a full run


def test_bytes_sent_counts_weights_jacobians_and_outputs(trained, small_fashion):
    """bytes_sent equals the protocol count on a 5-regular graph of 20 clients (float32)."""
    trainer, history, _, _, _ = trained
    clients, _ = small_fashion
    p, c = trainer.fns.num_params, trainer.fns.num_classes
    weights = 20 * 5 * 2 * p  # per directed edge: w_j to i, then w_bar_i back to j
    jacobians = 5 * int(clients.counts.sum()) * (c * p + c + 1)  # J, logits, label; 5 neighbours
    assert history.history["bytes_sent"] == [4.0 * (weights + jacobians)] * ROUNDS


def test_early_stopping_stops_training(small_fashion):
    """EarlyStopping(monitor=val_accuracy) ends fit early when accuracy cannot improve."""
    clients, (x_test, y_test) = small_fashion
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(10,)),
                                      nd.topology.Ring(), seed=0)
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=0,
                                         min_delta=1.0)  # no round can gain 1.0: stop at epoch 1
    history = trainer.fit(clients, rounds=5, validation_data=(x_test[:200], y_test[:200]),
                          callbacks=[stop], verbose=0)
    assert history.epoch == [0, 1]


class _LogRecorder(keras.callbacks.Callback):
    """Records each round's logs."""

    def __init__(self):
        super().__init__()
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


def test_client_metrics_every_and_stop_at_accuracy(tiny, one_line_error):
    """Client models are evaluated on every n-th round, the last one and the one that reaches
    stop_at_accuracy (which ends the fit); skipping them changes no weight or metric."""
    clients, test = tiny

    def fit(**kwargs):
        trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.get("dpsgd"),
                                          nd.topology.RandomGraph(3), seed=5)
        recorder = _LogRecorder()
        trainer.fit(clients, rounds=7, validation_data=test, callbacks=[recorder], verbose=0,
                    **kwargs)
        return trainer, recorder.logs

    every, all_logs = fit()
    sparse, logs = fit(client_metrics_every=3)
    assert [i + 1 for i, r in enumerate(logs) if "val_client_mean_accuracy" in r] == [3, 6, 7]
    for dense, r in zip(all_logs, logs):
        assert {k: v for k, v in dense.items() if k in r and k != "round_seconds"} == \
            {k: v for k, v in r.items() if k != "round_seconds"}
    for a, b in zip(every.client_weights, sparse.client_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # the first round whose aggregate beats round 1's stops the run, with its client metrics
    target = all_logs[0]["val_accuracy"] + 1e-6
    first = next(i for i, r in enumerate(all_logs) if r["val_accuracy"] >= target)
    assert 0 < first < 6
    _, stopped = fit(client_metrics_every=100, stop_at_accuracy=target)
    assert len(stopped) == first + 1
    assert [i for i, r in enumerate(stopped) if "val_client_mean_accuracy" in r] == [first]
    assert stopped[-1]["val_client_mean_accuracy"] == all_logs[first]["val_client_mean_accuracy"]
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.get("dpsgd"),
                                      nd.topology.RandomGraph(3))
    one_line_error(functools.partial(trainer.fit, client_metrics_every=0), clients, 2,
                   names=["client_metrics_every", "0"])
    one_line_error(functools.partial(trainer.fit, stop_at_accuracy=0.5), clients, 2,
                   names=["stop_at_accuracy", "validation_data"])


class _StepRecorder(keras.callbacks.Callback):
    """Records (round, step) of every on_train_batch_end."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append((self.epoch, batch))


@pytest.mark.parametrize("algorithm", [
    nd.algorithms.NTKDFL(taus=(10, 20), client_batch=3),
    nd.algorithms.get("dfedavg", local_epochs=1, client_batch=3)])
def test_progress_counts_client_groups_and_prints_a_short_line(tiny, capsys, algorithm):
    """8 clients in groups of 3: three steps per round reach every callback, and verbose=2
    prints one short line per round (accuracy, loss, client accuracy, bytes in units), not the
    other logs, which stay in History."""
    clients, test = tiny
    recorder = _StepRecorder()
    trainer = nd.DecentralizedTrainer(nd.models.mlp, algorithm, nd.topology.RandomGraph(2), seed=0)
    history = trainer.fit(clients, rounds=2, validation_data=test, callbacks=[recorder],
                          verbose=2)
    assert recorder.steps == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Round 1/2", "Round 2/2"]
    for line in lines:
        assert "accuracy: " in line and "client_accuracy: " in line and "loss: " in line
        assert " MB" in line or " GB" in line
        assert "client_weight_spread" not in line and "bytes_sent" not in line
    assert "client_weight_spread" in history.history
    assert ("tau: " in lines[0]) == isinstance(algorithm, nd.algorithms.NTKDFL)


def test_progress_bar_moves_within_the_round(tiny, capsys):
    """verbose=1: a header per round, the bar at each group, then the finished bar and line."""
    clients, test = tiny
    trainer = nd.DecentralizedTrainer(
        nd.models.mlp, nd.algorithms.NTKDFL(taus=(10,), client_batch=4),
        nd.topology.RandomGraph(2), seed=0)
    trainer.fit(clients, rounds=1, validation_data=test, verbose=1)
    out = capsys.readouterr().out
    assert out.startswith("Round 1/1\n")
    assert "1/2" in out  # the bar after the first of two groups
    assert "2/2 " + "━" * 20 in out and "client_accuracy: " in out


@pytest.mark.parametrize("n, text", [(512, "512 B"), (1.4e9, "1.4 GB"), (94252456620, "94.3 GB"),
                                     (2.5e13, "25.0 TB")])
def test_human_bytes(n, text):
    assert nd.callbacks.round_progress.human_bytes(n) == text
