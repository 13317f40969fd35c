"""RoundCheckpoint: save the whole trainer state after every round; resume from it."""

import os

import keras

from ntkdfl_tf import checkpoint


class RoundCheckpoint(keras.callbacks.Callback):
    """Writes ``<directory>/checkpoint.npz`` after each round and resumes from it at ``fit``.

    Unlike ``keras.callbacks.BackupAndRestore`` (which restores one model: here the aggregate),
    this restores every client's weights and the algorithm's state, so a run killed at any
    point and resumed gives the same history and final model as an uninterrupted run. Each
    save keeps the checkpoint it replaces as ``checkpoint.prev.npz``; when ``checkpoint.npz``
    is damaged, the run resumes from that previous one, with a warning (see
    ``ntkdfl_tf.checkpoint``). Place it after callbacks that write per-round files
    (``HistoryCSV``), so that a round is checkpointed only once its row is on disk.

    Args:
        directory: folder of the checkpoint (a run's logdir).
        resume: restore from an existing checkpoint at the start of ``fit``.
        verbose: say when a run resumes.

    Attributes:
        path: the newest checkpoint, ``<directory>/checkpoint.npz``.
        restored_round: the round restored at the start of the last ``fit``, else None.
    """

    def __init__(self, directory, resume=True, verbose=1):
        super().__init__()
        self.verbose = verbose
        self.directory = directory
        self.path = os.path.join(directory, checkpoint.NAME)
        self.resume = resume
        self.restored_round = None
        self._trainer = None
        self._newest_is_ours = False

    def set_trainer(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, logs=None):
        if self._trainer is None:
            raise RuntimeError("RoundCheckpoint works with DecentralizedTrainer.fit only.")
        self.restored_round = None
        # Rotate checkpoint.npz into checkpoint.prev.npz only when it is a good checkpoint of
        # this run: not when damaged (the good previous one must stay), nor from another run.
        self._newest_is_ours = False
        found = checkpoint.load_latest(self.directory) if self.resume else None
        if found is None:
            return
        path, state = found
        self._trainer.set_state(state, source=path)
        self.restored_round = state["round"]
        self._newest_is_ours = path == self.path
        if self.verbose:
            print(f"Resumed from {path} after round {state['round']}.", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        if not self._newest_is_ours and self.restored_round is None:
            _remove(checkpoint.previous_path(self.path))  # another run's: never fall back to it
        checkpoint.save(self.path, self._trainer.get_state(), keep_previous=self._newest_is_ours)
        self._newest_is_ours = True


def _remove(path):
    if os.path.exists(path):
        os.remove(path)
