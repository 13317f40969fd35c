"""The Byzantine experiment: attacks x defences x algorithms, run in parts that resume.

``run_part(base, part)`` runs every cell of one part into ``<logdir>/<cell>/`` (history.csv,
TensorBoard events, checkpoints) and then rewrites ``<logdir>/matrix.csv`` (one row per cell
finished so far, every part) and ``<logdir>/heatmap.png``. A killed part resumes: finished
cells are skipped, an unfinished one continues from its checkpoint. Parts:

- ``no_attack``: every defence without Byzantine clients (what a defence costs);
- ``attacks``: every attack x every defence at ``fraction`` (package attacks and the
  package screen for NTK-DFL only);
- ``fractions``: 0 / 10 / 20 / 30% for each algorithm's strongest attack, undefended and
  with its best defence (both read from the ``attacks`` rows, or given);
- ``seeds``: seeds 0, 1, 2 and alpha = 0.5 for the headline cells (no attack, strongest
  attack undefended, strongest attack with the best defence);
- ``dpsgd``: D-PSGD against its strongest weight attack (DFedAvg's), undefended and defended.
"""

import dataclasses
import os
import time
import typing

import numpy as np

from ntkdfl_tf import data, experiment
from ntkdfl_tf.errors import DivergenceError
from ntkdfl_tf.callbacks.history_csv import read_history
from ntkdfl_tf.io import (atomic_open, block_markers, copy_file, read_csv, save_figure,
                          update_markdown, write_csv)

PARTS = ("no_attack", "attacks", "fractions", "seeds", "dpsgd")
WEIGHT_DEFENCES = ("none", "median", "trimmed_mean", "clipping", "balance")
NTK_DEFENCES = WEIGHT_DEFENCES + ("screen", "clipping+screen", "balance+screen")
WEIGHT_ATTACKS = (("sign_flip", ""), ("gaussian", ""), ("scaling", ""), ("alie", ""),
                  ("ipm", "epsilon=0.1"), ("ipm", "epsilon=100"), ("dissensus", ""),
                  ("adaptive", ""))
PACKAGE_ATTACKS = (("jacobian_scale", ""), ("jacobian_sign_flip", ""), ("logit_shift", ""),
                   ("label_flip", ""), ("jacobian_noise", ""))
FIELDS = ("cell", "part", "algorithm", "attack", "attack_params", "defence", "fraction", "seed",
          "alpha", "rounds", "honest_aggregate", "honest_client_mean", "honest_worst10",
          "aggregate", "aggregate_kept", "aggregate_kept_byzantine", "delta_max_mean",
          "delta_max_max", "packages_dropped", "packages_clipped", "bytes_sent",
          "wall_seconds", "diverged_round")


class Cell(typing.NamedTuple):
    """One run of the matrix."""

    algorithm: str
    attack: str
    attack_params: str
    defence: str
    fraction: float
    seed: int = 0
    alpha: float = 0.1

    @property
    def name(self):
        params = self.attack_params.replace("=", "").replace(",", "_")
        return (f"{self.algorithm}_{self.attack}{params}_{self.defence.replace('+', '-')}_"
                f"f{self.fraction:g}_s{self.seed}_a{self.alpha:g}")


def attacks_for(algorithm):
    """The attacks of the matrix for ``algorithm`` (package attacks: NTK-DFL only)."""
    return WEIGHT_ATTACKS + (PACKAGE_ATTACKS if algorithm == "ntk_dfl" else ())


def defences_for(algorithm):
    return NTK_DEFENCES if algorithm == "ntk_dfl" else WEIGHT_DEFENCES


def cells(part, algorithms=("ntk_dfl", "dfedavg"), fraction=0.2, headline=None):
    """The cells of ``part``.

    Args:
        headline: ``{algorithm: (attack, attack_params, best_defence)}`` for the parts that
            need the strongest attack and best defence (``headline_from``).
    """
    if part not in PARTS:
        raise ValueError(f"Unknown part {part!r}; choose one of {', '.join(PARTS)}.")
    out = []
    for alg in algorithms:
        if part == "no_attack":
            out += [Cell(alg, "none", "", d, 0.0) for d in defences_for(alg)]
        elif part == "attacks":
            out += [Cell(alg, a, p, d, fraction) for a, p in attacks_for(alg)
                    for d in defences_for(alg)]
        elif part in ("fractions", "seeds"):
            attack, params, best = _headline(headline, alg)
            if part == "fractions":
                out += [Cell(alg, attack, params, d, f) for f in (0.1, 0.2, 0.3)
                        for d in ("none", best)]
                out += [Cell(alg, "none", "", d, 0.0) for d in ("none", best)]
            else:
                heads = [("none", "", "none", 0.0), ("none", "", best, 0.0),
                         (attack, params, "none", fraction), (attack, params, best, fraction)]
                out += [Cell(alg, a, p, d, f, seed, alpha) for a, p, d, f in heads
                        for seed, alpha in ((1, 0.1), (2, 0.1), (0, 0.5))]
    if part == "dpsgd":
        attack, params, best = _headline(headline, "dfedavg")
        out = [Cell("dpsgd", attack, params, d, fraction) for d in ("none", best)]
        out += [Cell("dpsgd", "none", "", "none", 0.0)]
    return out


def _headline(headline, algorithm):
    if not headline or algorithm not in headline:
        raise ValueError(f"this part needs the strongest attack and best defence of "
                         f"{algorithm}: run the 'attacks' part first (or pass them).")
    return headline[algorithm]


def headline_from(rows):
    """``{algorithm: (attack, params, best_defence)}`` from the ``attacks`` part's rows.

    The strongest attack is the one with the lowest undefended honest aggregate; the best
    defence the one whose worst honest aggregate over every attack is highest, among the
    defences measured against every attack that was measured undefended (a defence missing
    an attack's cell would be judged on the easier attacks only). An algorithm without such a
    defence yet is left out, so the parts that need it still fail with a clear message.
    """
    out = {}
    for alg in sorted({r["algorithm"] for r in rows if r["part"] == "attacks"}):
        mine = [r for r in rows if r["part"] == "attacks" and r["algorithm"] == alg]
        undefended = [r for r in mine if r["defence"] == "none"]
        if not undefended:
            continue
        worst = min(undefended, key=lambda r: float(r["honest_aggregate"]))
        attacks = {(r["attack"], r["attack_params"]) for r in undefended}
        by_defence = {}
        for r in mine:
            if (r["attack"], r["attack_params"]) in attacks:
                by_defence.setdefault(r["defence"], {})[r["attack"], r["attack_params"]] = \
                    float(r["honest_aggregate"])
        complete = {d: list(v.values()) for d, v in by_defence.items()
                    if d != "none" and len(v) == len(attacks)}
        if not complete:
            continue
        best = max(complete, key=lambda d: (min(complete[d]), np.mean(complete[d])))
        out[alg] = (worst["attack"], worst["attack_params"], best)
    return out


def parse_headline(text):
    """``"ntk_dfl=jacobian_sign_flip/balance+screen,dfedavg=ipm:epsilon=100/clipping"`` ->
    ``{algorithm: (attack, attack_params, best_defence)}``, the form ``headline_from`` gives
    (for the parts that need it before the ``attacks`` part is complete)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        alg, _, rest = item.partition("=")
        attack, slash, defence = rest.rpartition("/")
        attack, _, params = attack.partition(":")
        if not (alg and attack and slash and defence):
            raise ValueError(f"headline item {item!r}: write algorithm=attack[:params]/defence, "
                             "e.g. ntk_dfl=jacobian_sign_flip/balance+screen.")
        if attack not in dict(attacks_for(alg)) or defence not in defences_for(alg):
            raise ValueError(f"headline item {item!r}: {alg} has no attack {attack!r} or "
                             f"defence {defence!r} in the matrix; attacks: "
                             f"{', '.join(dict(attacks_for(alg)))}; defences: "
                             f"{', '.join(defences_for(alg))}.")
        out[alg] = (attack, params, defence)
    return out


def config(base, cell, logdir):
    """The ``experiment.Config`` of ``cell`` under ``base`` (a defended cell also takes the
    robust final aggregate)."""
    return dataclasses.replace(
        base, algorithm=cell.algorithm, attack=cell.attack, attack_params=cell.attack_params,
        byzantine_fraction=cell.fraction, defence=cell.defence,
        final_aggregation="mean" if cell.defence == "none" else "robust",
        seed=cell.seed, alpha=cell.alpha, logdir=os.path.join(logdir, cell.name),
        save_dir=os.path.join(logdir, cell.name), run_name="model", stop_at_accuracy=0.0)


def summarise(cell, part, history, seconds, diverged_round=None):
    """One ``matrix.csv`` row from a finished run's history (dict of lists).

    ``diverged_round``: the round in which the run raised ``DivergenceError`` (its history then
    ends the round before; the accuracies are that round's), or None.
    """
    h = {k: np.asarray(v, np.float64) for k, v in history.items()}

    def last(key, fallback=None):
        if key not in h and fallback is not None:  # no attack, no defence: all are honest
            key = fallback
        return float(h[key][-1]) if key in h and len(h[key]) else ""

    def mean(key):
        return float(np.mean(h[key])) if key in h and len(h[key]) else ""

    return {"cell": cell.name, "part": part, "algorithm": cell.algorithm,
            "attack": cell.attack, "attack_params": cell.attack_params,
            "defence": cell.defence, "fraction": cell.fraction, "seed": cell.seed,
            "alpha": cell.alpha, "rounds": len(h.get("val_accuracy", [])),
            "honest_aggregate": last("val_honest_accuracy", "val_accuracy"),
            "honest_client_mean": last("val_honest_client_mean_accuracy",
                                       "val_client_mean_accuracy"),
            "honest_worst10": last("val_honest_client_worst10_accuracy",
                                   "val_client_worst10_accuracy"),
            "aggregate": last("val_accuracy"), "aggregate_kept": last("aggregate_kept"),
            "aggregate_kept_byzantine": last("aggregate_kept_byzantine"),
            "delta_max_mean": mean("byzantine_share_max"),
            "delta_max_max": float(np.max(h["byzantine_share_max"]))
            if "byzantine_share_max" in h else "",
            "packages_dropped": mean("packages_dropped"),
            "packages_clipped": mean("packages_clipped"),
            "bytes_sent": float(np.sum(h["bytes_sent"])) if "bytes_sent" in h else "",
            "wall_seconds": round(seconds, 1),
            "diverged_round": "" if diverged_round is None else int(diverged_round)}


def write_rows(path, rows):
    write_csv(path, rows, FIELDS)


def run_part(base, part, algorithms=("ntk_dfl", "dfedavg"), fraction=0.2, headline=None,
             only=None):
    """Runs ``part`` (module docstring) under ``base.logdir``; returns every row so far.

    Args:
        base: the ``experiment.Config`` every cell starts from (clients, rounds, NTK-DFL's
            taus and batching ...).
        headline: overrides ``headline_from`` for the parts that need it.
        only: run just the cells whose name contains this text (a slice of a part).
    """
    logdir = base.logdir
    matrix_csv = os.path.join(logdir, "matrix.csv")
    rows = read_csv(matrix_csv)
    headline = headline or headline_from(rows)
    todo = [c for c in cells(part, algorithms, fraction, headline)
            if only is None or only in c.name]
    for c in todo:  # every configuration checked before the first (long) run starts
        experiment.validate(config(base, c, logdir))
    done = {r["cell"] for r in rows}
    dataset = data.load(base.dataset, data_dir=base.data_dir)
    for i, c in enumerate(todo):
        if c.name in done:
            continue
        print(f"[{part} {i + 1}/{len(todo)}] {c.name}", flush=True)
        start = time.perf_counter()
        history_csv = os.path.join(logdir, c.name, "history.csv")
        diverged = None
        this_process = {}
        try:
            _, fitted = experiment.run(config(base, c, logdir), dataset=dataset)
            this_process = fitted.history
        except DivergenceError as e:
            # an attack that makes the honest models blow up has won: that is the cell's
            # result (the rounds before it are its history), not a reason to stop the part
            print(f"[{part}] {c.name}: {e}", flush=True)
            diverged = e.round
        # history.csv holds every round, also those of a run killed and resumed here, whose
        # Keras History starts at the resumed round; their round times join the wall time
        history = read_history(history_csv) if os.path.exists(history_csv) else this_process
        earlier = len(history.get("val_accuracy", [])) - len(this_process.get("val_accuracy", []))
        seconds = time.perf_counter() - start + (
            float(np.sum(history["round_seconds"][:earlier]))
            if this_process and earlier > 0 and "round_seconds" in history else 0.0)
        rows = [r for r in read_csv(matrix_csv) if r["cell"] != c.name]
        rows.append(summarise(c, part, history, seconds, diverged))
        write_rows(matrix_csv, rows)
    heatmap(rows, os.path.join(logdir, "heatmap.png"))
    with atomic_open(os.path.join(logdir, "matrix.md"), "w") as f:
        f.write(matrix_text(rows, headline))
    return rows


def table(rows):
    """The ``attacks`` and ``no_attack`` rows as one markdown table per algorithm: honest
    aggregate / worst-10% honest client accuracy at the last round, attack x defence."""
    rows = [r for r in rows if r["part"] in ("attacks", "no_attack") and int(r["seed"]) == 0 and
            float(r["alpha"]) == 0.1]
    out = []
    for alg in sorted({r["algorithm"] for r in rows}):
        defs = list(defences_for(alg))
        out += [f"**{alg}** (honest aggregate / worst-10% honest clients, last round)", "",
                "| attack | " + " | ".join(f"`{d}`" for d in defs) + " |",
                "|---|" + "---|" * len(defs)]
        for attack, params in (("none", ""),) + attacks_for(alg):
            cells = {r["defence"]: r for r in rows if r["algorithm"] == alg and
                     r["attack"] == attack and r["attack_params"] == params}
            if not cells:
                continue
            values = [_cell_text(cells[d]) if d in cells else "—" for d in defs]
            out.append(f"| {attack} {params} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def headline_tables(rows, headline=None, fraction=0.2):
    """The ``fractions``, ``seeds`` and ``dpsgd`` parts as markdown tables: the cells ``cells``
    names for each part, wherever they were run ("—" where a cell is not in ``rows``).

    Args:
        headline: as ``cells``; default ``headline_from(rows)``.
        fraction: the seeds part's Byzantine share, as ``cells``.
    """
    headline = headline or headline_from(rows)
    by_name = {r["cell"]: r for r in rows}

    def text(cell):
        return _cell_text(by_name[cell.name]) if cell.name in by_name else "—"

    def grouped(part_cells, key):
        groups = {}
        for c in part_cells:
            groups.setdefault(key(c), []).append(c)
        return groups.values()

    out = []
    for alg, (attack, params, _) in sorted(headline.items()):
        label = f"`{attack}{' ' + params if params else ''}`"
        out += [f"**{alg}, Byzantine fraction** (strongest attack {label}; honest aggregate / "
                "worst-10%, last round; fraction 0 is the no-attack cell)", "",
                "| defence | 0 | 0.1 | 0.2 | 0.3 |", "|---|---|---|---|---|"]
        for row in grouped(cells("fractions", (alg,), headline=headline), lambda c: c.defence):
            row = sorted(row, key=lambda c: c.fraction)
            out.append(f"| `{row[0].defence}` | " + " | ".join(map(text, row)) + " |")
        out += ["", f"**{alg}, seeds and alpha** (honest aggregate / worst-10%, last round; "
                "mean ± sd of the honest aggregate over the seeds measured)", "",
                "| cell | seed 0 | seed 1 | seed 2 | mean ± sd | alpha = 0.5 |",
                "|---|---|---|---|---|---|"]
        part_cells = cells("seeds", (alg,), fraction, headline)
        for group in grouped(part_cells, lambda c: c._replace(seed=0, alpha=0.1)):
            first = group[0]._replace(seed=0, alpha=0.1)  # seed 0 is the attacks part's cell
            seeds = [first] + [c for c in group if c.alpha == first.alpha]
            other = [c for c in group if c.alpha != first.alpha]
            accs = [float(by_name[c.name]["honest_aggregate"]) for c in seeds
                    if c.name in by_name and by_name[c.name]["honest_aggregate"] != ""]
            spread = (f"{np.mean(accs):.3f} ± {np.std(accs, ddof=1):.3f} ({len(accs)})"
                      if len(accs) > 1 else "—")
            values = [text(c) for c in seeds] + [spread] + [text(c) for c in other]
            out.append(f"| {first.attack} {first.attack_params} / `{first.defence}` | "
                       + " | ".join(values) + " |")
        out.append("")
    if "dfedavg" in headline:
        out += ["**dpsgd** (DFedAvg's strongest attack; honest aggregate / worst-10%)", "",
                "| attack | defence | result |", "|---|---|---|"]
        out += [f"| {c.attack} {c.attack_params} | `{c.defence}` | {text(c)} |"
                for c in cells("dpsgd", headline=headline)]
        out.append("")
    return "\n".join(out)


BEGIN, END = block_markers("byzantine", "ntkdfl-byzantine --export")


def export(logdir, dest, headline=None, results_md=None):
    """Copies a matrix's results into ``dest`` (e.g. ``docs/results/byzantine``): matrix.csv,
    each cell's history as ``histories/<cell>.csv``, matrix.md (every table) and heatmap.png;
    with ``results_md``, the tables also replace that file's ``BEGIN`` ... ``END`` block.
    Returns the rows."""
    rows = read_csv(os.path.join(logdir, "matrix.csv"))
    if not rows:
        raise ValueError(f"no matrix rows in {logdir!r}: run a part into it first.")
    os.makedirs(os.path.join(dest, "histories"), exist_ok=True)
    write_rows(os.path.join(dest, "matrix.csv"), rows)
    for r in rows:
        source = os.path.join(logdir, r["cell"], "history.csv")
        if os.path.exists(source):
            copy_file(source, os.path.join(dest, "histories", r["cell"] + ".csv"))
    heatmap(rows, os.path.join(dest, "heatmap.png"))
    text = matrix_text(rows, headline)
    with atomic_open(os.path.join(dest, "matrix.md"), "w") as f:
        f.write(text)
    if results_md:
        update_markdown(results_md, text, BEGIN, END)
    return rows


def matrix_text(rows, headline=None):
    """``table``, for the algorithms whose headline is known ``headline_tables``, and each
    part's machine time."""
    return table(rows) + "\n" + headline_tables(rows, headline) + "\n" + part_times(rows)


def part_times(rows):
    """Each part's cells and the sum of their wall times (a cell counts in the part that ran
    it first), as one markdown line."""
    seconds, count = {}, {}
    for r in rows:
        seconds[r["part"]] = seconds.get(r["part"], 0.0) + float(r["wall_seconds"] or 0.0)
        count[r["part"]] = count.get(r["part"], 0) + 1
    return "Cell time by part (sum over its cells): " + "; ".join(
        f"{p} {count[p]} cells, {seconds[p] / 3600:.1f} h" for p in PARTS if p in count) + ".\n"


def _cell_text(row):
    """``honest aggregate / worst-10%``, and the round a diverged run blew up in (its figures
    are the round before's)."""
    if row["honest_aggregate"] == "":
        text = "no round"
    else:
        text = f"{float(row['honest_aggregate']):.3f} / {float(row['honest_worst10']):.3f}"
    if row.get("diverged_round"):
        return f"{text} (diverged in round {row['diverged_round']})"
    return text


def heatmap(rows, path):
    """Honest aggregate accuracy (final round), attack x defence, one panel per algorithm, for
    the ``attacks`` part (plus the no-attack row); returns the path, or None without
    matplotlib or rows."""
    rows = [r for r in rows if r["part"] in ("attacks", "no_attack") and int(r["seed"]) == 0 and
            float(r["alpha"]) == 0.1]
    algs = sorted({r["algorithm"] for r in rows})
    if not algs:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'ntkdfl_tf[plot]'): no heat map.")
        return None
    fig, axes = plt.subplots(1, len(algs), figsize=(6.5 * len(algs), 6), squeeze=False)
    for ax, alg in zip(axes[0], algs):
        attack_rows = [("none", "")] + list(attacks_for(alg))
        defs = list(defences_for(alg))
        grid = np.full((len(attack_rows), len(defs)), np.nan)
        for r in rows:
            if r["algorithm"] != alg:
                continue
            key = (r["attack"], r["attack_params"])
            if key in attack_rows and r["defence"] in defs and r["honest_aggregate"] != "":
                grid[attack_rows.index(key), defs.index(r["defence"])] = float(
                    r["honest_aggregate"])
        im = ax.imshow(grid, vmin=0.0, vmax=0.9, cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.5 else "black")
        ax.set_xticks(range(len(defs)), defs, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(attack_rows)),
                      [f"{a} {p}".strip() for a, p in attack_rows], fontsize=8)
        ax.set_title(f"{alg}: honest aggregate accuracy")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.7)
    save_figure(fig, path)
    plt.close(fig)
    return path
