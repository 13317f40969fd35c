"""The paper's table at the paper's scale (ntkdfl_tf.reproduce), one part at a time:

    python launchers/reproduce.py --quick                 # NTK-DFL (grid, tau = 100), DFedAvg
    python launchers/reproduce.py --part=a0.1_s0          # alpha = 0.1, seed 0: NTK-DFL (grid,
                                                          # tau = 100), DFedAvg(M), D-PSGD
    python launchers/reproduce.py --part=a0.1_s0_dispfl_dfedsam   # the same setting's others
    python launchers/reproduce.py --part=a0.1_s1,a0.1_s2,a0.5,iid,kappa,ablations,flows,unbatched
    python launchers/reproduce.py --part=a0.1_s1_dispfl_dfedsam,a0.5_dispfl_dfedsam  # and so on
    python launchers/reproduce.py --part=a0.5,iid --labels=ntk_dfl_grid,dfedavg  # cheap rows first

Checkpoints go to --logdir; runs.csv, histories/, tables.md and the figures to --results_dir,
and the tables into the generated block of --results_md. A killed part resumes where it stopped
when run again.
"""

import os
import sys
import time

from absl import flags, logging

from ntkdfl_tf import reproduce
from ntkdfl_tf.cli import flags as cli_flags

RESULTS_DIR = "docs/results/reproduce"
flags.DEFINE_list("part", ["a0.1_s0"], f"Parts to run: {', '.join(reproduce.PARTS)}.")
flags.DEFINE_bool("quick", False, "Only the runs of the half-hour subset "
                  f"({', '.join(reproduce.QUICK)}).")
flags.DEFINE_list("labels", None, "Only these runs of the parts, e.g. ntk_dfl_grid,dfedavg "
                  f"(from {', '.join(reproduce.LABELS)}); default: all.")
flags.DEFINE_string("logdir", "runs/reproduce", "Checkpoints, histories and TensorBoard events.")
flags.DEFINE_string("results_dir", RESULTS_DIR, "runs.csv, histories/, tables.md, figures.")
flags.DEFINE_string("results_md", "RESULTS.md", "Markdown file whose generated block receives "
                    "tables.md ('' to skip; skipped when the file does not exist).")
flags.DEFINE_string("data_dir", None, "Folder of the IDX files (else $NTKDFL_DATA_DIR, ...).")
flags.DEFINE_integer("num_clients", None, "Clients (default: the paper's 300).")
flags.DEFINE_integer("max_rounds", None, "Lower round cap for every run: a smoke test, only "
                     "with a --results_dir of its own.")
flags.DEFINE_integer("verbose", 2, "Keras verbosity of each run (2: one line per round).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.max_rounds is not None and FLAGS.results_dir == RESULTS_DIR:
            raise ValueError(f"--max_rounds={FLAGS.max_rounds} cuts runs short: pass a "
                             f"--results_dir and --logdir of their own, not {RESULTS_DIR}.")
        overrides = {"data_dir": FLAGS.data_dir, "verbose": FLAGS.verbose}
        if FLAGS.num_clients is not None:
            overrides["num_clients"] = FLAGS.num_clients
        base = reproduce.base_config(**overrides)
        todo = reproduce.runs(FLAGS.part, base, FLAGS.logdir, FLAGS.quick, FLAGS.max_rounds,
                               FLAGS.labels)
        if FLAGS.quick:
            print(f"--quick: {', '.join(r.name for r in todo)}; leaves out "
                  f"{reproduce.QUICK_LEAVES_OUT}.", flush=True)
        start = time.perf_counter()
        rows = reproduce.run_part(todo, FLAGS.results_dir,
                                  progress=lambda line: print(line, flush=True))
        if FLAGS.results_md and os.path.exists(FLAGS.results_md):
            reproduce.update_markdown(FLAGS.results_md, reproduce.tables(rows))
            print(f"tables:  {FLAGS.results_md}", flush=True)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:  # one clear line
        sys.exit(f"error: {e}")
    print(f"{len(todo)} runs of {','.join(FLAGS.part)} done in this invocation's "
          f"{time.perf_counter() - start:.0f} s; results in {FLAGS.results_dir}", flush=True)


def run():
    """The ``ntkdfl-reproduce`` command."""
    cli_flags.run(main, __doc__)
