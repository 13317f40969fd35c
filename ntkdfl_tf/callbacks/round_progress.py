"""RoundProgress: Keras' progress bar with client groups as steps and a short line per round."""

import time

import keras

BAR_WIDTH = 20
# (log key, label, format) of the round's line; every other log goes to History, CSV and
# TensorBoard only
SUMMARY = (("val_accuracy", "accuracy", "{:.4f}"), ("val_loss", "loss", "{:.4f}"),
           ("val_client_mean_accuracy", "client_accuracy", "{:.4f}"), ("tau", "tau", "{:.0f}"),
           ("round_seconds", "round", "{:.1f}s"))


def human_bytes(n):
    """``94252456620`` -> ``"94.3 GB"`` (decimal units, as the README's byte counts)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def summary(logs):
    """The round's short line: aggregated accuracy and loss, mean-client accuracy, tau,
    round seconds and bytes sent (those present); the training loss without validation."""
    logs = logs or {}
    shown = SUMMARY if "val_loss" in logs else SUMMARY + (("loss", "train_loss", "{:.4f}"),)
    parts = [f"{label}: {fmt.format(logs[key])}" for key, label, fmt in shown if key in logs]
    if "bytes_sent" in logs:
        parts.append(f"sent: {human_bytes(logs['bytes_sent'])}")
    return " - ".join(parts)


class RoundProgress(keras.callbacks.ProgbarLogger):
    """The progress display of ``DecentralizedTrainer.fit`` (added for ``verbose`` 1 or 2).

    A round is a Keras epoch and each client group of the algorithm (``client_batch``
    clients, one ``executor.map`` call) a step, so with ``verbose=1`` the bar advances within
    the round; when the round ends its line shows a short set (``summary``). ``verbose=2``
    prints that line only, one per round. A stock ``keras.callbacks.ProgbarLogger`` passed to
    ``fit`` replaces this one and shows every log.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._reset_progbar()
        self._maybe_init_progbar()
        self._start = time.perf_counter()
        if self.verbose == 1:
            print(f"Round {epoch + 1}/{self.epochs}", flush=True)

    def _update_progbar(self, batch, logs=None):
        super()._update_progbar(batch, None)  # steps only: the round's logs come at its end

    def on_epoch_end(self, epoch, logs=None):
        seconds = f"{time.perf_counter() - self._start:.0f}s"
        if self.verbose == 1:  # the finished bar and the line replace the moving bar
            head = f"\r{self.target}/{self.target} {'━' * BAR_WIDTH} {seconds}"
            print(f"{head} - {summary(logs)}\x1b[K", flush=True)
        elif self.verbose == 2:
            print(f"Round {epoch + 1}/{self.epochs} - {seconds} - {summary(logs)}", flush=True)

