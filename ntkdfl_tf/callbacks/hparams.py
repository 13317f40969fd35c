"""HParams: the run's configuration in TensorBoard's HParams tab."""

import json

import keras
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp


def scalar_hparams(config):
    """``config`` with values TensorBoard accepts: numbers, strings and bools kept, others
    (lists, dicts, None) as JSON text."""
    return {str(k): v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in config.items()}


class HParams(keras.callbacks.Callback):
    """Writes the run's configuration as TensorBoard hparams when training begins.

    TensorBoard's HParams tab then lists each run of a sweep (each logdir under the one
    TensorBoard is pointed at) with its settings beside the scalars Keras' ``TensorBoard``
    callback writes to the same ``log_dir`` (e.g. ``validation/epoch_accuracy``).

    Args:
        log_dir: the run's TensorBoard folder (the same as ``keras.callbacks.TensorBoard``'s).
        hparams: ``{name: value}``; None for ``trainer.configuration()``.
        trial_id: the run's name in the tab (default: ``log_dir``).
    """

    def __init__(self, log_dir, hparams=None, trial_id=None):
        super().__init__()
        self.log_dir, self.hparams, self.trial_id = log_dir, hparams, trial_id
        self._trainer = None

    def set_trainer(self, trainer):
        self._trainer = trainer

    def on_train_begin(self, logs=None):
        config = self.hparams
        if config is None:
            if self._trainer is None:
                raise RuntimeError("HParams(hparams=None) reads the configuration of a "
                                   "DecentralizedTrainer; pass hparams= with other models.")
            config = self._trainer.configuration()
        writer = tf.summary.create_file_writer(self.log_dir)
        with writer.as_default():
            hp.hparams(scalar_hparams(config), trial_id=self.trial_id or self.log_dir)
        writer.close()
