"""HistoryCSV: one row per round in a CSV file, rewritten atomically after every round."""

import csv
import os

import keras

from ntkdfl_tf.io import atomic_open


def read_history(path):
    """A ``HistoryCSV`` file as ``{log key: [value per round]}`` (what ``History`` holds; a key
    logged only in some rounds, such as the per-client metrics with ``client_metrics_every``,
    lists the rounds it has)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r.get(k, "") != ""]
            for k in (rows[0] if rows else {}) if k != "round"}


class HistoryCSV(keras.callbacks.Callback):
    """Keeps ``path`` equal to the history so far (columns ``round`` then the sorted log keys).

    Unlike ``keras.callbacks.CSVLogger`` the file is replaced whole (``ntkdfl_tf.io``: temporary
    file, fsync, rename) after each round, so a killed run leaves a complete file, and the first
    column is ``round``. Rows already in the file from an earlier run are kept up to the round
    the run resumes from, and dropped past it (when the first round of ``fit`` begins, or at its
    end if it runs none), so the file always matches the checkpoint a run resumed from, even an
    older one than the file's last row.

    Args:
        path: the CSV file.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.rows = []
        self._trainer = None
        self._ran = False

    def set_trainer(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, logs=None):
        self.rows, self._ran = [], False
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def on_epoch_begin(self, epoch, logs=None):
        if not self._ran:  # the first round of this fit: rows past `epoch` are of a lost future
            self._ran = True
            self._keep_rounds_up_to(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.rows = [r for r in self.rows if int(r["round"]) <= epoch]
        self.rows.append({"round": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        self._write()

    def on_train_end(self, logs=None):
        # A fit that ran no round (resumed at or past `rounds`): the trainer knows where it is.
        # Round 0 would mean "no state", which says nothing about the file: leave it.
        if not self._ran and self._trainer is not None and self._trainer.round > 0:
            self._keep_rounds_up_to(self._trainer.round)

    def _keep_rounds_up_to(self, last):
        kept = [r for r in self.rows if int(r["round"]) <= last]
        if len(kept) < len(self.rows):
            self.rows = kept
            self._write()

    def _write(self):
        keys = sorted({k for r in self.rows for k in r if k != "round"})
        with atomic_open(self.path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=["round"] + keys, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
