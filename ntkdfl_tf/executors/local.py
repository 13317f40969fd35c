"""LocalExecutor: every call in this process, one after another (batched inside a call)."""


class LocalExecutor:
    """Runs the algorithm's calls on one worker in this process."""

    name = "local"
    remote = False

    def __init__(self):
        self._worker, self._built_for = None, None

    def start(self, algorithm, clients, fns, model_fn=None, data=None):
        """Called by ``fit`` once the client data is on the device.

        The worker (compiled functions, kernels) is kept across ``fit`` calls of the same
        algorithm and model, and given this fit's data.
        """
        del model_fn, data  # the worker uses the trainer's model functions and tensors
        if self._built_for is None or any(a is not b for a, b in zip(self._built_for,
                                                                     (algorithm, fns))):
            self._worker, self._built_for = algorithm.make_worker(fns), (algorithm, fns)
        self._worker.bind(clients)

    def map(self, context, calls, progress=None):
        """``[worker.run(context, call) for call in calls]``; ``progress(done)`` after each."""
        results = []
        for call in calls:
            results.append(self._worker.run(context, call))
            if progress is not None:
                progress(len(results))
        return results

    def round_stats(self):
        """Per-round figures for the logs: none here."""
        return {}

    def tracing_counts(self):
        """The worker's ``tf.function`` trace counts (see ``Worker.tracing_counts``)."""
        return {} if self._worker is None else self._worker.tracing_counts()
