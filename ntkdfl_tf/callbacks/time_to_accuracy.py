"""TimeToAccuracy: stop once the aggregated model reaches a target accuracy, and say when."""

import time

import keras


class TimeToAccuracy(keras.callbacks.Callback):
    """Evaluates only the aggregated model each round; stops training at ``target``.

    Adds to each round's logs ``val_accuracy`` (aggregate), ``train_seconds`` (cumulative
    training time, the sum of ``round_seconds``) and ``wall_seconds`` (since training began,
    evaluation included). Evaluating every client instead (``fit(validation_data=...)``) costs K
    test-set passes per round: at 300 clients more than the DFedAvg round itself.

    Args:
        x, y: test inputs (raw images) and class ids.
        target: accuracy at which to stop; None never stops.
        budget_seconds: also stop once this much wall time has passed (None: no limit).

    Attributes:
        reached_round: first round (0-based) at or above target, or None.
        reached_train_seconds, reached_wall_seconds: the cumulative times at that round.
    """

    def __init__(self, x, y, target=0.85, budget_seconds=None):
        super().__init__()
        self.x, self.y, self.target, self.budget_seconds = x, y, target, budget_seconds
        self._trainer = None
        self.reached_round = self.reached_train_seconds = self.reached_wall_seconds = None

    def set_trainer(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, logs=None):
        if self._trainer is None:
            raise RuntimeError("TimeToAccuracy works with DecentralizedTrainer.fit only.")
        self._features = self._trainer.fns.features(self.x)
        self._start, self._train_seconds = time.perf_counter(), 0.0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self._train_seconds += logs.get("round_seconds", 0.0)
        logs.update(self._trainer.evaluate(self._features, self.y, features_ready=True,
                                           clients=False))
        logs["train_seconds"] = self._train_seconds
        logs["wall_seconds"] = time.perf_counter() - self._start
        if self.target is not None and self.reached_round is None and \
                logs["val_accuracy"] >= self.target:
            self.reached_round = epoch
            self.reached_train_seconds = self._train_seconds
            self.reached_wall_seconds = logs["wall_seconds"]
            self.model.stop_training = True
        if self.budget_seconds is not None and logs["wall_seconds"] >= self.budget_seconds:
            self.model.stop_training = True
