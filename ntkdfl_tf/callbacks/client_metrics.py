"""ClientMetrics: per-client test accuracies to TensorBoard, as a histogram per round."""

import os

import keras
import tensorflow as tf


class ClientMetrics(keras.callbacks.Callback):
    """Writes the distribution of client test accuracies each round they are evaluated in
    (needs validation_data; ``fit``'s ``client_metrics_every``).

    Args:
        log_dir: TensorBoard folder; events go to ``<log_dir>/clients``.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = os.path.join(log_dir, "clients")
        self._trainer = None
        self._writer = None

    def set_trainer(self, trainer):
        self._trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        accuracy = None if self._trainer is None else self._trainer.last_client_accuracy
        if accuracy is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.histogram("client_accuracy", accuracy, step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
