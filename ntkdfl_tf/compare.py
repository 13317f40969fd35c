"""Several algorithms (and sweeps) on identical seeds, summarised side by side.

``compare(base, algorithms, ...)`` runs every combination into ``<logdir>/<run>/`` (history.csv,
TensorBoard events, the aggregated model) and writes ``<logdir>/summary.csv`` plus, when
matplotlib is installed (the ``plot`` extra), ``accuracy.png`` and ``accuracy_vs_bytes.png``;
``linearisation.png`` (NTK-DFL's flow_loss against model_loss per round) when an NTK-DFL run is in
it; ``heterogeneity.png`` (aggregate-minus-mean-client gap and client_weight_spread against alpha)
for an alpha sweep; ``dropout.png`` (accuracy against client dropout) for a dropout sweep.
Every run shares the root seed, so data partition, topology stream and initial weights agree.
"""

import dataclasses
import itertools
import os
import time

import numpy as np

from ntkdfl_tf import data, experiment
from ntkdfl_tf.io import save_figure, write_csv

SUMMARY_FIELDS = ("run", "algorithm", "partition", "alpha", "num_neighbors", "topology",
                  "dropout", "per_round_averaging", "codec", "weight_codec",
                  "rounds", "rounds_to_target", "bytes_to_target", "best_accuracy",
                  "final_accuracy", "final_client_mean_accuracy", "aggregate_gain",
                  "final_client_weight_spread", "bytes_per_round", "total_bytes_sent",
                  "wall_seconds")


def plan(base, algorithms, alphas=None, num_neighbors=None, topologies=None, ablation=False,
         dropouts=None, codecs=None, weight_codecs=None):
    """The runs of a comparison: a list of ``(run_name, Config)``.

    Args:
        base: the Config every run starts from.
        algorithms: algorithm names.
        alphas, num_neighbors, topologies: sweep values (None: the base's value only); an
            alpha of ``"iid"`` is an IID partition.
        ablation: also run NTK-DFL without per-round averaging.
        dropouts: client dropout probabilities to sweep (None: the base's value only).
        codecs: Jacobian-package codecs to sweep (NTK-DFL runs; None: the base's).
        weight_codecs: weight-message codecs to sweep (every algorithm; None: the base's).
    """
    alphas = alphas or [base.alpha]
    kappas = num_neighbors or [base.num_neighbors]
    topologies = topologies or [base.topology]
    dropouts = dropouts or [base.dropout]
    weight_codecs = weight_codecs or [base.weight_codec]
    sweep = len(alphas) > 1 or len(kappas) > 1 or len(topologies) > 1
    runs = []
    for alg, alpha, kappa, topo, drop, wcodec in itertools.product(
            algorithms, alphas, kappas, topologies, dropouts, weight_codecs):
        variants = [True, False] if ablation and alg == "ntk_dfl" else [True]
        package_codecs = (codecs or [base.codec]) if alg == "ntk_dfl" else [base.codec]
        for averaging, codec in itertools.product(variants, package_codecs):
            name = alg
            iid = alpha == "iid"
            if sweep:
                name += f"_{'iid' if iid else f'alpha{alpha:g}'}_k{kappa}_{topo}"
            if len(dropouts) > 1:
                name += f"_dropout{drop:g}"
            if not averaging:
                name += "_no_averaging"
            if len(package_codecs) > 1 or codec != "identity":
                name += f"_codec-{_slug(codec)}"
            if len(weight_codecs) > 1 or wcodec != "identity":
                name += f"_weights-{_slug(wcodec)}"
            cfg = dataclasses.replace(base, algorithm=alg, num_neighbors=kappa, codec=codec,
                                      weight_codec=wcodec,
                                      alpha=base.alpha if iid else float(alpha),
                                      partition="iid" if iid else base.partition,
                                      topology=topo, dropout=drop, per_round_averaging=averaging,
                                      logdir=os.path.join(base.logdir, name),
                                      save_dir=os.path.join(base.logdir, name), run_name="model")
            runs.append((name, cfg))
    return runs


def _slug(codec):
    """A codec string as a run-name part: 'topk:fraction=0.1+quantize:bits=8' -> topk0.1+q8."""
    return (codec.replace("fraction=", "").replace("quantize:bits=", "q").replace(":", "")
            .replace(",stochastic=1", "s").replace("subsample", "sub"))


def summarise(name, cfg, history, seconds, target):
    """One summary.csv row (``SUMMARY_FIELDS``) from a run's ``history`` (a Keras ``History``
    or its ``.history`` dict of per-round lists)."""
    h = getattr(history, "history", history)
    acc = np.asarray(h.get("val_accuracy", [np.nan]))
    hit = np.flatnonzero(acc >= target)
    cumulative = np.cumsum(h["bytes_sent"])
    final_client = float(h.get("val_client_mean_accuracy", [np.nan])[-1])
    return {"run": name, "algorithm": cfg.algorithm, "partition": cfg.partition,
            "alpha": cfg.alpha if cfg.partition == "dirichlet" else "",  # IID has no alpha
            "num_neighbors": cfg.num_neighbors, "topology": cfg.topology, "dropout": cfg.dropout,
            "per_round_averaging": cfg.per_round_averaging, "codec": cfg.codec,
            "weight_codec": cfg.weight_codec, "rounds": len(acc),
            "rounds_to_target": int(hit[0]) + 1 if hit.size else "",
            "bytes_to_target": float(cumulative[hit[0]]) if hit.size else "",
            "bytes_per_round": float(np.mean(h["bytes_sent"])),
            "best_accuracy": float(np.max(acc)), "final_accuracy": float(acc[-1]),
            "final_client_mean_accuracy": final_client,
            "aggregate_gain": float(acc[-1]) - final_client,
            "final_client_weight_spread": float(h.get("client_weight_spread", [np.nan])[-1]),
            "total_bytes_sent": float(np.sum(h["bytes_sent"])), "wall_seconds": round(seconds, 1)}


def write_summary(path, rows):
    """Writes the summary table (columns ``SUMMARY_FIELDS``, one row per run) atomically.

    Args:
        path: the .csv to write.
        rows: dicts keyed by names in ``SUMMARY_FIELDS`` (missing ones are left empty).

    Raises:
        ValueError: a row has a key outside ``SUMMARY_FIELDS``; the old file is kept.
    """
    write_csv(path, rows, SUMMARY_FIELDS)


def plot(logdir, histories, rows=()):
    """The figures of the module docstring; returns their paths, or [] without matplotlib."""
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
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    paths += _plot_linearisation(plt, logdir, histories) + _plot_sweeps(plt, logdir, rows)
    return paths


def _save(plt, fig, path):
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return [path]


def _plot_linearisation(plt, logdir, histories):
    """Where the kernel flow's predicted loss and the real network's loss part, round by round."""
    runs = {k: h for k, h in histories.items() if "flow_loss" in h}
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, h) in enumerate(runs.items()):
        r = np.arange(1, len(h["flow_loss"]) + 1)
        color = f"C{i}"
        ax.plot(r, h["flow_loss"], "--", color=color, label=f"{name}: flow_loss (kernel flow)")
        ax.plot(r, h["model_loss"], "-o", color=color, markersize=3,
                label=f"{name}: model_loss (network)")
    ax.set_yscale("log")
    ax.set_xlabel("communication round")
    ax.set_ylabel("neighbourhood cross-entropy at the chosen tau")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, os.path.join(logdir, "linearisation.png"))


def _plot_sweeps(plt, logdir, all_rows):
    paths = []
    for key, fname, xlabel in (("alpha", "heterogeneity.png", "Dirichlet alpha (IID at right)"),
                               ("dropout", "dropout.png", "client dropout probability")):
        rows = [r for r in all_rows if _sweep_value(r, key) is not None]
        values = {_sweep_value(r, key) for r in rows}
        if len(values) < 2:
            continue
        if key == "alpha":  # gap beside spread: does inter-client variance explain the lead?
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        else:
            fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, alg in enumerate(sorted({r["algorithm"] for r in rows})):
            sel = sorted((r for r in rows if r["algorithm"] == alg and r["per_round_averaging"]),
                         key=lambda r: _sweep_value(r, key))
            x = [_sweep_value(r, key) for r in sel]
            if key == "alpha":
                ax.plot(x, [r["aggregate_gain"] for r in sel], "-o", color=f"C{i}", label=alg)
                ax2.plot(x, [r["final_client_weight_spread"] for r in sel], "-o", color=f"C{i}",
                         label=alg)
            else:
                ax.plot(x, [r["final_accuracy"] for r in sel], "-o", color=f"C{i}",
                        label=f"{alg}: aggregate")
                ax.plot(x, [r["final_client_mean_accuracy"] for r in sel], "--s", color=f"C{i}",
                        label=f"{alg}: mean client")
        if key == "alpha":
            ax.set_xscale("log")
            ax2.set_xscale("log")
            ax.set_ylabel("aggregate minus mean-client test accuracy")
            ax2.set_ylabel("client_weight_spread (final round)")
            ax2.set_yscale("log")
            ax2.set_xlabel(xlabel)
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=8)
        else:
            ax.set_ylabel("test accuracy, final round")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths += _save(plt, fig, os.path.join(logdir, fname))
    return paths


def _sweep_value(row, key):
    """The row's x in a sweep figure; None for a row without one (a shards run has no alpha)."""
    if key == "alpha" and row["partition"] != "dirichlet":
        return 1e3 if row["partition"] == "iid" else None  # IID: alpha -> infinity, at the right
    return float(row[key])


def compare(base, algorithms, alphas=None, num_neighbors=None, topologies=None, ablation=False,
            target_accuracy=0.85, dropouts=None, codecs=None, weight_codecs=None):
    """Runs the plan, writing summary.csv after every run (a killed sweep keeps what finished).

    Returns:
        The summary rows (list of dicts).
    """
    runs = plan(base, algorithms, alphas, num_neighbors, topologies, ablation, dropouts, codecs,
                weight_codecs)
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
    figures = plot(base.logdir, histories, rows)
    if base.verbose:
        print(f"summary: {summary}" + "".join(f"\nfigure:  {p}" for p in figures))
    return rows
