"""RayExecutor across two Ray nodes: a head and a worker node started on this machine with
``ray start``, one actor on each, each loading its clients' samples from the dataset files.

The two raylets are distinct Ray nodes (their own ports, CPUs and object stores) that share the
machine, which is how Ray's own multi-node tests run; across real machines only the addresses
differ (docs/ray.md).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray executor needs ray: pip install 'ntkdfl_tf[ray]'")

import ntkdfl_tf as nd  # noqa: E402
from ntkdfl_tf.executors import RayExecutor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args, temp_dir, env):
    """Runs ``ray start args``; returns the process group its daemons run in."""
    cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cli = cli if os.path.exists(cli) else shutil.which("ray")
    # a process group of its own: the daemons it leaves behind inherit it, so teardown can
    # stop exactly the processes this test started (``ray stop`` would stop every Ray on the
    # machine)
    process = subprocess.Popen(
        [cli, "start", *args, f"--temp-dir={temp_dir}", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    out, _ = process.communicate(timeout=120)
    if process.returncode:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")
    return process.pid


def _stop_groups(groups, grace=3.0):
    """SIGTERM to each process group, SIGKILL to what is left after ``grace`` seconds."""
    def alive(group):
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in filter(alive, groups):
            os.killpg(group, sig)
        deadline = time.monotonic() + grace
        while any(map(alive, groups)) and time.monotonic() < deadline:
            time.sleep(0.2)
    return [g for g in groups if alive(g)]


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a worker node, one CPU each; yields the head's address."""
    if ray.is_initialized():  # another module's local instance: the driver joins this cluster
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ntkray")  # short: Ray's socket paths must stay short
    # The nodes' token authentication must match this driver's, or they cannot call back the
    # driver (which owns the actors, so they die unscheduled). Ray fixed the driver's mode when
    # pytest imported it, from RAY_AUTH_MODE (unset: off), unless an earlier test's local
    # ray.init() turned tokens on, which Ray records in os.environ (the token in ~/.ray).
    auth_mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE=auth_mode,
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    port, groups = _free_port(), []
    address = f"127.0.0.1:{port}"
    try:
        groups.append(_ray_start(
            ["--head", f"--port={port}", "--num-cpus=1",
             '--resources={"ntkdfl_head": 1}', "--include-dashboard=false",
             f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}"],
            temp_dir, env))
        groups.append(_ray_start(
            [f"--address={address}", "--num-cpus=1",
             '--resources={"ntkdfl_worker": 1}'], temp_dir, env))
        yield address
    finally:
        ray.shutdown()
        left = _stop_groups(groups)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of groups {left} survived SIGKILL"


ALGORITHMS = {
    "ntk_dfl": lambda: nd.algorithms.NTKDFL(taus=(20,), client_batch=2, jacobian_batches=2),
    "dfedavg": lambda: nd.algorithms.get("dfedavg", local_epochs=1, client_batch=3),
}


@pytest.fixture(scope="module")
def sourced(fashion):
    """8 clients of ~30 Fashion-MNIST training samples that name their source, 300 test images."""
    (x_train, y_train), (x_test, y_test) = fashion
    clients = nd.data.dirichlet_partition(x_train, y_train, num_clients=8, alpha=0.1, seed=0,
                                          samples_per_client=30)
    return (clients.with_source(nd.data.DatasetSource("fashion_mnist")),
            (x_test[:300], y_test[:300]))


def test_actors_on_two_nodes_load_their_data_and_give_the_local_results(two_nodes, sourced):
    clients, test = sourced
    executor = RayExecutor(num_actors=2, address=two_nodes, scheduling_strategy="SPREAD")

    def fit(name, executor):
        trainer = nd.DecentralizedTrainer(nd.models.mlp, ALGORITHMS[name](),
                                          nd.topology.RandomGraph(3), seed=0, executor=executor)
        return trainer, trainer.fit(clients, rounds=2, validation_data=test, verbose=0).history

    try:
        for name in sorted(ALGORITHMS):
            local, local_history = fit(name, "local")
            remote, remote_history = fit(name, executor)
            for a, b in zip(local.client_weights, remote.client_weights):
                np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
            for key in ("loss", "val_loss", "val_accuracy"):
                np.testing.assert_allclose(local_history[key], remote_history[key], atol=1e-6)
            assert executor.actors_load_data
            # what crossed for the clients: indices (8 bytes a sample) and digests, no samples
            assert remote_history["client_data_bytes"][0] <= (
                8 * clients.counts.sum() + 16 * len(clients.counts)) * 2
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 2
            assert sorted(executor.node_ids()) == sorted(nodes), "not one actor per node"
    finally:
        executor.shutdown()
