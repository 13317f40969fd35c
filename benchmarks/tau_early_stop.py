"""How often ``tau_search="early_stop"`` would pick another tau than the full grid, on real rounds.

    python benchmarks/tau_early_stop.py --clients=100 --rounds=3

Trains NTK-DFL with the full tau grid (by default ``common.define_setting_flags``' settings:
m = 6 slices, 5 clients per call under XLA, the dopri5 flow, the default grid) and, for every
client, slice and round, applies
the early-stop rule to the full search's per-candidate real losses: where the client would stop
(its loss risen at two consecutive candidates) and the argmin up to there. Each client's flow
steps and candidates are the same under both searches (tests/test_ntkdfl.py), so this is what
early stop picks from the same slice inputs; along a run the two then part, as their weights do.

Prints one JSON line per round and one for the whole run: client-slices, the share whose tau
differs, the loss difference where it does (early stop's chosen loss minus the full grid's:
absolute and relative to the full grid's), the chosen taus of the full grid, the candidates a
client evaluates before it stops, and the candidates each client-batch call would evaluate (its
last member's stop) with the share of the flow's grid that call integrates (tau reached over the
largest tau).
"""

import collections
import dataclasses
import json

import numpy as np
from absl import app, flags

import common

common.define_setting_flags(clients=100)
flags.DEFINE_integer("rounds", 3, "Rounds of the full-grid run.")
FLAGS = flags.FLAGS


def early_stop_choice(losses):
    """The early-stop rule on candidate losses ``[T, B]``: (candidates each client evaluates
    ``[B]``, the index it chooses ``[B]``: the first lowest finite loss among them)."""
    safe = np.where(np.isfinite(losses), losses, np.inf)
    count, batch = safe.shape
    evaluated = np.full(batch, count)
    rises = np.zeros(batch, int)
    for t in range(1, count):  # a handful of candidates
        rises = np.where(safe[t] > safe[t - 1], rises + 1, 0)
        evaluated = np.where((rises == 2) & (evaluated == count), t + 1, evaluated)
    seen = np.arange(count)[:, None] < evaluated[None]
    return evaluated, np.argmin(np.where(seen, safe, np.inf), axis=0)


def summarise(rows, taus):
    """Aggregate of per-client-slice rows and per-call rows into one dict."""
    slices, calls = rows["slices"], rows["calls"]
    differ = slices["early"] != slices["full"]
    gap = slices["early_loss"] - slices["full_loss"]
    rel = gap / np.abs(slices["full_loss"])
    out = {"client_slices": int(len(differ)), "differ": int(differ.sum()),
           "differ_fraction": round(float(differ.mean()), 4)}
    if differ.any():
        out.update(loss_gap_mean=float(f"{gap[differ].mean():.3g}"),
                   loss_gap_max=float(f"{gap[differ].max():.3g}"),
                   loss_gap_relative_mean=float(f"{rel[differ].mean():.3g}"),
                   loss_gap_relative_max=float(f"{rel[differ].max():.3g}"),
                   loss_gap_mean_over_all=float(f"{gap.mean():.3g}"))
    chosen = collections.Counter(int(taus[i]) for i in slices["full"])
    out["full_tau_counts"] = {str(t): chosen.get(int(t), 0) for t in taus}
    out["client_candidates_mean"] = round(float(slices["evaluated"].mean()), 3)
    out["client_stopped_fraction"] = round(float((slices["evaluated"] < len(taus)).mean()), 4)
    out["call_candidates_mean"] = round(float(calls.mean()), 3)
    out["call_stopped_fraction"] = round(float((calls < len(taus)).mean()), 4)
    out["call_flow_share_mean"] = round(float((taus[calls - 1] / taus[-1]).mean()), 4)
    return out


def main(argv):
    del argv
    import ntkdfl_tf as nd
    from ntkdfl_tf.algorithms.ntkdfl import NTKDFL

    recorded = []

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Recording(NTKDFL):
        """The full-grid NTK-DFL, keeping each round's per-call results."""

        def combine(self, round_input, groups, results, eta, screened=False):
            recorded.append((groups, results))
            return super().combine(round_input, groups, results, eta, screened)

    base = common.ntkdfl(tau_search="full")
    algorithm = Recording(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    taus = np.asarray(algorithm.taus)
    clients, _ = common.load_partition()
    trainer = nd.DecentralizedTrainer(nd.models.mlp, algorithm,
                                      nd.topology.RandomGraph(FLAGS.num_neighbors),
                                      seed=FLAGS.seed)
    setting = {"clients": FLAGS.clients, "jacobian_batches": FLAGS.jacobian_batches,
               "client_batch": FLAGS.client_batch, "flow": FLAGS.flow, "taus": taus.tolist(),
               "learning_rate": FLAGS.learning_rate, "seed": FLAGS.seed}
    total = {"slices": collections.defaultdict(list), "calls": []}
    history = trainer.fit(clients, rounds=FLAGS.rounds, verbose=0)
    for r, (groups, results) in enumerate(recorded):
        rows = {"slices": collections.defaultdict(list), "calls": []}
        for group, result in zip(groups, results):
            for losses in result.candidate_losses:  # one [T, B] per slice
                evaluated, early = early_stop_choice(losses)
                full = np.argmin(np.where(np.isfinite(losses), losses, np.inf), axis=0)
                rows["calls"].append(evaluated.max())  # the batch runs until its last stop
                columns = np.arange(losses.shape[1])
                for name, value in (("full", full), ("early", early), ("evaluated", evaluated),
                                    ("full_loss", losses[full, columns]),
                                    ("early_loss", losses[early, columns])):
                    # the last group is padded by repetition
                    rows["slices"][name].append(value[:group.real])
        rows = {"slices": {k: np.concatenate(v) for k, v in rows["slices"].items()},
                "calls": np.asarray(rows["calls"])}
        for k, v in rows["slices"].items():
            total["slices"][k].append(v)
        total["calls"].append(rows["calls"])
        print(json.dumps({"round": r + 1, **setting, **summarise(rows, taus),
                          "round_seconds": round(history.history["round_seconds"][r], 2)}),
              flush=True)
    total = {"slices": {k: np.concatenate(v) for k, v in total["slices"].items()},
             "calls": np.concatenate(total["calls"])}
    print(json.dumps({"rounds": FLAGS.rounds, **setting, **summarise(total, taus)}), flush=True)


if __name__ == "__main__":
    app.run(main)
