"""Runs a fixed set of small trainings and saves every final weight and log, to compare checkouts.

Run it once from a checkout of the old code and once from the new one, then compare:

    (cd /path/to/old && python /path/to/benchmarks/same_results.py --out=/tmp/old.npz)
    python benchmarks/same_results.py --out=/tmp/new.npz --compare=/tmp/old.npz

It imports ``ntkdfl_tf`` from the current folder first, so the checkout it runs in is the one
measured. Prints one JSON line per setting: max |weight difference| and, for each log that differs, its
largest difference.
"""

import json
import os
import sys

sys.path.insert(0, os.getcwd())

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", None, "Where to save the results (.npz).", required=True)
flags.DEFINE_string("compare", None, "Results of another checkout to compare with.")
flags.DEFINE_string("only", None, "Comma-separated setting names to run (default: all).")

SETTINGS = {
    "ntk_grid": ("ntk", {}),
    "ntk_batched_jit": ("ntk", dict(jacobian_batches=3, client_batch=4, jit_compile=True)),
    "ntk_single_tau_decay": ("ntk", dict(taus=(100,), learning_rate="decay")),
    "ntk_mse": ("ntk", dict(loss="mse")),
    "ntk_bound": ("ntk", dict(flow="euler_bound")),
    "ntk_matrix_free": ("ntk", dict(kernel="matrix_free", taus=(50, 100))),
    "ntk_no_averaging": ("ntk", dict(per_round_averaging=False)),
    "ntk_dropout": ("ntk", dict(faults=dict(dropout=0.3, leave={2: 1}))),
    "ntk_message_loss": ("ntk", dict(faults=dict(message_loss=0.2))),
    "dfedavg": ("dfedavg", dict(local_epochs=2)),
    "dfedavgm": ("dfedavgm", dict(local_epochs=2)),
    "dfedsam": ("dfedsam", dict(local_epochs=2)),
    "dpsgd": ("dpsgd", {}),
    "dfedavg_message_loss": ("dfedavg", dict(local_epochs=2, faults=dict(message_loss=0.2))),
}


def run(name):
    import math

    import numpy as np

    import ntkdfl_tf as nd

    kind, options = SETTINGS[name]
    options = dict(options)
    faults = options.pop("faults", None)
    (x, y), (xt, yt) = nd.data.load("fashion_mnist")
    clients = nd.data.dirichlet_partition(x, y, 12, 0.1, seed=0, samples_per_client=60)
    if kind == "ntk":
        if options.get("learning_rate") == "decay":
            options["learning_rate"] = lambda r: 0.01 * math.exp(-0.07 * r)
        options.setdefault("taus", (50, 100, 200))
        algorithm = nd.algorithms.NTKDFL(**options)
    else:
        algorithm = nd.algorithms.get(kind, **options)
    extra = {}
    if faults and hasattr(nd, "protocol"):  # lost messages moved from Faults to the channel
        extra["channel"] = nd.protocol.Channel(message_loss=faults.pop("message_loss", 0.0))
    trainer = nd.DecentralizedTrainer(
        lambda: nd.models.mlp(hidden=(32,)), algorithm, nd.topology.RandomGraph(3), seed=0,
        faults=nd.Faults(**faults) if faults else None, **extra)
    history = trainer.fit(clients, rounds=3, validation_data=(xt[:500], yt[:500]), verbose=0)
    out = {f"{name}/w{i}": w.numpy() for i, w in enumerate(trainer.client_weights)}
    for key, values in history.history.items():
        if key not in ("round_seconds",):
            out[f"{name}/log/{key}"] = np.asarray(values, np.float64)
    return out


def main(_):
    import numpy as np

    f = flags.FLAGS
    names = f.only.split(",") if f.only else list(SETTINGS)
    results = {}
    for name in names:
        results.update(run(name))
    np.savez(f.out, **results)
    if not f.compare:
        return
    other = np.load(f.compare)
    for name in names:
        weights = [k for k in results if k.startswith(f"{name}/w")]
        diff = max(float(np.max(np.abs(results[k] - other[k]))) for k in weights)
        logs = sorted(k.split("/log/")[1] for k in results if k.startswith(f"{name}/log/"))
        differing = {}
        for k in logs:
            mine, theirs = results[f"{name}/log/{k}"], other.get(f"{name}/log/{k}")
            if theirs is None or not np.array_equal(mine, theirs):
                differing[k] = None if theirs is None else float(np.max(np.abs(mine - theirs)))
        print(json.dumps({"setting": name, "max_weight_difference": diff,
                          "bit_identical_weights": diff == 0.0,
                          "differing_logs_max_difference": differing}))


if __name__ == "__main__":
    app.run(main)
