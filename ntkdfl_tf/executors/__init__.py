"""Where per-client work runs: in this process (``local``) or on Ray actors (``ray``).

An executor runs an algorithm's typed calls (NumPy weights and indices in, a typed result of
NumPy arrays out) on workers (``Algorithm.make_worker``): one in this process, or one per Ray
actor. Each call names the clients whose data it reads (``call.reads``). Every executor runs
the same calls, so the results agree whatever runs them.

``start(algorithm, clients, fns, model_fn, data)`` gets the clients' tensors and the ClientData
they came from; when that names its dataset (``ClientData.with_source``), the Ray executor's
actors load their clients' samples from the dataset files instead of receiving them.
"""

from ntkdfl_tf.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")


def make_executor(executor):
    """``"local"``, ``"ray"`` or an executor object -> an executor object."""
    if executor == "local" or executor is None:
        return LocalExecutor()
    if executor == "ray":
        from ntkdfl_tf.executors.ray import RayExecutor  # ray is an optional extra
        return RayExecutor()
    if all(hasattr(executor, m) for m in ("start", "map", "round_stats", "tracing_counts")):
        return executor
    raise ValueError(f"Unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)} or "
                     "pass an executor object with start, map, round_stats and tracing_counts "
                     "(ntkdfl_tf.executors.RayExecutor(...)).")


def __getattr__(name):  # RayExecutor without importing ray unless asked for
    if name == "RayExecutor":
        from ntkdfl_tf.executors.ray import RayExecutor
        return RayExecutor
    raise AttributeError(name)


__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "make_executor"]
