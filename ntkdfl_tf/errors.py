"""The errors ntkdfl_tf raises on purpose.

Bad configuration or data raises ``ValueError`` (or ``TypeError`` for an argument of the wrong
kind) before any training, with a message naming the value and the fix. A run whose numbers
blow up raises ``DivergenceError`` in the round where it happens, before that round is
checkpointed, so the last good checkpoint stays intact.
"""


class DivergenceError(FloatingPointError):
    """NaN or inf appeared in the weights, kernel or loss of a round.

    Attributes:
        round: the 1-based round in which it happened.
        clients: indices of the affected clients.
    """

    def __init__(self, message, round=None, clients=()):
        super().__init__(message)
        self.round, self.clients = round, list(clients)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to a different run."""


DOCUMENTED_ERRORS = (ValueError, TypeError, DivergenceError)
