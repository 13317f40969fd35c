"""RoundCheckpoint: save the whole trainer state after every round; resume from it."""

import os

import keras

from ntkdfl_tf import checkpoint


class RoundCheckpoint(keras.callbacks.Callback):
    """Writes ``<directory>/checkpoint.npz`` after each round and resumes from it at ``fit``.

    Unlike ``keras.callbacks.BackupAndRestore`` (which restores one model: here the aggregate),
    this restores every client's weights and the algorithm's state, so a run killed at any
    point and resumed gives the same history and final model as an uninterrupted run. Place it
    after callbacks that write per-round files (``HistoryCSV``), so that a round is
    checkpointed only once its row is on disk.

    Args:
        directory: folder of the checkpoint (a run's logdir).
        resume: restore from an existing checkpoint at the start of ``fit``.
        verbose: say when a run resumes.
    """

    def __init__(self, directory, resume=True, verbose=1):
        super().__init__()
        self.verbose = verbose
        self.path = os.path.join(directory, "checkpoint.npz")
        self.resume = resume
        self.restored_round = None
        self._trainer = None

    def set_trainer(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, logs=None):
        if self._trainer is None:
            raise RuntimeError("RoundCheckpoint works with DecentralizedTrainer.fit only.")
        if self.resume and os.path.exists(self.path):
            state = checkpoint.load(self.path)
            self._trainer.set_state(state, source=self.path)
            self.restored_round = state["round"]
            if self.verbose:
                print(f"Resumed from {self.path} after round {state['round']}.", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        checkpoint.save(self.path, self._trainer.get_state())
