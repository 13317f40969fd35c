"""LocalExecutor: the calls in this process, one or several at a time (batched inside a call)."""

import concurrent.futures
import numbers
import os


def check_parallel_calls(value):
    """``value`` if it is a valid ``parallel_calls``, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"parallel_calls must be a non-negative integer (0: one per CPU core "
                         f"for XLA-compiled calls), got {value!r}.")
    return int(value)


def _cores():
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


class LocalExecutor:
    """Runs the algorithm's calls on one worker in this process.

    Args:
        parallel_calls: calls in flight at once, each on its own thread. 0 (auto): one per CPU
            core this process may use when the worker's calls are XLA-compiled
            (``Worker.jit_compile``: NTK-DFL with ``jit_compile``; such a call runs on one
            core), else 1 (the baselines' calls already spread over the cores). Memory grows
            with each call in flight. Results are the same whatever the number: calls are
            independent and returned in order.
    """

    name = "local"
    remote = False

    def __init__(self, parallel_calls=1):
        self.requested_calls = check_parallel_calls(parallel_calls)
        self.parallel_calls = self.requested_calls or 1  # auto is resolved by ``start``
        self._worker, self._built_for, self._pool = None, None, None  # pool: kept across rounds

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
        if self.requested_calls == 0:
            self.parallel_calls = _cores() if self._worker.jit_compile else 1

    def map(self, context, calls, progress=None):
        """``[worker.run(context, call) for call in calls]``; ``progress(done)`` after each,
        in order."""
        def run(call):
            return self._worker.run(context, call)

        calls, results, futures = list(calls), [], []
        if min(self.parallel_calls, len(calls)) <= 1:
            outcomes = map(run, calls)
        else:  # a tf.function traces once under concurrent first calls (its own lock)
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.parallel_calls)
            futures = [self._pool.submit(run, call) for call in calls]
            outcomes = (f.result() for f in futures)
        try:
            for result in outcomes:
                results.append(result)
                if progress is not None:
                    progress(len(results))
        except BaseException:  # an error or Ctrl-C: the calls not started yet never start
            for f in futures:
                f.cancel()
            raise
        return results

    def round_stats(self):
        """Per-round figures for the logs: none here."""
        return {}

    def tracing_counts(self):
        """The worker's ``tf.function`` trace counts (see ``Worker.tracing_counts``)."""
        return {} if self._worker is None else self._worker.tracing_counts()
