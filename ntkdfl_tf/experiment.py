"""One training run from a flat configuration: what the launchers call.

``run(Config(...))`` loads the data, partitions it, trains, and writes into ``logdir``:
``history.csv`` (one row per round), TensorBoard events (scalars, the client-accuracy
histogram, the configuration as hparams), and the aggregated model to
``<save_dir>/<run_name>.keras``.
"""

import dataclasses
import functools
import json
import math
import os
import time

import keras
import numpy as np

from ntkdfl_tf import algorithms, callbacks, data, defences, executors, models, protocol, \
    topology
from ntkdfl_tf import faults as faults_lib
from ntkdfl_tf.errors import DivergenceError
from ntkdfl_tf.io import atomic_open
from ntkdfl_tf.trainer import DecentralizedTrainer, stream_rng


@dataclasses.dataclass
class Config:
    """Every knob of a run. Field names match the launcher flags."""

    algorithm: str = "ntk_dfl"
    dataset: str = "fashion_mnist"
    data_dir: str = None
    model: str = "mlp"
    hidden: int = 100
    num_clients: int = 30
    partition: str = "dirichlet"
    alpha: float = 0.1
    samples_per_client: int = 200  # the paper's rule; 0 for a disjoint split of the whole set
    topology: str = "random"
    num_neighbors: int = 5
    edge_probability: float = 0.015
    rounds: int = 5
    learning_rate: float = 0.01
    lr_decay: float = 0.0  # eta_r = learning_rate * exp(-lr_decay * r)
    taus: tuple = (100, 200, 300, 400, 500, 600, 800)
    loss: str = "cross_entropy"
    kernel: str = "auto"
    per_round_averaging: bool = True
    packages: str = "lazy"
    jacobian_batches: int = 1
    client_batch: int = 1
    jacobian_chunk: int = 128
    jit_compile: bool = False
    flow: str = "dopri5"
    flow_budget: int = 0  # NTK-DFL: most Euler sub-steps per grid step a flow may ask; 0: none
    tau_search: str = "full"  # NTK-DFL: "full" or "early_stop" (NTKDFL.tau_search)
    # baselines (DFedAvg family); None keeps each algorithm's documented default
    local_learning_rate: float = None
    batch_size: int = None
    local_epochs: int = None
    local_steps: int = None  # fixed local steps instead of epochs (D-PSGD's original: 1)
    momentum: float = None
    sam_rho: float = None
    sparsity: float = None  # DisPFL: the share of weights each client's mask leaves out
    # failures (ntkdfl_tf.Faults) and lost messages (the channel), each from its own stream
    dropout: float = 0.0
    message_loss: float = 0.0
    codec: str = "identity"  # Jacobian packages on the wire (ntkdfl_tf.protocol.codecs)
    weight_codec: str = "identity"  # weight messages on the wire
    leave: str = ""  # client:round pairs, e.g. "3:5,7:10"
    # Byzantine senders (ntkdfl_tf.protocol.byzantine) and the receivers' defence
    # (ntkdfl_tf.defences); parameters as "key=value,...", e.g. --attack_params=epsilon=100
    byzantine_fraction: float = 0.0
    attack: str = "none"
    attack_params: str = ""
    defence: str = "none"
    defence_params: str = ""
    final_aggregation: str = "mean"  # or "robust"
    executor: str = "local"  # or "ray"
    parallel_calls: int = 1  # local executor: calls in flight at once (0: one per CPU core)
    ray_address: str = None  # None: start a local Ray instance; "auto" or ray://host:10001
    ray_actors: int = 2
    seed: int = 0
    resume: bool = True  # continue from <logdir>/checkpoint.npz when it exists
    logdir: str = "runs/quick"
    save_dir: str = "saved_models"
    run_name: str = None
    verbose: int = 1
    stop_at_accuracy: float = 0.0  # stop once the aggregate reaches it (0: run every round)
    client_metrics_every: int = 1  # rounds between evaluations of every client model


# The paper's setting with the reference's Jacobian batching (m = 6) and XLA-compiled batches
# of 5 clients (a batched loop lasts as long as its stiffest client); one such call in flight
# per CPU core, as each runs on one; the rkc flow, within 1% of the exact flow's update like
# dopri5 with fewer products with H, as many rounds to 85% over three seeds and 0.8x dopri5's
# time (RESULTS.md 6.6, docs/performance.md).
_PAPER_FAST = dict(num_clients=300, alpha=0.1, num_neighbors=5, samples_per_client=200,
                   rounds=40, jacobian_batches=6, client_batch=5, jit_compile=True,
                   parallel_calls=0, flow="rkc", logdir="runs/paper_fast")

PRESETS = {
    # a quick run that clearly learns (its time on this machine: README, Results).
    "quick": dict(num_clients=30, rounds=5, logdir="runs/quick"),
    # The paper's headline setting: 300 clients of ~200 samples, alpha = 0.1, kappa = 5.
    "paper": dict(num_clients=300, alpha=0.1, num_neighbors=5, samples_per_client=200,
                  rounds=40, logdir="runs/paper"),
    "paper_fast": _PAPER_FAST,
    # paper_fast with one candidate, tau = 100 grid steps at a constant eta = 0.01 (the
    # reference's final configuration has tau = 100 too, with eta decaying): 8x less flow and
    # one candidate per slice, and the dopri5 flow (rkc gains nothing when the stiff transient
    # is most of the flow). Reaches 85% on Fashion-MNIST sooner in wall-clock time than the
    # tau grid, in more rounds (README, Performance).
    "paper_single_tau": {**_PAPER_FAST, "taus": (100,), "flow": "dopri5",
                         "logdir": "runs/paper_single_tau"},
    # The Byzantine matrix (launchers/byzantine.py): 100 clients, 30 rounds, one candidate tau
    # and m = 6, which keeps an NTK-DFL run near a minute here. The flow is pinned so that the
    # cells of a matrix run across sessions stay comparable. Honest kernels here ask 2-4 Euler
    # sub-steps per grid step; the budget of 32 stops a stiff (Byzantine) kernel from costing
    # a round 10-40x its honest time (docs/byzantine.md).
    "byzantine": dict(num_clients=100, alpha=0.1, num_neighbors=5, samples_per_client=200,
                      rounds=30, jacobian_batches=6, client_batch=25, jit_compile=True,
                      taus=(100,), flow="euler_adaptive", flow_budget=32, verbose=0,
                      logdir="runs/byzantine"),
}


def make_topology(cfg):
    if cfg.topology == "random":
        return topology.RandomGraph(cfg.num_neighbors)
    if cfg.topology == "erdos_renyi":
        return topology.ErdosRenyi(cfg.edge_probability)
    if cfg.topology in topology.TOPOLOGIES:
        return topology.TOPOLOGIES[cfg.topology]()
    raise ValueError(f"Unknown topology {cfg.topology!r}; choose one of "
                     f"{', '.join(topology.TOPOLOGIES)}.")


def make_algorithm(cfg, **overrides):
    """The algorithm ``cfg`` describes; ``overrides`` replace NTK-DFL settings (benchmarks)."""
    if cfg.sparsity is not None and cfg.algorithm != "dispfl":
        raise ValueError(f"--sparsity sets DisPFL's masks; {cfg.algorithm} has none (drop it).")
    lr = cfg.learning_rate
    if cfg.lr_decay:
        lr = functools.partial(decayed_learning_rate, cfg.learning_rate, cfg.lr_decay)
    if cfg.algorithm == "ntk_dfl":
        settings = dict(learning_rate=lr, taus=cfg.taus, loss=cfg.loss, kernel=cfg.kernel,
                        per_round_averaging=cfg.per_round_averaging, packages=cfg.packages,
                        jacobian_batches=cfg.jacobian_batches, client_batch=cfg.client_batch,
                        jit_compile=cfg.jit_compile, flow=cfg.flow,
                        flow_budget=cfg.flow_budget or None, tau_search=cfg.tau_search,
                        jacobian_chunk=cfg.jacobian_chunk)
        return algorithms.NTKDFL(**{**settings, **overrides})
    local = {"learning_rate": cfg.local_learning_rate, "batch_size": cfg.batch_size,
             "local_epochs": cfg.local_epochs, "local_steps": cfg.local_steps,
             "momentum": cfg.momentum, "sam_rho": cfg.sam_rho}
    if cfg.sparsity is not None:  # only DisPFL has masks
        local["sparsity"] = cfg.sparsity
    return algorithms.get(cfg.algorithm, **{k: v for k, v in local.items() if v is not None})


def decayed_learning_rate(lr, decay, round_index):
    """eta_r = lr * exp(-decay * r): the reference's per-round decay (a picklable schedule)."""
    return lr * math.exp(-decay * round_index)


def make_faults(cfg):
    """The Faults of ``cfg``, or None when it injects none."""
    leave = faults_lib.Faults.parse_leave(cfg.leave)
    if not (cfg.dropout or leave):
        return None
    return faults_lib.Faults(cfg.dropout, leave)


def parse_params(text, flag):
    """``"key=value,..."`` -> a dict of numbers (``""``: empty); ValueError naming ``flag``."""
    params = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key.strip() or number is None:
            raise ValueError(f"--{flag}: {item!r} is not key=number; write e.g. "
                             f"--{flag}=epsilon=100,scale=2.")
        params[key.strip()] = int(number) if number.is_integer() and "." not in value else number
    return params


def make_channel(cfg):
    """The channel between clients (``--message_loss``, codecs, Byzantine senders)."""
    byzantine = None
    if cfg.byzantine_fraction or cfg.attack != "none":
        byzantine = protocol.Byzantine(cfg.byzantine_fraction, cfg.attack,
                                       parse_params(cfg.attack_params, "attack_params"))
    return protocol.Channel(message_loss=cfg.message_loss, codec=cfg.codec,
                            weight_codec=cfg.weight_codec, byzantine=byzantine)


def make_defence(cfg):
    """The receivers' ``defences.Defence`` (``--defence``), or None for the plain mean."""
    if cfg.defence == "none" and not cfg.defence_params and cfg.final_aggregation == "mean":
        return None
    return defences.Defence(cfg.defence, parse_params(cfg.defence_params, "defence_params"),
                            cfg.final_aggregation)


def make_executor(cfg):
    if cfg.executor == "local":
        return executors.LocalExecutor(parallel_calls=cfg.parallel_calls)
    if cfg.executor != "ray":
        raise ValueError(f"Unknown executor {cfg.executor!r}; choose local or ray.")
    if cfg.ray_actors is None or cfg.ray_actors < 1:
        raise ValueError(f"--ray_actors must be positive, got {cfg.ray_actors!r}.")
    try:
        from ntkdfl_tf.executors import RayExecutor
    except ImportError as e:
        raise ValueError("--executor=ray needs Ray: pip install 'ntkdfl_tf[ray]'.") from e
    return RayExecutor(num_actors=cfg.ray_actors, address=cfg.ray_address)


def make_model_fn(cfg, train=None):
    """The model function: a bundled dataset's model, else one shaped by ``train`` (x, y)."""
    if cfg.model not in models.MODELS:
        raise ValueError(f"Unknown model {cfg.model!r}; choose one of {', '.join(models.MODELS)}.")
    options = {"hidden": (cfg.hidden,)} if cfg.model == "mlp" else {}
    if cfg.dataset not in data.STATS and train is not None:
        return models.for_data(*train, cfg.model, **options)
    return functools.partial(models.MODELS[cfg.model], dataset=cfg.dataset, **options)


def partition(cfg, x, y):
    seed = int(stream_rng(cfg.seed, "partition").integers(2**31))
    if cfg.partition == "dirichlet":
        return data.dirichlet_partition(x, y, cfg.num_clients, cfg.alpha, seed=seed,
                                        samples_per_client=cfg.samples_per_client or None)
    if cfg.partition == "iid":
        return data.iid_partition(x, y, cfg.num_clients, seed=seed,
                                  samples_per_client=cfg.samples_per_client or None)
    if cfg.partition in data.PARTITIONS:
        return data.PARTITIONS[cfg.partition](x, y, cfg.num_clients, seed=seed)
    raise ValueError(f"Unknown partition {cfg.partition!r}; choose one of "
                     f"{', '.join(data.PARTITIONS)}.")


def validate(cfg):
    """Checks the configuration before any data is loaded; raises ValueError naming the value."""
    positive = {"num_clients": cfg.num_clients, "rounds": cfg.rounds,
                "learning_rate": cfg.learning_rate, "hidden": cfg.hidden,
                "client_metrics_every": cfg.client_metrics_every}
    for name, value in positive.items():
        if value is None or value <= 0:
            raise ValueError(f"--{name} must be positive, got {value!r}.")
    if not 0 <= cfg.stop_at_accuracy <= 1:
        raise ValueError(f"--stop_at_accuracy must lie in [0, 1] (0: never stop early), got "
                         f"{cfg.stop_at_accuracy!r}.")
    if cfg.partition == "dirichlet" and not cfg.alpha > 0:
        raise ValueError(f"--alpha must be > 0 for the Dirichlet partition, got {cfg.alpha!r}.")
    data.check_name(cfg.dataset)
    if cfg.partition not in data.PARTITIONS:
        raise ValueError(f"Unknown partition {cfg.partition!r}; choose one of "
                         f"{', '.join(data.PARTITIONS)}.")
    make_topology(cfg).validate(cfg.num_clients)
    if cfg.executor not in ("local", "ray"):
        raise ValueError(f"Unknown executor {cfg.executor!r}; choose local or ray.")
    executors.local.check_parallel_calls(cfg.parallel_calls)
    if cfg.executor == "ray" and cfg.parallel_calls not in (0, 1):  # 0 (auto): the presets'
        raise ValueError(f"--parallel_calls={cfg.parallel_calls!r} is the local executor's; "
                         "with --executor=ray the calls run on --ray_actors actors (drop "
                         "--parallel_calls).")
    faults = make_faults(cfg)
    if faults is not None:
        faults.validate(cfg.num_clients)
    make_channel(cfg)
    algorithm = make_algorithm(cfg)
    defence = make_defence(cfg)
    if defence is not None:
        defence.validate(make_topology(cfg), algorithm)
    make_model_fn(cfg)
    for folder in (cfg.logdir, cfg.save_dir):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"Cannot create {folder!r} ({e.strerror}); choose a writable "
                             "folder.") from e
        if not os.access(folder, os.W_OK):
            raise ValueError(f"Cannot write to {folder!r}; choose a writable folder.")


def make_trainer(cfg, train=None):
    """The ``DecentralizedTrainer`` that ``cfg`` describes (model, algorithm, graph, faults,
    executor and channel; its seed); ``train``: the training ``(x, y)`` for a dataset other
    than the bundled two, which shapes the model."""
    return DecentralizedTrainer(make_model_fn(cfg, train), make_algorithm(cfg), make_topology(cfg),
                                seed=cfg.seed, faults=make_faults(cfg),
                                executor=make_executor(cfg), channel=make_channel(cfg),
                                defence=make_defence(cfg))


NOT_HPARAMS = ("data_dir", "logdir", "save_dir", "run_name", "verbose", "resume", "ray_address")


def hparams(cfg):
    """The run's settings for TensorBoard's HParams tab: every Config field but paths and
    display options; tuples as text, unset (None) fields left out."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HPARAMS and v is not None}


def run(cfg, dataset=None):
    """Trains according to ``cfg`` and writes history, TensorBoard events and the model.

    Args:
        cfg: the Config.
        dataset: ``((x_train, y_train), (x_test, y_test))`` already loaded, or None to load.

    Returns:
        ``(trainer, history)``.
    """
    validate(cfg)
    run_name = cfg.run_name or os.path.basename(os.path.normpath(cfg.logdir))
    t0 = time.perf_counter()
    source = None
    if not dataset:
        dataset = data.load(cfg.dataset, data_dir=cfg.data_dir)
        # Ray actors load their clients' samples from these files on their own nodes
        source = data.DatasetSource(cfg.dataset,
                                    os.path.abspath(cfg.data_dir) if cfg.data_dir else None)
    (x_train, y_train), (x_test, y_test) = dataset
    clients = partition(cfg, x_train, y_train)
    if source is not None:
        clients = clients.with_source(source)
    trainer = make_trainer(cfg, (x_train, y_train))
    final = callbacks.FinalAggregation(cfg.save_dir, run_name)
    history_path = os.path.join(cfg.logdir, "history.csv")
    cbs = [callbacks.HistoryCSV(history_path),
           keras.callbacks.TensorBoard(cfg.logdir, write_graph=False),
           callbacks.ClientMetrics(cfg.logdir), callbacks.HParams(cfg.logdir, hparams(cfg)),
           final,
           # last, so a round is checkpointed only once its CSV row is on disk
           callbacks.RoundCheckpoint(cfg.logdir, resume=cfg.resume, verbose=cfg.verbose)]
    if cfg.verbose:
        print(f"{cfg.algorithm}: {cfg.num_clients} clients ({cfg.partition}, alpha={cfg.alpha}), "
              f"{cfg.topology} topology, {cfg.rounds} rounds on {cfg.dataset}; "
              f"{int(clients.counts.sum())} training samples.", flush=True)
    try:
        history = trainer.fit(clients, rounds=cfg.rounds, validation_data=(x_test, y_test),
                              callbacks=cbs, verbose=cfg.verbose,
                              client_metrics_every=cfg.client_metrics_every,
                              stop_at_accuracy=cfg.stop_at_accuracy or None)
    except DivergenceError as e:  # name the flag that sets the rate the message gives
        flag = "learning_rate" if cfg.algorithm == "ntk_dfl" else "local_learning_rate"
        raise DivergenceError(f"{e} Set it with --{flag}.", round=e.round,
                              clients=e.clients) from e
    if final.selected_clients is not None and trainer.byzantine_clients is not None:
        # who the saved model averages, and which of them were Byzantine
        with atomic_open(os.path.join(cfg.logdir, "final_clients.json"), "w") as f:
            json.dump({"final_aggregation": cfg.final_aggregation,
                       "kept": [int(c) for c in final.selected_clients],
                       "byzantine": np.flatnonzero(trainer.byzantine_clients).tolist()}, f)
    if cfg.verbose and not history.history:
        print(f"Nothing to run: {cfg.logdir} already holds {trainer.round} rounds; pass a larger "
              "--rounds to continue, or --noresume to start afresh.", flush=True)
    elif cfg.verbose:
        last = {k: v[-1] for k, v in history.history.items()}
        print(f"done in {time.perf_counter() - t0:.0f} s: aggregated accuracy "
              f"{last.get('val_accuracy', float('nan')):.4f}, mean client "
              f"{last.get('val_client_mean_accuracy', float('nan')):.4f}\n"
              f"history:     {history_path}\ntensorboard: tensorboard --logdir {cfg.logdir}\n"
              f"model:       {final.path}", flush=True)
    return trainer, history
