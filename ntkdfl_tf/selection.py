"""Choosing which client models go into the final aggregate.

The paper's later version holds out a validation split (the test set split 50:50 into
validation and test), sorts the client models by validation accuracy and averages them greedily
from the best down, keeping the prefix whose average scores best on validation. This module
offers that selection and the curves that judge it: test accuracy of the average of the first
k models against k, for the best-first, random and worst-first orders.

Prefix averages come from cumulative sums over the client axis, and every averaged model is
evaluated through the trainer's client-batched evaluation (``trainer.evaluate_models``). Clients
that left the run (``Faults(leave=...)``) are never selected, ordered or averaged.
"""

import csv
import dataclasses
import typing

import numpy as np

from ntkdfl_tf.io import atomic_open, save_figure

SELECTIONS = ("all", "greedy_validation")
ORDERS = ("best_first", "random", "worst_first")


class Selection(typing.NamedTuple):
    """The greedy choice: which clients, how many, and their average's validation accuracy."""

    clients: np.ndarray
    count: int
    validation_accuracy: float


# -- input checks ------------------------------------------------------------------------------
def _check_trainer(trainer):
    if getattr(trainer, "client_weights", None) is None:
        raise RuntimeError("No client models yet: call trainer.fit() first.")


def _prepare(trainer, x, y, what):
    """Checks ``(x, y)`` and maps ``x`` through ``fns.features``; returns ``(feats, y)``."""
    _check_trainer(trainer)
    return trainer.prepare_examples(x, y, what)


def _check_clients(trainer, clients, what="order"):
    """``clients`` as int indices: non-empty, 1-D, in range, distinct, none departed."""
    _check_trainer(trainer)
    k = int(trainer.client_weights[0].shape[0])
    arr = np.asarray(clients)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"The {what} must be a non-empty 1-D sequence of client indices, got "
                         f"{clients!r}.")
    if arr.min() < 0 or arr.max() >= k:
        raise ValueError(f"The {what} names client(s) outside 0..{k - 1}: "
                         f"{arr[(arr < 0) | (arr >= k)].tolist()}.")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"The {what} names a client more than once: {arr.tolist()}.")
    gone = arr[~trainer.present_clients()[arr]]
    if gone.size:
        raise ValueError(f"The {what} names client(s) {gone.tolist()} that have left the run; "
                         "departed clients are never averaged.")
    return arr.astype(np.int64)


# -- evaluation --------------------------------------------------------------------------------
def _accuracies(trainer, weights, feats, y):
    """Accuracy of each of B models (weights stacked ``[B, *shape]``) on prepared data."""
    return trainer.evaluate_models(weights, feats, y)[0]


def model_accuracies(trainer, weights, x, y):
    """Test accuracy of several models of the trainer's architecture, evaluated together.

    Args:
        trainer: a ``DecentralizedTrainer`` (its architecture and ``fns.forward`` are used).
        weights: list aligned with ``model.trainable_variables``, each ``[B, *shape]``.
        x, y: raw inputs and integer class ids.

    Returns:
        float64 array ``[B]`` of accuracies.
    """
    feats, y = _prepare(trainer, x, y, "evaluation")
    return _accuracies(trainer, [np.asarray(w, np.float32) for w in weights], feats, y)


def client_accuracies(trainer, x, y):
    """Accuracy of every client model on ``(x, y)``.

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        x, y: raw inputs and integer class ids.

    Returns:
        float64 array ``[K]`` over all clients (departed ones included, so that it is indexed
        by client; ``order_by`` and ``greedy_validation`` skip them).
    """
    feats, y = _prepare(trainer, x, y, "evaluation")
    return _accuracies(trainer, [w.numpy() for w in trainer.client_weights], feats, y)


def _prefix_curve(trainer, order, feats, y):
    """Accuracy of the average of the first k clients of ``order``, k = 1..len(order).

    Prefix averages are running sums over the client axis divided by k, accumulated in float64
    so that the float32 result agrees with a direct mean; they are built one group of
    ``trainer.eval_batch`` prefixes at a time, so beyond the client weights memory holds one
    group of averaged models.
    """
    group = max(1, min(trainer.eval_batch, len(order)))
    weights = [w.numpy() for w in trainer.client_weights]
    carry = [0.0] * len(weights)  # running sum of the clients before this group
    curve = []
    for start in range(0, len(order), group):
        idx = order[start:start + group]
        sums = [np.cumsum(w[idx].astype(np.float64), axis=0) + c
                for w, c in zip(weights, carry)]
        carry = [s[-1] for s in sums]
        counts = np.arange(start + 1, start + len(idx) + 1, dtype=np.float64)
        means = [(s / counts.reshape((-1,) + (1,) * (s.ndim - 1))).astype(np.float32)
                 for s in sums]
        curve.append(_accuracies(trainer, means, feats, y))
    return np.concatenate(curve)


def prefix_accuracies(trainer, order, x, y):
    """Accuracy of the average of the first k clients of ``order``, for k = 1..len(order).

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        order: distinct indices of present clients, e.g. from ``order_by``.
        x, y: raw inputs and integer class ids to evaluate on.

    Returns:
        float64 array ``[len(order)]``: entry k-1 is the accuracy of the uniform average of
        clients ``order[:k]``.

    Raises:
        ValueError: empty data, or an order that is empty, repeats a client, is out of range or
            names a client that has left.
    """
    order = _check_clients(trainer, order)
    feats, y = _prepare(trainer, x, y, "evaluation")
    return _prefix_curve(trainer, order, feats, y)


def averaged_weights(trainer, clients):
    """The uniform average of the chosen clients' weights.

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        clients: distinct indices of present clients.

    Returns:
        List of float32 NumPy arrays aligned with ``model.trainable_variables``.
    """
    clients = _check_clients(trainer, clients, "client selection")
    return [w.numpy()[clients].astype(np.float64).mean(axis=0).astype(np.float32)
            for w in trainer.client_weights]


def averaged_model(trainer, clients):
    """Like ``trainer.aggregate()``, but averaging only ``clients``.

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        clients: distinct indices of present clients.

    Returns:
        A new compiled ``keras.Model`` holding ``averaged_weights(trainer, clients)``.
    """
    weights = averaged_weights(trainer, clients)
    model = trainer.aggregate()
    for v, w in zip(model.trainable_variables, weights):
        v.assign(w)
    return model


# -- ordering and selection --------------------------------------------------------------------
def split_validation(x, y, fraction=0.5, seed=0):
    """Splits a test set at random into validation and test parts, deterministically.

    Args:
        x, y: the test inputs and labels.
        fraction: share of the samples that go to validation (the paper: 0.5).
        seed: seed of the permutation; the same seed gives the same split.

    Returns:
        ``((x_val, y_val), (x_test, y_test))``: disjoint, together all samples.

    Raises:
        ValueError: mismatched lengths, or a fraction that leaves either part empty.
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"x and y have different lengths ({n} and {len(y)}).")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction!r}.")
    n_val = int(round(fraction * n))
    if n_val == 0 or n_val == n:
        raise ValueError(f"fraction={fraction} of {n} samples leaves the validation or the test "
                         "part empty; use more samples or another fraction.")
    perm = np.random.default_rng(seed).permutation(n)
    val, test = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    x, y = np.asarray(x), np.asarray(y)
    return (x[val], y[val]), (x[test], y[test])


def order_by(trainer, kind, x_val, y_val, seed=0, accuracies=None):
    """The present clients in the order in which they are averaged.

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        kind: ``"best_first"`` (descending validation accuracy, ties by client index),
            ``"worst_first"`` (exactly the reverse) or ``"random"`` (a permutation drawn
            from ``seed``).
        x_val, y_val: validation inputs and labels (unused for ``"random"``).
        seed: seed of the random order.
        accuracies: per-client validation accuracies ``[K]`` already computed (e.g. by
            ``client_accuracies``), to skip evaluating every client again.

    Returns:
        int64 array of the present clients' indices, in order.

    Raises:
        ValueError: unknown ``kind``, or empty validation data.
    """
    if kind not in ORDERS:
        raise ValueError(f"Unknown order {kind!r}; choose one of {', '.join(ORDERS)}.")
    _check_trainer(trainer)
    present = np.flatnonzero(trainer.present_clients())
    if kind == "random":
        return np.random.default_rng(seed).permutation(present).astype(np.int64)
    if accuracies is None:
        accuracies = client_accuracies(trainer, x_val, y_val)
    best = present[np.argsort(-np.asarray(accuracies)[present], kind="stable")].astype(np.int64)
    return best if kind == "best_first" else best[::-1].copy()


def _best_prefix(curve):
    """Length of the best prefix; ties go to the longer one (closer to the uniform average)."""
    return len(curve) - int(np.argmax(np.asarray(curve)[::-1]))


def greedy_validation(trainer, x_val, y_val, accuracies=None):
    """The paper's greedy selection: the best-first prefix whose average validates best.

    Clients are sorted by validation accuracy (best first) and averaged greedily; the prefix
    length k whose average has the highest validation accuracy is kept (among equal scores the
    longest such prefix).

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        x_val, y_val: validation inputs and labels (never the data the result is tested on).
        accuracies: per-client validation accuracies ``[K]`` already computed, if any.

    Returns:
        ``Selection(clients, count, validation_accuracy)``: the chosen client indices (best
        first), how many, and the validation accuracy of their average.

    Raises:
        ValueError: empty or malformed validation data.
    """
    feats, y = _prepare(trainer, x_val, y_val, "validation")
    if accuracies is None:
        accuracies = _accuracies(trainer, [w.numpy() for w in trainer.client_weights], feats, y)
    order = order_by(trainer, "best_first", None, None, accuracies=accuracies)
    curve = _prefix_curve(trainer, order, feats, y)
    count = _best_prefix(curve)
    return Selection(order[:count], count, float(curve[count - 1]))


# -- the comparison the launcher reports -------------------------------------------------------
@dataclasses.dataclass
class SelectionReport:
    """Test accuracy against the number of models averaged, per order, and the greedy choice.

    Attributes:
        test_curves: ``{order: float array [K']}``, entry k-1 the test accuracy of the average
            of the first k clients of that order (K' present clients).
        validation_curve: the best-first prefix accuracies on validation (what greedy maximises).
        orders: ``{order: client indices}``.
        selection: the greedy ``Selection``.
        selected_test_accuracy: test accuracy of the greedy choice's average.
        uniform_test_accuracy: test accuracy of the uniform average of all present clients.
        uniform_validation_accuracy: its validation accuracy.
        validation_samples, test_samples: sizes of the two parts.
    """

    test_curves: dict
    validation_curve: np.ndarray
    orders: dict
    selection: Selection
    selected_test_accuracy: float
    uniform_test_accuracy: float
    uniform_validation_accuracy: float
    validation_samples: int
    test_samples: int

    @property
    def gain(self):
        """Test accuracy of the greedy selection minus that of the uniform average."""
        return self.selected_test_accuracy - self.uniform_test_accuracy

    def summary(self):
        """A JSON-serialisable dict of the headline numbers."""
        best_k = int(np.argmax(self.test_curves["best_first"])) + 1
        return {
            "present_clients": len(self.validation_curve),
            "validation_samples": self.validation_samples, "test_samples": self.test_samples,
            "uniform_test_accuracy": round(self.uniform_test_accuracy, 4),
            "uniform_validation_accuracy": round(self.uniform_validation_accuracy, 4),
            "selected_count": self.selection.count,
            "selected_clients": [int(c) for c in self.selection.clients],
            "selected_validation_accuracy": round(self.selection.validation_accuracy, 4),
            "selected_test_accuracy": round(self.selected_test_accuracy, 4),
            "selection_gain": round(self.gain, 4),
            "selection_beats_uniform": bool(self.gain > 0),
            "best_first_test_peak": {"count": best_k, "accuracy": round(
                float(self.test_curves["best_first"][best_k - 1]), 4)},
            "single_best_test_accuracy": round(float(self.test_curves["best_first"][0]), 4),
        }


def compare_orders(trainer, x_val, y_val, x_test, y_test, seed=0):
    """Greedy selection on validation, judged on test against the uniform average and orders.

    Args:
        trainer: a ``DecentralizedTrainer`` after ``fit``.
        x_val, y_val: validation data (orders and the greedy choice use only this).
        x_test, y_test: held-out test data (only reported).
        seed: seed of the random order.

    Returns:
        A ``SelectionReport``.
    """
    val_feats, val_y = _prepare(trainer, x_val, y_val, "validation")
    test_feats, test_y = _prepare(trainer, x_test, y_test, "test")
    acc = _accuracies(trainer, [w.numpy() for w in trainer.client_weights], val_feats, val_y)
    orders = {kind: order_by(trainer, kind, None, None, seed=seed, accuracies=acc)
              for kind in ORDERS}
    val_curve = _prefix_curve(trainer, orders["best_first"], val_feats, val_y)
    count = _best_prefix(val_curve)
    selection = Selection(orders["best_first"][:count], count, float(val_curve[count - 1]))
    curves = {kind: _prefix_curve(trainer, order, test_feats, test_y)
              for kind, order in orders.items()}
    # every order's full prefix holds all present clients: the uniform average (= aggregate)
    return SelectionReport(
        test_curves=curves, validation_curve=val_curve, orders=orders, selection=selection,
        selected_test_accuracy=float(curves["best_first"][count - 1]),
        uniform_test_accuracy=float(curves["best_first"][-1]),
        uniform_validation_accuracy=float(val_curve[-1]),
        validation_samples=len(val_y), test_samples=len(test_y))


def write_csv(path, report):
    """Writes one row per number of models averaged (atomically).

    Columns: ``num_models``, the test accuracy of each order, ``best_first_validation`` and
    ``greedy_selected`` (1 on the row of the greedy choice).

    Args:
        path: the .csv to write.
        report: a ``SelectionReport``.

    Returns:
        ``path``.
    """

    with atomic_open(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["num_models", *ORDERS, "best_first_validation", "greedy_selected"])
        for k in range(len(report.validation_curve)):
            writer.writerow([k + 1, *(f"{report.test_curves[o][k]:.6f}" for o in ORDERS),
                             f"{report.validation_curve[k]:.6f}",
                             int(k + 1 == report.selection.count)])
    return path


def plot(path, report):
    """Draws test accuracy against the number of models averaged, one line per order.

    Args:
        path: the .png to write.
        report: a ``SelectionReport``.

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'ntkdfl_tf[plot]'): no figure.")
        return None
    k = np.arange(1, len(report.validation_curve) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in zip(ORDERS, ("-", "--", ":")):
        ax.plot(k, report.test_curves[kind], style, marker="o", markersize=2,
                label=kind.replace("_", "-"))
    ax.plot(k, report.validation_curve, "-", color="0.6", linewidth=1,
            label="best-first, validation")
    ax.axhline(report.uniform_test_accuracy, color="k", linewidth=0.8,
               label=f"uniform average ({report.uniform_test_accuracy:.3f})")
    ax.plot([report.selection.count], [report.selected_test_accuracy], "r*", markersize=12,
            label=f"greedy choice: {report.selection.count} models "
                  f"({report.selected_test_accuracy:.3f})")
    ax.set_xlabel("number of client models averaged")
    ax.set_ylabel("test accuracy of the average")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
