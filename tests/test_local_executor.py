"""The local executor with several calls in flight: really concurrent, same results, in order."""

import os
import threading
import time

import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import experiment
from ntkdfl_tf.executors import LocalExecutor


class _SlowWorker:
    """Records how many calls are in flight at once; each call returns its own number."""

    def __init__(self, jit_compile):
        self.jit_compile = jit_compile
        self.lock, self.running, self.most = threading.Lock(), 0, 0

    def bind(self, clients):
        del clients

    def run(self, context, call):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05 * (1 + call % 3))  # uneven: later calls may finish first
        with self.lock:
            self.running -= 1
        return context + call

    def tracing_counts(self):
        return {}


class _SlowAlgorithm:
    def __init__(self, jit_compile=False):
        self.worker = _SlowWorker(jit_compile)

    def make_worker(self, fns):
        del fns
        return self.worker


@pytest.mark.parametrize("parallel_calls, most", [(1, 1), (2, 2), (3, 3)])
def test_calls_run_concurrently_and_return_in_order(parallel_calls, most):
    executor, algorithm = LocalExecutor(parallel_calls=parallel_calls), _SlowAlgorithm()
    executor.start(algorithm, clients=None, fns=None)
    progress = []
    results = executor.map(100, list(range(8)), progress=progress.append)
    assert results == [100 + c for c in range(8)]
    assert progress == list(range(1, 9))
    assert algorithm.worker.most == most


ALGORITHMS = {
    # several calls per round: client groups of 2 (NTK-DFL with two Jacobian slices each), 3
    "ntk_dfl": lambda: nd.algorithms.NTKDFL(taus=(20, 50), client_batch=2, jacobian_batches=2),
    "dfedavg": lambda: nd.algorithms.get("dfedavg", local_epochs=1, client_batch=3),
    "dispfl": lambda: nd.algorithms.get("dispfl", client_batch=3),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_parallel_calls_give_the_sequential_results(tiny, name):
    runs = {}
    for parallel_calls in (1, 3):
        trainer = nd.DecentralizedTrainer(
            nd.models.mlp, ALGORITHMS[name](), nd.topology.RandomGraph(3), seed=0,
            executor=LocalExecutor(parallel_calls=parallel_calls))
        history = trainer.fit(tiny[0], rounds=2, validation_data=tiny[1], verbose=0).history
        runs[parallel_calls] = (trainer, history)
    (one, one_history), (three, three_history) = runs[1], runs[3]
    assert len(one.client_weights) == len(three.client_weights)
    for a, b in zip(one.client_weights, three.client_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(one_history["val_accuracy"], three_history["val_accuracy"])
    assert one.tracing_counts() == three.tracing_counts()  # no extra traces from the threads


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_bad_parallel_calls_name_the_value(value, one_line_error):
    one_line_error(LocalExecutor, value, names=("parallel_calls", repr(value)))


def test_config_parallel_calls_checked_before_any_data_is_loaded():
    for bad in (-2, 1.5):
        with pytest.raises(ValueError, match=f"parallel_calls must be .* got {bad!r}"):
            experiment.validate(experiment.Config(parallel_calls=bad))
    with pytest.raises(ValueError, match="--parallel_calls=2 is the local executor's"):
        experiment.validate(experiment.Config(parallel_calls=2, executor="ray"))
    # the presets' auto (0) is no error with Ray: its actors run the calls
    experiment.validate(experiment.Config(**{**experiment.PRESETS["paper_fast"],
                                             "executor": "ray"}))
    assert LocalExecutor(np.int64(2)).parallel_calls == 2


def test_auto_runs_one_call_per_core_only_for_compiled_calls():
    cores = len(os.sched_getaffinity(0))
    compiled = LocalExecutor(parallel_calls=0)
    compiled.start(_SlowAlgorithm(jit_compile=True), clients=None, fns=None)
    assert compiled.parallel_calls == cores
    plain = LocalExecutor(parallel_calls=0)
    plain.start(_SlowAlgorithm(jit_compile=False), clients=None, fns=None)
    assert plain.parallel_calls == 1  # the baselines' calls already use every core
    # the real workers say whether their calls are compiled: NTK-DFL's closed form is not
    assert nd.algorithms.NTKDFL(jit_compile=True).make_worker(_fns()).jit_compile
    assert not nd.algorithms.NTKDFL(jit_compile=True, loss="mse").make_worker(_fns()).jit_compile
    assert not nd.algorithms.get("dfedavg").make_worker(_fns()).jit_compile


def _fns():
    from ntkdfl_tf.functional import ModelFunctions

    return ModelFunctions(nd.models.mlp())
