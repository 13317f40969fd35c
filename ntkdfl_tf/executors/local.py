"""LocalExecutor: the calls in this process, one or several at a time (batched inside a call)."""

import concurrent.futures
import os


class LocalExecutor:
    """Runs the algorithm's calls on one worker in this process.

    Args:
        parallel_calls: calls in flight at once, each on its own thread (0: one per CPU
            core). An XLA-compiled call runs on one core, so on a machine with idle cores
            several at once shorten the round; memory grows with each call in flight. Results
            are the same whatever the number: calls are independent and returned in order.
    """

    name = "local"
    remote = False

    def __init__(self, parallel_calls=1):
        if isinstance(parallel_calls, bool) or not isinstance(parallel_calls, int) or \
                parallel_calls < 0:
            raise ValueError(f"parallel_calls must be a non-negative integer (0: one per CPU "
                             f"core), got {parallel_calls!r}.")
        self.parallel_calls = parallel_calls or os.cpu_count() or 1
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
        """``[worker.run(context, call) for call in calls]``; ``progress(done)`` after each,
        in order."""
        def run(call):
            return self._worker.run(context, call)

        calls, results = list(calls), []
        threads = min(self.parallel_calls, len(calls))
        if threads <= 1:
            outcomes = map(run, calls)
        else:  # a tf.function traces once under concurrent first calls (its own lock)
            pool = concurrent.futures.ThreadPoolExecutor(threads)
            outcomes = pool.map(run, calls)
        try:
            for result in outcomes:
                results.append(result)
                if progress is not None:
                    progress(len(results))
        finally:
            if threads > 1:
                pool.shutdown(cancel_futures=True)
        return results

    def round_stats(self):
        """Per-round figures for the logs: none here."""
        return {}

    def tracing_counts(self):
        """The worker's ``tf.function`` trace counts (see ``Worker.tracing_counts``)."""
        return {} if self._worker is None else self._worker.tracing_counts()
