"""Model selection for the final aggregate (greedy on validation) against direct references."""

import keras
import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import selection

GONE = 2  # this client leaves before round 1: it must never be ordered, chosen or averaged


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """Two rounds of DFedAvg on 8 real-data clients (one departs), with both FinalAggregations."""
    clients, (x, y) = tiny
    val, test = selection.split_validation(x, y, seed=0)
    folder = str(tmp_path_factory.mktemp("models"))
    callbacks = {"all": nd.callbacks.FinalAggregation(folder, "all"),
                 "greedy": nd.callbacks.FinalAggregation(folder, "greedy",
                                                         selection="greedy_validation",
                                                         validation_data=val)}
    trainer = nd.DecentralizedTrainer(
        nd.models.mlp, nd.algorithms.get("dfedavg", local_epochs=1), nd.topology.RandomGraph(2),
        seed=0, faults=nd.Faults(leave={GONE: 1}))
    trainer.fit(clients, rounds=2, callbacks=list(callbacks.values()), verbose=0)
    return trainer, val, test, callbacks


# -- independent references: a plain Keras model holding explicitly averaged weights ----------
def _keras_accuracy(trainer, clients, x, y):
    stack = [w.numpy()[list(clients)].astype(np.float64) for w in trainer.client_weights]
    model = nd.models.mlp()
    model.set_weights([s.mean(axis=0).astype(np.float32) for s in stack])
    return float(np.mean(np.argmax(model(x, training=False).numpy(), -1) == y))


def _present(trainer):
    return [c for c in range(8) if c != GONE]


# -- split -------------------------------------------------------------------------------------
def test_split_is_half_disjoint_complete_and_deterministic():
    x, y = np.arange(101) * 10, np.arange(101)
    (xv, yv), (xt, yt) = selection.split_validation(x, y, seed=3)
    assert len(yv) == 50 and len(yt) == 51
    assert sorted(np.concatenate([yv, yt]).tolist()) == list(range(101))
    np.testing.assert_array_equal(xv, yv * 10)  # pairs stay together
    (xv2, _), _ = selection.split_validation(x, y, seed=3)
    np.testing.assert_array_equal(xv, xv2)
    (xv3, _), _ = selection.split_validation(x, y, seed=4)
    assert not np.array_equal(xv, xv3)


# -- prefix accuracies ---------------------------------------------------------------------------
def test_prefix_accuracies_equal_explicitly_averaged_keras_models(run):
    trainer, _, (x, y), _ = run
    order = np.array([5, 0, 7, 3, 1, 6, 4])
    curve = selection.prefix_accuracies(trainer, order, x, y)
    assert curve.shape == (7,)
    for k in (1, 2, 4, 7):
        # one test sample of slack: float32 logits of two code paths may split a near-tie
        assert abs(curve[k - 1] - _keras_accuracy(trainer, order[:k], x, y)) <= 1 / len(y) + 1e-12
    # the full prefix is the uniform average of all present clients: the trainer's aggregate
    assert curve[-1] == pytest.approx(trainer.evaluate(x, y, clients=False)["val_accuracy"],
                                      abs=1 / len(y) + 1e-12)


def test_client_accuracies_match_the_trainers_evaluation(run):
    trainer, _, (x, y), _ = run
    ours = selection.client_accuracies(trainer, x, y)
    trainer.evaluate(x, y)
    np.testing.assert_allclose(ours, trainer.last_client_accuracy, atol=1e-6)


# -- orders and the greedy choice --------------------------------------------------------------
def test_orders_follow_validation_accuracy_and_skip_the_departed(run):
    trainer, (xv, yv), _, _ = run
    acc = [_keras_accuracy(trainer, [c], xv, yv) for c in range(8)]
    best = selection.order_by(trainer, "best_first", xv, yv)
    assert sorted(best.tolist()) == _present(trainer)
    assert all(acc[a] >= acc[b] for a, b in zip(best, best[1:]))
    np.testing.assert_array_equal(selection.order_by(trainer, "worst_first", xv, yv), best[::-1])
    rand = selection.order_by(trainer, "random", xv, yv, seed=1)
    assert sorted(rand.tolist()) == _present(trainer)
    np.testing.assert_array_equal(rand, selection.order_by(trainer, "random", None, None, seed=1))


def test_greedy_keeps_the_best_validation_prefix_by_brute_force(run):
    trainer, (xv, yv), _, _ = run
    acc = {c: _keras_accuracy(trainer, [c], xv, yv) for c in _present(trainer)}
    order = sorted(acc, key=lambda c: (-acc[c], c))
    scores = [_keras_accuracy(trainer, order[:k], xv, yv) for k in range(1, len(order) + 1)]
    best_k = max(range(1, len(order) + 1), key=lambda k: (scores[k - 1], k))  # ties: longer
    chosen = selection.greedy_validation(trainer, xv, yv)
    assert chosen.count == best_k
    assert chosen.clients.tolist() == order[:best_k]
    assert chosen.validation_accuracy == pytest.approx(scores[best_k - 1], abs=1e-9)
    assert GONE not in chosen.clients


# -- FinalAggregation --------------------------------------------------------------------------
def test_final_aggregation_all_is_the_trainers_aggregate(run):
    trainer, _, _, callbacks = run
    cb = callbacks["all"]
    saved = keras.models.load_model(cb.path)
    for a, b in zip(saved.get_weights(), trainer.aggregate().get_weights()):
        np.testing.assert_array_equal(a, b)
    assert cb.selected_clients.tolist() == _present(trainer)
    assert cb.validation_accuracy is None


def test_final_aggregation_greedy_saves_the_chosen_average(run):
    trainer, (xv, yv), _, callbacks = run
    cb = callbacks["greedy"]
    chosen = selection.greedy_validation(trainer, xv, yv)
    assert cb.selected_clients.tolist() == chosen.clients.tolist()
    assert cb.validation_accuracy == chosen.validation_accuracy
    saved = keras.models.load_model(cb.path)
    expected = [w.numpy()[chosen.clients].astype(np.float64).mean(0).astype(np.float32)
                for w in trainer.client_weights]
    for a, b in zip(saved.get_weights(), expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert float(np.mean(np.argmax(saved(xv).numpy(), -1) == yv)) == pytest.approx(
        chosen.validation_accuracy, abs=1 / len(yv) + 1e-12)


def test_final_aggregation_all_reports_validation_accuracy_when_given_data(run):
    trainer, (xv, yv), _, _ = run
    cb = nd.callbacks.FinalAggregation(str(run[3]["all"].directory), "all_val",
                                       validation_data=(xv, yv))
    cb.set_trainer(trainer)
    cb.on_train_end()
    assert cb.validation_accuracy == pytest.approx(
        trainer.evaluate(xv, yv, clients=False)["val_accuracy"], abs=1 / len(yv) + 1e-12)


# -- the report ----------------------------------------------------------------------------------
def test_compare_orders_report_is_consistent_and_written(run, tmp_path):
    trainer, (xv, yv), (xt, yt), _ = run
    report = selection.compare_orders(trainer, xv, yv, xt, yt, seed=0)
    curves = report.test_curves
    assert set(curves) == set(selection.ORDERS)
    assert all(len(c) == 7 for c in curves.values())
    # every order ends in the same model, the uniform average of the present clients
    assert curves["best_first"][-1] == curves["random"][-1] == curves["worst_first"][-1]
    assert report.uniform_test_accuracy == curves["best_first"][-1]
    chosen = selection.greedy_validation(trainer, xv, yv)
    assert report.selection.clients.tolist() == chosen.clients.tolist()
    assert report.selected_test_accuracy == pytest.approx(
        _keras_accuracy(trainer, chosen.clients, xt, yt), abs=1 / len(yt) + 1e-12)
    summary = report.summary()
    assert summary["selection_beats_uniform"] == (report.gain > 0)
    csv_path = selection.write_csv(str(tmp_path / "s.csv"), report)
    lines = open(csv_path).read().splitlines()
    assert lines[0] == "num_models,best_first,random,worst_first,best_first_validation," \
                       "greedy_selected"
    assert len(lines) == 8 and sum(int(r.rsplit(",", 1)[1]) for r in lines[1:]) == 1
    assert selection.plot(str(tmp_path / "s.png"), report) and \
        (tmp_path / "s.png").stat().st_size > 1000


# -- errors ----------------------------------------------------------------------------------------
def test_clear_errors(run):
    trainer, (xv, yv), _, _ = run
    with pytest.raises(ValueError, match="Unknown selection 'best'.*'all', 'greedy_validation'"):
        nd.callbacks.FinalAggregation(selection="best")
    with pytest.raises(ValueError, match="greedy_validation.* needs validation_data"):
        nd.callbacks.FinalAggregation(selection="greedy_validation")
    with pytest.raises(ValueError, match="non-empty"):
        nd.callbacks.FinalAggregation(selection="greedy_validation",
                                      validation_data=(xv[:0], yv[:0]))
    with pytest.raises(ValueError, match="non-empty"):
        selection.greedy_validation(trainer, xv[:0], yv[:0])
    with pytest.raises(ValueError, match="Unknown order 'best'"):
        selection.order_by(trainer, "best", xv, yv)
    with pytest.raises(ValueError, match=rf"client\(s\) \[{GONE}\] that have left"):
        selection.prefix_accuracies(trainer, [0, GONE], xv, yv)
    with pytest.raises(ValueError, match="more than once"):
        selection.prefix_accuracies(trainer, [0, 0], xv, yv)
    with pytest.raises(ValueError, match="outside 0..7"):
        selection.prefix_accuracies(trainer, [8], xv, yv)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        selection.split_validation(xv, yv, fraction=1.0)
    with pytest.raises(RuntimeError, match="call trainer.fit"):
        selection.greedy_validation(
            nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.get("dfedavg"),
                                    nd.topology.Ring()), xv, yv)
