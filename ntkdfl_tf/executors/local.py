"""LocalExecutor: every group in this process, one after another (batched inside a group)."""


class LocalExecutor:
    """Runs the algorithm's per-group methods in this process."""

    name = "local"
    remote = False

    def __init__(self):
        self._algorithm = None

    def start(self, model_fn, algorithm, clients):
        """Called by ``fit`` once the client data is on the device."""
        del model_fn, clients  # the algorithm already holds them (Algorithm.init)
        self._algorithm = algorithm

    def map(self, method, calls, shared=()):
        """``[algorithm.method(*shared, *call) for call in calls]``."""
        fn = getattr(self._algorithm, method)
        return [fn(*shared, *call) for call in calls]

    def round_stats(self):
        """Per-round figures for the logs: none here."""
        return {}
