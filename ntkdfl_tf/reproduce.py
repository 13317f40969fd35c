"""The paper's table at the paper's scale, in parts that resume.

Every run is 300 clients of ~200 samples (``experiment.PRESETS["paper_fast"]``: Jacobian batching
m = 6, XLA-compiled groups of 5 clients, one group in flight per CPU core), with the library's
default flow dopri5 (``BASE_FLOW``: every run but the flows part's used it; the preset itself
now takes rkc),
trained until the aggregate reaches 85% test accuracy or a round cap (NTK-DFL 40, baselines
250). Parts (``PARTS``):

- ``a0.1_s0``, ``a0.1_s1``, ``a0.1_s2``: alpha = 0.1, seeds 0, 1, 2; NTK-DFL with the tau
  grid and with tau = 100, DFedAvg, DFedAvgM, D-PSGD;
- ``a0.5``, ``iid``: the same algorithms at alpha = 0.5 and on an IID split, seed 0;
- ``<setting>_dispfl_dfedsam`` for each of those five settings: DisPFL and DFedSAM
  (``CAPPED_LABELS``), which at alpha = 0.1 run to the 250-round cap, in parts of their own so
  that every part fits in two hours here;
- ``kappa``: kappa = 2 and 10 at alpha = 0.1 (kappa = 5 is ``a0.1_s0``), NTK-DFL (tau grid)
  and DFedAvg;
- ``ablations``: a static ring against the redrawn graph (NTK-DFL and DFedAvg), and NTK-DFL
  without per-round averaging, at alpha = 0.1;
- ``flows``: NTK-DFL (tau grid) at alpha = 0.1, seed 0, with the exact flow, the earlier
  default (adaptive Euler) and Runge-Kutta-Chebyshev, and the last at seeds 1 and 2 too (the
  default flow, dopri5, is ``a0.1_s<seed>``'s run);
- ``unbatched``: the same without Jacobian batching (m = 1, one kernel over each whole
  neighbourhood, as the reference's ``main.py`` runs it), to tell how much of the difference
  from the paper's rounds the batching makes.

``QUICK`` is the subset of ``a0.1_s0`` that fits in half an hour here (the two NTK-DFL variants
and DFedAvg); it leaves out the other baselines, seeds, alphas, kappas and ablations.

``run_part`` trains each run into ``<logdir>/<run>/`` (checkpoints, history, TensorBoard) and,
as each finishes, appends its summary to ``<results>/runs.csv``, copies its history to
``<results>/histories/<run>.csv`` and rewrites ``<results>/tables.md`` and the figures, so a
part's results can be committed as they arrive. A killed part resumes: finished runs are
skipped (they are in runs.csv), an unfinished one continues from its checkpoint.
"""

import collections
import dataclasses
import os
import shutil
import statistics
import time
import typing

import numpy as np

from ntkdfl_tf import compare, data, experiment, io
from ntkdfl_tf.callbacks.history_csv import read_history
from ntkdfl_tf.io import atomic_open, read_csv, save_figure, write_csv

TARGET = 0.85
BASE_JACOBIAN_BATCHES = experiment.PRESETS["paper_fast"]["jacobian_batches"]
# The flow of every run but the flows part's variants: the one all committed runs used.
BASE_FLOW = "dopri5"
ROUND_CAPS = {"ntk_dfl": 40}
BASELINE_ROUND_CAP = 250
CHECKPOINT_ROUNDS = (1, 5, 10, 20)
# Every client model is evaluated every 10th round and on the last (the one reaching 85% or
# the cap): at 300 clients that pass costs ~5 s, more than a D-PSGD round's training.
CLIENT_METRICS_EVERY = 10

# (run label, algorithm, Config overrides): the algorithms of a full setting.
ALGORITHMS = (("ntk_dfl_grid", "ntk_dfl", {}),
              ("ntk_dfl_tau100", "ntk_dfl", {"taus": (100,)}),
              ("dfedavg", "dfedavg", {}), ("dfedavgm", "dfedavgm", {}),
              ("dpsgd", "dpsgd", {}), ("dispfl", "dispfl", {}), ("dfedsam", "dfedsam", {}))
# The flow part's and the unbatched part's variants of the tau-grid run.
FLOWS = (("ntk_dfl_grid_exact", "ntk_dfl", {"flow": "exact"}),
         ("ntk_dfl_grid_euler", "ntk_dfl", {"flow": "euler_adaptive"}),
         ("ntk_dfl_grid_rkc", "ntk_dfl", {"flow": "rkc"}))
# The flows that also run at seeds 1 and 2: the candidates for paper_fast's flow.
FLOWS_ALL_SEEDS = ("ntk_dfl_grid_rkc",)
UNBATCHED = (("ntk_dfl_grid_m1", "ntk_dfl", {"jacobian_batches": 1}),)
VARIANTS = FLOWS + UNBATCHED
LABELS = tuple(label for label, _, _ in ALGORITHMS + VARIANTS)
# The full settings, each a part without and a part with CAPPED_LABELS.
SETTINGS = {"a0.1_s0": dict(alpha=0.1, seed=0), "a0.1_s1": dict(alpha=0.1, seed=1),
            "a0.1_s2": dict(alpha=0.1, seed=2), "a0.5": dict(alpha=0.5, seed=0),
            "iid": dict(partition="iid", seed=0)}
CAPPED_LABELS = ("dispfl", "dfedsam")
UNCAPPED_LABELS = tuple(label for label, _, _ in ALGORITHMS if label not in CAPPED_LABELS)
CAPPED_SUFFIX = "_dispfl_dfedsam"
PARTS = (*(p for s in SETTINGS for p in (s, s + CAPPED_SUFFIX)), "kappa", "ablations", "flows",
         "unbatched")
QUICK = ("ntk_dfl_grid_a0.1_k5_s0", "ntk_dfl_tau100_a0.1_k5_s0", "dfedavg_a0.1_k5_s0")
QUICK_LEAVES_OUT = ("DFedAvgM, D-PSGD, DisPFL and DFedSAM; seeds 1 and 2; alpha = 0.5 and IID; "
                    "kappa 2 and 10; the ring and no-averaging ablations; the exact, Euler and "
                    "RKC flows; NTK-DFL without Jacobian batching")

# The paper's rounds to 85% (Fashion-MNIST, 300 clients, kappa = 5); None: not reported.
# ">200" is DisPFL's entry at alpha = 0.1.
PAPER_ROUNDS = {("0.1", "ntk_dfl_grid"): "18", ("0.1", "dfedavg"): "83",
                ("0.1", "dfedavgm"): "86", ("0.1", "dpsgd"): "125", ("0.1", "dispfl"): ">200",
                ("0.5", "ntk_dfl_grid"): "17", ("0.5", "dfedavg"): "31",
                ("iid", "ntk_dfl_grid"): "12", ("iid", "dfedavg"): "18"}

FIELDS = ("run", "part", "label", "algorithm", "alpha", "num_neighbors", "topology",
          "per_round_averaging", "seed", "rounds", "round_cap", "rounds_to_target",
          "train_seconds_to_target", "bytes_to_target",
          *(f"accuracy_r{r}" for r in CHECKPOINT_ROUNDS), "final_accuracy",
          "final_client_mean_accuracy", "final_client_local_accuracy", "aggregate_gain",
          "median_round_seconds", "train_seconds", "wall_seconds")


class Run(typing.NamedTuple):
    """One training run of the reproduction.

    Attributes:
        part: the part it belongs to (``PARTS``).
        label: the algorithm variant (``ALGORITHMS``' first column).
        config: its full ``experiment.Config`` (logdir and save_dir included).
    """

    part: str
    label: str
    config: experiment.Config

    @property
    def name(self):
        return run_name(self.label, self.config)


def run_name(label, cfg):
    """``<label>_a<alpha|iid>_k<kappa>[_ring][_noavg]_s<seed>``, unique across parts."""
    alpha = "iid" if cfg.partition == "iid" else f"{cfg.alpha:g}"
    name = f"{label}_a{alpha}_k{cfg.num_neighbors}"
    if cfg.topology != "random":
        name += f"_{cfg.topology}"
    if not cfg.per_round_averaging:
        name += "_noavg"
    return f"{name}_s{cfg.seed}"


def _setting(part, base, logdir, max_rounds, labels=None, variants=ALGORITHMS, **overrides):
    out = []
    for label, algorithm, extra in variants:
        if labels is not None and label not in labels:
            continue
        cfg = dataclasses.replace(base, algorithm=algorithm, **overrides, **extra)
        cfg = dataclasses.replace(
            cfg, rounds=min(ROUND_CAPS.get(algorithm, BASELINE_ROUND_CAP), max_rounds),
            stop_at_accuracy=TARGET,
            logdir=os.path.join(logdir, run_name(label, cfg)),
            save_dir=os.path.join(logdir, run_name(label, cfg)), run_name="model")
        out.append(Run(part, label, cfg))
    return out


def _part_runs(part, base, logdir, max_rounds):
    if part in SETTINGS:
        return _setting(part, base, logdir, max_rounds, UNCAPPED_LABELS, **SETTINGS[part])
    if part.endswith(CAPPED_SUFFIX):
        return _setting(part, base, logdir, max_rounds, CAPPED_LABELS,
                        **SETTINGS[part[:-len(CAPPED_SUFFIX)]])
    pair = ("ntk_dfl_grid", "dfedavg")
    if part == "kappa":
        return [r for k in (2, 10) for r in _setting(part, base, logdir, max_rounds, pair,
                                                     alpha=0.1, seed=0, num_neighbors=k)]
    if part == "flows":
        return _setting(part, base, logdir, max_rounds, variants=FLOWS, alpha=0.1, seed=0) + [
            r for seed in (1, 2) for r in _setting(part, base, logdir, max_rounds,
                                                   FLOWS_ALL_SEEDS, FLOWS, alpha=0.1, seed=seed)]
    if part == "unbatched":
        return _setting(part, base, logdir, max_rounds, variants=UNBATCHED, alpha=0.1, seed=0)
    # ablations
    return (_setting(part, base, logdir, max_rounds, pair, alpha=0.1, seed=0,
                     topology="ring") +
            _setting(part, base, logdir, max_rounds, ("ntk_dfl_grid",), alpha=0.1, seed=0,
                     per_round_averaging=False))


def base_config(**overrides):
    """The Config every run starts from: the ``paper_fast`` preset (300 clients, kappa = 5,
    ~200 samples per client, m = 6) with ``BASE_FLOW``, one line per round, client models
    evaluated every ``CLIENT_METRICS_EVERY`` rounds; ``overrides`` replace fields (for example
    ``num_clients`` for a small check, or ``data_dir``)."""
    values = {**experiment.PRESETS["paper_fast"], "flow": BASE_FLOW, "verbose": 2,
              "client_metrics_every": CLIENT_METRICS_EVERY, **overrides}
    values.pop("logdir", None)
    return experiment.Config(**values)


def runs(parts, base, logdir, quick=False, max_rounds=None, labels=None):
    """The runs of ``parts`` (names from ``PARTS``; ``quick``: only ``QUICK``'s runs).

    Args:
        max_rounds: a lower round cap for every run (a smoke test; not the reproduction).
        labels: only the runs with these labels (``LABELS``), in the part's order, so the
            cheap rows of several parts can go first; None: all.

    Raises:
        ValueError: an unknown part or label, ``quick`` with parts that hold none of
            ``QUICK``, or a label that none of the parts' runs has.
    """
    if labels is not None:
        unknown = [x for x in labels if x not in LABELS]
        if unknown:
            raise ValueError(f"unknown run label {unknown[0]!r}; choose from "
                             f"{', '.join(LABELS)}.")
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)} (or "
                             f"--quick for the half-hour subset).")
    if max_rounds is not None and max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds!r} must be >= 1 (or None for the caps "
                         f"{ROUND_CAPS} and {BASELINE_ROUND_CAP}).")
    cap = max_rounds or BASELINE_ROUND_CAP
    out = [r for part in parts for r in _part_runs(part, base, logdir, cap)]
    if labels is not None:
        absent = [x for x in labels if all(r.label != x for r in out)]
        if absent:  # e.g. dispfl asked of a0.5, whose DisPFL run is in a0.5_dispfl_dfedsam
            holders = [p for p in PARTS if any(r.label == absent[0]
                                               for r in _part_runs(p, base, logdir, cap))]
            raise ValueError(f"parts {', '.join(parts)} hold no run labelled {absent[0]!r}; "
                             f"it is in part(s) {', '.join(holders)}: add one to --part or "
                             f"drop the label.")
        out = [r for r in out if r.label in labels]
    if quick:
        out = [r for r in out if r.name in QUICK]
        if not out:
            raise ValueError(f"--quick runs {', '.join(QUICK)}, all in part a0.1_s0; drop "
                             f"--part or include a0.1_s0, and keep one of their labels.")
    return out


def summarise(run, history, wall_seconds):
    """One row of runs.csv (``FIELDS``) from a run's full history (``read_history``); the
    figures to the target come from ``compare.summarise``."""
    cfg = run.config
    common = compare.summarise(run.name, cfg, history, wall_seconds, TARGET)
    acc = history["val_accuracy"]
    seconds = np.asarray(history["round_seconds"])
    reached = common["rounds_to_target"]
    row = {"run": run.name, "part": run.part, "label": run.label, "algorithm": cfg.algorithm,
           "alpha": "iid" if cfg.partition == "iid" else cfg.alpha,
           "num_neighbors": cfg.num_neighbors, "topology": cfg.topology,
           "per_round_averaging": int(cfg.per_round_averaging), "seed": cfg.seed,
           "rounds": common["rounds"], "round_cap": cfg.rounds, "rounds_to_target": reached,
           "train_seconds_to_target": "" if reached == "" else
           round(float(seconds[:reached].sum()), 1),
           "bytes_to_target": common["bytes_to_target"],
           "final_accuracy": common["final_accuracy"],
           "final_client_mean_accuracy": history.get("val_client_mean_accuracy", [""])[-1],
           "final_client_local_accuracy": history.get("val_client_local_accuracy", [""])[-1],
           "aggregate_gain": common["aggregate_gain"]
           if "val_client_mean_accuracy" in history else "",
           "median_round_seconds": round(float(np.median(seconds)), 2),
           "train_seconds": round(float(seconds.sum()), 1),
           "wall_seconds": common["wall_seconds"]}
    for r in CHECKPOINT_ROUNDS:
        row[f"accuracy_r{r}"] = float(acc[r - 1]) if len(acc) >= r else ""
    return row


def run_part(todo, results, dataset=None, progress=print):
    """Trains every run of ``todo`` not yet in ``<results>/runs.csv``; returns all rows.

    Args:
        todo: ``Run``s (``runs``).
        results: the folder of runs.csv, histories/, tables.md and the figures.
        dataset: ``data.load``'s result, or None to load ``todo``'s dataset once.
        progress: called with one line per run started (runs done / to do).
    """
    for r in todo:  # every configuration checked before the first (long) run starts
        experiment.validate(r.config)
    runs_csv = os.path.join(results, "runs.csv")
    os.makedirs(os.path.join(results, "histories"), exist_ok=True)
    done = {row["run"] for row in read_csv(runs_csv)}
    left = [r for r in todo if r.name not in done]
    if left and dataset is None:
        dataset = data.load(left[0].config.dataset, data_dir=left[0].config.data_dir)
    for i, r in enumerate(left):
        progress(f"[reproduce {len(todo) - len(left) + i + 1}/{len(todo)}] {r.name} "
                 f"(part {r.part}, to {TARGET:.0%} or round {r.config.rounds})")
        start = time.perf_counter()
        experiment.run(r.config, dataset=dataset)
        history_csv = os.path.join(r.config.logdir, "history.csv")
        row = summarise(r, read_history(history_csv), time.perf_counter() - start)
        io.copy_file(history_csv, os.path.join(results, "histories", f"{r.name}.csv"))
        write_csv(runs_csv, [x for x in read_csv(runs_csv) if x["run"] != r.name] + [row],
                  FIELDS)
        write_outputs(results, read_csv(runs_csv))
    rows = read_csv(runs_csv)
    write_outputs(results, rows)
    return rows


def _fmt_rounds(rows):
    """Rounds to 85% over seeds: ``n`` (one seed), ``mean ± sd`` or ``> cap``."""
    if not rows:
        return "—"
    got = [int(r["rounds_to_target"]) for r in rows if r["rounds_to_target"] != ""]
    if len(got) < len(rows):
        missing = len(rows) - len(got)
        cap = max(int(r["round_cap"]) for r in rows)
        if not got:
            final = _median(rows, "final_accuracy", _acc)
            return f"> {cap}" + ("" if final == "—" else f" ({final} at the cap)")
        return f"{_mean_sd(got)} ({missing} of {len(rows)} seeds > {cap})"
    return _mean_sd(got)


def _mean_sd(values):
    if len(values) == 1:
        return str(values[0])
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _median(rows, key, fmt):
    values = [float(r[key]) for r in rows if r.get(key, "") != ""]
    return fmt(statistics.median(values)) if values else "—"


def _gb(value):
    return f"{value / 1e9:.1f}"


def _acc(value):
    return f"{value:.3f}"


_MEASURES = ("rounds to 85%", "accuracy r1 / r5 / r10 / r20", "train s to 85%", "GB to 85%",
             "s / round", "aggregate − mean client")


def _measures(rows):
    """The cells of ``_MEASURES`` over ``rows`` (one run, or a setting's seeds: medians)."""
    return [_fmt_rounds(rows),
            " / ".join(_median(rows, f"accuracy_r{k}", _acc) for k in CHECKPOINT_ROUNDS),
            _median(rows, "train_seconds_to_target", lambda v: f"{v:.0f}"),
            _median(rows, "bytes_to_target", _gb),
            _median(rows, "median_round_seconds", lambda v: f"{v:.1f}"),
            _median(rows, "aggregate_gain", lambda v: f"{v:+.3f}")]


def _table(head, lines):
    """Markdown table rows from a header's cells and each line's cells."""
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
            ["| " + " | ".join(cells) + " |" for cells in lines])


def _setting_table(rows, alpha):
    """One markdown table: a row per algorithm variant of the setting's rows."""
    lines = []
    for label, _, _ in ALGORITHMS:
        mine = [r for r in rows if r["label"] == label]
        if mine:
            rounds, *rest = _measures(mine)
            lines.append([label, rounds, str(PAPER_ROUNDS.get((alpha, label), "—")), *rest,
                          _median(mine, "final_client_local_accuracy", _acc),
                          ", ".join(sorted(r["seed"] for r in mine))])
    head = ("algorithm", _MEASURES[0], "paper", *_MEASURES[1:], "client on own test dist.",
            "seeds")
    return _table(head, lines)


def _ratio(rows, alpha):
    """DFedAvg / NTK-DFL (tau grid) in mean rounds to 85%, over the seeds where both reached it."""
    def rounds(label):  # seed -> rounds to 85%
        return {r["seed"]: int(r["rounds_to_target"]) for r in rows
                if r["label"] == label and r["rounds_to_target"] != ""}
    ntk, dfedavg = rounds("ntk_dfl_grid"), rounds("dfedavg")
    seeds = sorted(set(ntk) & set(dfedavg))
    if not seeds:
        return None
    ratio = statistics.mean(dfedavg[s] for s in seeds) / statistics.mean(ntk[s] for s in seeds)
    paper = {"0.1": 83 / 18, "0.5": 31 / 17, "iid": 18 / 12}[alpha]
    return (f"DFedAvg / NTK-DFL (τ grid), rounds to 85%: **{ratio:.1f}x** over seed"
            f"{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} (paper: {paper:.1f}x).")


def tables(rows):
    """tables.md: one table per alpha, the kappa sweep, the tau-grid variants, the ablations
    and each part's wall time.

    Args:
        rows: runs.csv rows, as read (text) or as ``summarise`` returns them (numbers).
    """
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    out = []
    main = _main_rows(rows)
    for alpha, title in (("0.1", "α = 0.1 (seeds 0, 1, 2)"), ("0.5", "α = 0.5 (seed 0)"),
                         ("iid", "IID (seed 0)")):
        mine = [r for r in main if _alpha_key(r["alpha"]) == alpha]
        if not mine:
            continue
        out += [f"#### {title}", ""] + _setting_table(mine, alpha)
        ratio = _ratio(mine, alpha)
        out += ["", ratio, ""] if ratio else [""]
    sweep = [r for r in rows if _alpha_key(r["alpha"]) == "0.1" and r["seed"] == "0" and
             r["topology"] == "random" and r["per_round_averaging"] == "1" and
             r["label"] in ("ntk_dfl_grid", "dfedavg")]
    if any(r["num_neighbors"] != "5" for r in sweep):
        ordered = sorted(sweep, key=lambda r: (int(r["num_neighbors"]), r["label"]))
        out += ["#### κ at α = 0.1 (seed 0)", ""] + _table(
            ("κ", "algorithm", *_MEASURES),
            [[r["num_neighbors"], r["label"], *_measures([r])] for r in ordered]) + [""]
    variants = _variant_rows(main)
    if any(r["label"] != "ntk_dfl_grid" for r in variants):
        settings = {label: extra for label, _, extra in VARIANTS}

        def setting(r):
            extra = settings.get(r["label"], {})
            return (f"{extra.get('flow', BASE_FLOW)}, m = "
                    f"{extra.get('jacobian_batches', BASE_JACOBIAN_BATCHES)}")

        out += ["#### Variants of NTK-DFL's τ-grid run (α = 0.1)", ""] + _table(
            ("run", "flow, Jacobian batches m", *_MEASURES),
            [[r["run"], setting(r), *_measures([r])] for r in variants]) + [""]
    abl = [r for r in rows if r["topology"] != "random" or r["per_round_averaging"] == "0"]
    if abl:
        out += ["#### Ablations at α = 0.1 (seed 0)", ""] + _table(
            ("run", *_MEASURES, "final accuracy"),
            [[r["run"], *_measures([r]), _median([r], "final_accuracy", _acc)]
             for r in abl]) + [""]
    return "\n".join(out + _parts_table(rows))


def _main_rows(rows):
    """The rows of the main setting: kappa = 5 on the redrawn graph, with averaging."""
    return [r for r in rows if r["num_neighbors"] == "5" and r["topology"] == "random" and
            r["per_round_averaging"] == "1"]


def _variant_rows(setting_rows):
    """The tau-grid variants' rows and the default run's at the same seeds.

    Args:
        setting_rows: ``_main_rows``' rows.

    Returns:
        The rows at alpha = 0.1 by seed, then in ``VARIANTS``' order with the default first.
    """
    order = ("ntk_dfl_grid",) + tuple(label for label, _, _ in VARIANTS)
    mine = [r for r in setting_rows if _alpha_key(r["alpha"]) == "0.1" and r["label"] in order]
    seeds = {r["seed"] for r in mine if r["label"] != "ntk_dfl_grid"}
    return sorted((r for r in mine if r["seed"] in seeds),
                  key=lambda r: (int(r["seed"]), order.index(r["label"])))


def _parts_table(rows):
    """Each part's runs so far and the hours they took: per run its ``wall_seconds`` (training,
    evaluation and checkpoints of the invocation that finished it), or its ``train_seconds``
    over all rounds when larger (a run resumed near its end)."""
    done = [p for p in PARTS if any(r.get("part") == p for r in rows)]
    if not done:
        return []
    out = ["#### Parts: runs done and wall time", "",
           "A run resumed from a checkpoint counts the evaluation of its last invocation only.",
           "", "| part | runs | wall hours |", "|---|---|---|"]
    for p in done:
        mine = [r for r in rows if r.get("part") == p]
        hours = sum(max(float(r.get("wall_seconds") or 0), float(r.get("train_seconds") or 0))
                    for r in mine) / 3600
        counts = collections.Counter(r["label"] for r in mine)  # first-seen order
        named = [x + (f" ×{n}" if n > 1 else "") for x, n in counts.items()]
        out.append(f"| {p} | {', '.join(named)} | {hours:.2f} |")
    return out + [""]


def _alpha_key(value):
    return "iid" if value == "iid" else f"{float(value):g}"


def write_outputs(results, rows):
    """tables.md and the accuracy figures (one per alpha, one of the variants) under
    ``results``."""
    with atomic_open(os.path.join(results, "tables.md"), "w") as f:
        f.write(tables(rows))
    plot(results, rows)


def plot(results, rows):
    """``accuracy_a<alpha>.png``: aggregate accuracy per round of every algorithm's seed-0,
    kappa-5 run of each alpha; ``accuracy_variants.png``: the tau-grid run's variants at
    alpha = 0.1, seed 0, beside it; returns the paths ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    main = [r for r in _main_rows(rows) if r["seed"] == "0"]
    algorithms = [label for label, _, _ in ALGORITHMS]
    figures = [(f"accuracy_a{alpha}.png", [r for r in main if _alpha_key(r["alpha"]) == alpha
                                           and r["label"] in algorithms],
                f"300 clients, κ = 5, {'IID' if alpha == 'iid' else f'α = {alpha}'}", "log")
               for alpha in ("0.1", "0.5", "iid")]
    variants = _variant_rows(main)
    if any(r["label"] != "ntk_dfl_grid" for r in variants):
        figures.append(("accuracy_variants.png", variants,
                        "NTK-DFL, τ grid: flows and batching (300 clients, κ = 5, α = 0.1)",
                        "linear"))
    paths = []
    for name, mine, title, xscale in figures:
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in mine:
            acc = read_history(os.path.join(results, "histories", f"{r['run']}.csv"))[
                "val_accuracy"]
            ax.plot(np.arange(1, len(acc) + 1), acc, label=r["label"],
                    marker="." if xscale == "linear" else None)
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale(xscale)
        ax.set_xlabel("communication round")
        ax.set_ylabel("aggregated model test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(results, name)
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


BEGIN, END = io.block_markers("reproduce", "launchers/reproduce.py")


def update_markdown(path, text):
    """Replaces the reproduction's generated block of ``path`` with ``text``
    (``io.update_markdown``)."""
    io.update_markdown(path, text, BEGIN, END)
