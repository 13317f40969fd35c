"""Several algorithms (and sweeps) on identical seeds, summarised side by side.

``compare(base, algorithms, ...)`` runs every combination into ``<logdir>/<run>/`` (history.csv,
TensorBoard events, the aggregated model) and writes ``<logdir>/summary.csv`` plus, when
matplotlib is installed (the ``plot`` extra), ``accuracy.png`` and ``accuracy_vs_bytes.png``.
Every run shares the root seed, so data partition, topology stream and initial weights agree.
"""

import csv
import dataclasses
import itertools
import os
import time

import numpy as np

from ntkdfl_tf import data, experiment

SUMMARY_FIELDS = ("run", "algorithm", "alpha", "num_neighbors", "topology", "dropout",
                  "per_round_averaging",
                  "rounds", "rounds_to_target", "best_accuracy", "final_accuracy",
                  "final_client_mean_accuracy", "total_bytes_sent", "wall_seconds")


def plan(base, algorithms, alphas=None, num_neighbors=None, topologies=None, ablation=False,
         dropouts=None):
    """The runs of a comparison: a list of ``(run_name, Config)``.

    Args:
        base: the Config every run starts from.
        algorithms: algorithm names.
        alphas, num_neighbors, topologies: sweep values (None: the base's value only).
        ablation: also run NTK-DFL without per-round averaging.
        dropouts: client dropout probabilities to sweep (None: the base's value only).
    """
    alphas = alphas or [base.alpha]
    kappas = num_neighbors or [base.num_neighbors]
    topologies = topologies or [base.topology]
    dropouts = dropouts or [base.dropout]
    sweep = len(alphas) > 1 or len(kappas) > 1 or len(topologies) > 1
    runs = []
    for alg, alpha, kappa, topo, drop in itertools.product(algorithms, alphas, kappas, topologies,
                                                           dropouts):
        variants = [True, False] if ablation and alg == "ntk_dfl" else [True]
        for averaging in variants:
            name = alg
            if sweep:
                name += f"_alpha{alpha:g}_k{kappa}_{topo}"
            if len(dropouts) > 1:
                name += f"_dropout{drop:g}"
            if not averaging:
                name += "_no_averaging"
            cfg = dataclasses.replace(base, algorithm=alg, alpha=alpha, num_neighbors=kappa,
                                      topology=topo, dropout=drop, per_round_averaging=averaging,
                                      logdir=os.path.join(base.logdir, name),
                                      save_dir=os.path.join(base.logdir, name), run_name="model")
            runs.append((name, cfg))
    return runs


def summarise(name, cfg, history, seconds, target):
    h = history.history
    acc = np.asarray(h.get("val_accuracy", [np.nan]))
    hit = np.flatnonzero(acc >= target)
    return {"run": name, "algorithm": cfg.algorithm, "alpha": cfg.alpha,
            "num_neighbors": cfg.num_neighbors, "topology": cfg.topology, "dropout": cfg.dropout,
            "per_round_averaging": cfg.per_round_averaging, "rounds": len(acc),
            "rounds_to_target": int(hit[0]) + 1 if hit.size else "",
            "best_accuracy": float(np.max(acc)), "final_accuracy": float(acc[-1]),
            "final_client_mean_accuracy": float(h.get("val_client_mean_accuracy", [np.nan])[-1]),
            "total_bytes_sent": float(np.sum(h["bytes_sent"])), "wall_seconds": round(seconds, 1)}


def write_summary(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot(logdir, histories):
    """accuracy.png and accuracy_vs_bytes.png; returns the paths, or [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'ntkdfl_tf[plot]'): no figures.")
        return []
    paths = []
    for x_key, fname, xlabel in (("round", "accuracy.png", "communication round"),
                                 ("bytes", "accuracy_vs_bytes.png", "bytes sent (cumulative)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, h in histories.items():
            acc = h["val_accuracy"]
            x = (np.arange(1, len(acc) + 1) if x_key == "round"
                 else np.cumsum(h["bytes_sent"]))
            ax.plot(x, acc, marker="o", markersize=3, label=name)
        if x_key == "bytes":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("aggregated model test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(logdir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(base, algorithms, alphas=None, num_neighbors=None, topologies=None, ablation=False,
            target_accuracy=0.85, dropouts=None):
    """Runs the plan, writing summary.csv after every run (a killed sweep keeps what finished).

    Returns:
        The summary rows (list of dicts).
    """
    runs = plan(base, algorithms, alphas, num_neighbors, topologies, ablation, dropouts)
    for _, cfg in runs:  # every configuration checked before the first (long) run starts
        experiment.validate(cfg)
    dataset = data.load(base.dataset, data_dir=base.data_dir)
    rows, histories = [], {}
    summary = os.path.join(base.logdir, "summary.csv")
    for name, cfg in runs:
        start = time.perf_counter()
        _, history = experiment.run(cfg, dataset=dataset)
        rows.append(summarise(name, cfg, history, time.perf_counter() - start, target_accuracy))
        histories[name] = history.history
        write_summary(summary, rows)
    figures = plot(base.logdir, histories)
    if base.verbose:
        print(f"summary: {summary}" + "".join(f"\nfigure:  {p}" for p in figures))
    return rows
