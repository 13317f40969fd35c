"""Project callbacks (stock ``keras.callbacks`` work with the trainer too)."""

from ntkdfl_tf.callbacks.client_metrics import ClientMetrics
from ntkdfl_tf.callbacks.final_aggregation import FinalAggregation
from ntkdfl_tf.callbacks.hparams import HParams
from ntkdfl_tf.callbacks.history_csv import HistoryCSV, read_history
from ntkdfl_tf.callbacks.round_checkpoint import RoundCheckpoint
from ntkdfl_tf.callbacks.round_progress import RoundProgress
from ntkdfl_tf.callbacks.time_to_accuracy import TimeToAccuracy

__all__ = ["ClientMetrics", "FinalAggregation", "HParams", "HistoryCSV", "RoundCheckpoint", "RoundProgress",
           "TimeToAccuracy", "read_history"]
