"""FinalAggregation: saves the aggregated (client-averaged) model when training ends."""

import os

import keras
import numpy as np

from ntkdfl_tf import selection as selection_lib
from ntkdfl_tf.io import atomic_path


class FinalAggregation(keras.callbacks.Callback):
    """Saves the average of the client models as ``<directory>/<name>.keras`` after ``fit``.

    With ``selection="all"`` (the default) the saved model is ``trainer.aggregate()``: the
    uniform average of every present client, or, under ``Defence(final="robust")``, of the
    clients the robust rule kept. With ``selection="greedy_validation"`` it is the
    paper's greedy choice (``ntkdfl_tf.selection.greedy_validation``): clients sorted by
    accuracy on ``validation_data`` and the best-first prefix whose average validates best.
    Either way, clients that left the run are never averaged. After ``fit``, the attributes
    ``selected_clients`` (client indices averaged) and ``validation_accuracy`` (the saved
    model's accuracy on ``validation_data``, None without it) record the choice.

    The write is atomic (``ntkdfl_tf.io.atomic_path``: a temporary file in the same folder,
    fsync, then a rename), so an interrupted run never leaves a truncated model behind.

    Args:
        directory: folder for the model; created if missing.
        name: file name without extension.
        selection: ``"all"`` or ``"greedy_validation"``.
        validation_data: ``(x, y)`` held-out data, required by ``"greedy_validation"``; keep
            it apart from the data the saved model is tested on.

    Raises:
        ValueError: unknown ``selection``, or ``"greedy_validation"`` without non-empty
            ``validation_data``.
    """

    def __init__(self, directory="saved_models", name="aggregated", selection="all",
                 validation_data=None):
        super().__init__()
        if selection not in selection_lib.SELECTIONS:
            raise ValueError(f"Unknown selection {selection!r}; choose one of "
                             f"{', '.join(map(repr, selection_lib.SELECTIONS))}.")
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be an (x, y) pair, got "
                                 f"{type(validation_data).__name__}.")
            x, y = validation_data
            if len(x) == 0 or len(x) != len(y):
                raise ValueError(f"validation_data needs matching, non-empty x and y; got "
                                 f"{len(x)} and {len(y)} samples.")
        elif selection == "greedy_validation":
            raise ValueError("selection='greedy_validation' needs validation_data=(x_val, y_val) "
                             "to rank the clients on held-out data, e.g. from "
                             "ntkdfl_tf.selection.split_validation(x_test, y_test).")
        self.directory, self.name = directory, name
        self.selection, self.validation_data = selection, validation_data
        self.path = os.path.join(directory, f"{name}.keras")
        self.selected_clients = None
        self.validation_accuracy = None
        self._trainer = None

    def set_trainer(self, trainer):
        self._trainer = trainer

    def _choose(self):
        """The model to save; sets ``selected_clients`` and ``validation_accuracy``."""
        trainer = self._trainer
        if self.selection == "greedy_validation":
            chosen = selection_lib.greedy_validation(trainer, *self.validation_data)
            self.selected_clients = chosen.clients
            self.validation_accuracy = chosen.validation_accuracy
            return selection_lib.averaged_model(trainer, chosen.clients)
        model = trainer.aggregate()  # with a robust final rule: the clients it kept
        robust = trainer.defence is not None and trainer.defence.final == "robust"
        self.selected_clients = (trainer.last_kept if robust else
                                 np.flatnonzero(trainer.present_clients()))
        if self.validation_data is not None:
            weights = [w[None] for w in trainer.aggregated_weights()]
            self.validation_accuracy = float(
                selection_lib.model_accuracies(trainer, weights, *self.validation_data)[0])
        return model

    def on_train_end(self, logs=None):
        if self._trainer is None or self._trainer.client_weights is None:
            return
        model = self._choose()
        with atomic_path(self.path, suffix=".keras") as tmp:  # Keras checks the ending
            model.save(tmp)
