"""Merges several compare.py logdirs into one summary, figures and a Markdown table.

    python benchmarks/merge_runs.py --runs=runs/a,runs/b --out=docs/results/codecs

Reads each logdir's summary.csv and every run's history.csv, writes ``<out>/summary.csv``,
``accuracy.png`` and ``accuracy_vs_bytes.png`` (``compare.plot``), and prints the table with
bytes to target as a ratio to the first run of ``--baseline`` (a run name).
"""

import csv
import os

import numpy as np
from absl import app, flags

from ntkdfl_tf import compare
from ntkdfl_tf.callbacks import read_history

flags.DEFINE_list("runs", None, "compare.py logdirs to merge.", required=True)
flags.DEFINE_string("out", None, "Where the merged summary and figures go.", required=True)
flags.DEFINE_string("baseline", "dfedavg", "Run name whose bytes to target are 1.0.")
FLAGS = flags.FLAGS


def _fmt(value, unit):
    return "—" if np.isnan(value) else f"{value:.2f}{unit}"


def main(argv):
    del argv
    rows, histories = [], {}
    for logdir in FLAGS.runs:
        with open(os.path.join(logdir, "summary.csv")) as f:
            for row in csv.DictReader(f):
                rows.append(row)
                histories[row["run"]] = read_history(os.path.join(logdir, row["run"], "history.csv"))
    os.makedirs(FLAGS.out, exist_ok=True)
    compare.write_summary(os.path.join(FLAGS.out, "summary.csv"), rows)
    for row in rows:  # the sweep figures want numbers
        row["per_round_averaging"] = row["per_round_averaging"] == "True"
    compare.plot(FLAGS.out, histories)
    base = next((r for r in rows if r["run"] == FLAGS.baseline), None)
    base_bytes = float(base["bytes_to_target"]) if base and base["bytes_to_target"] else np.nan
    print("| run | codec | weight codec | rounds to target | bytes per round | bytes to target "
          "| vs baseline | best accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        to_target = float(r["bytes_to_target"]) if r["bytes_to_target"] else np.nan
        print(f"| {r['run']} | `{r['codec']}` | `{r['weight_codec']}` | "
              f"{r['rounds_to_target'] or 'not in ' + r['rounds']} | "
              f"{float(r['bytes_per_round']) / 1e9:.3f} GB | "
              f"{_fmt(to_target / 1e9, ' GB')} | {_fmt(to_target / base_bytes, 'x')} | "
              f"{float(r['best_accuracy']):.4f} |")


if __name__ == "__main__":
    app.run(main)
