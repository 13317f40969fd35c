"""Byzantine senders in the channel, defences at the receivers, the package screen and the
metrics: every attack and defence changes what receivers compute, checked against references
(hand counts, the lazy/explicit agreement, a receiver-by-receiver average)."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import experiment, protocol, robustness
from ntkdfl_tf.algorithms import base, package_screen
from ntkdfl_tf.protocol import byzantine as byz
from ntkdfl_tf.trainer import byzantine_share_max


def _pairs(num_clients=6, n=(6, 4, 5, 3, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 255, (n[k], 28, 28, 1)).astype(np.uint8),
             rng.integers(0, 10, n[k])) for k in range(num_clients)]


def small_mlp():
    return nd.models.mlp(hidden=(8,))


def _fit(algorithm, pairs, byzantine=None, defence=None, rounds=1, seed=0):
    trainer = nd.DecentralizedTrainer(small_mlp, algorithm, nd.topology.RandomGraph(2),
                                      seed=seed, channel=protocol.Channel(byzantine=byzantine),
                                      defence=defence)
    history = trainer.fit(pairs, rounds=rounds, verbose=0)
    return trainer, history.history


def _flat(trainer):
    return np.concatenate([w.numpy().reshape(w.shape[0], -1) for w in trainer.client_weights], 1)


NTK = dict(taus=(3, 8, 20))


# -- the threat model ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=1.0), "fraction"), (dict(fraction=-0.1), "fraction"),
    (dict(attack="bogus"), "Unknown attack 'bogus'"),
    (dict(attack="jacobian_scale", params={"scale": 2}), "no parameter 'scale'"),
    (dict(attack="logit_shift", params={"shift": -1}), "shift"),
    (dict(attack="adaptive", params={"margin": 1.5}), "margin")])
def test_bad_threat_models_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        protocol.Byzantine(**kwargs)


def test_the_byzantine_clients_are_a_seeded_draw_of_the_right_size():
    threat = protocol.Byzantine(0.2, "sign_flip")
    a = threat.clients(100, np.random.default_rng([0, 6]))
    b = threat.clients(100, np.random.default_rng([0, 6]))
    assert a.sum() == 20 and np.array_equal(a, b)
    assert not np.array_equal(a, threat.clients(100, np.random.default_rng([1, 6])))


@pytest.mark.parametrize("field, value, match", [
    ("defence", "trimmed_mean", "f"), ("attack", "nope", "nope"),
    ("byzantine_fraction", 1.0, "fraction"), ("defence", "median+bogus", "bogus"),
    ("attack_params", "epsilon", "key=number")])
def test_bad_flags_fail_before_training(tmp_path, field, value, match):
    cfg = experiment.Config(num_clients=10, num_neighbors=3, logdir=str(tmp_path),
                            save_dir=str(tmp_path), attack="ipm", byzantine_fraction=0.2)
    if field == "defence" and value == "trimmed_mean":  # declared f = 2: 2f >= 4 = 3 + 1
        cfg.defence_params = "f=2"
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        experiment.validate(cfg)


def test_the_screen_is_refused_for_algorithms_without_packages(tmp_path):
    cfg = experiment.Config(algorithm="dfedavg", defence="median+screen", logdir=str(tmp_path),
                            save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="only NTK-DFL"):
        experiment.validate(cfg)


# -- the channel ---------------------------------------------------------------------------------
def test_stacking_by_receiver_is_a_hand_layout():
    weights = [np.arange(10, dtype=np.float32).reshape(5, 2), np.ones((5, 1), np.float32)]
    route = np.zeros((5, 5), bool)
    route[0, [1, 3]] = route[2, 4] = True
    stack = protocol.stack_by_receiver(protocol.weights_messages(route, weights))
    assert stack.receivers.tolist() == [0, 2]
    assert stack.valid.tolist() == [[True, True], [True, False]]
    assert stack.senders.tolist() == [[1, 3], [4, -1]]
    np.testing.assert_array_equal(stack.received[0, 1], [6, 7, 1])
    np.testing.assert_array_equal(stack.received[1, 1], [0, 0, 0])


def test_the_channel_replaces_only_byzantine_senders_weights():
    k = 6
    weights = [np.random.default_rng(0).normal(size=(k, 3)).astype(np.float32)]
    route = nd.topology.Ring().draw(k)
    clients = np.zeros(k, bool)
    clients[2] = True
    adversary = protocol.Adversary(protocol.Byzantine(0.2, "sign_flip"), clients,
                                   np.random.default_rng(0))
    channel = protocol.Channel().round(k, np.random.default_rng(0), adversary)
    sent = protocol.weights_messages(route, weights)
    delivered = channel.deliver(sent, own=weights)
    assert not delivered.unchanged
    for before, after in zip(sent, delivered.messages):
        if before.sender == 2:
            assert not np.allclose(after.weights[0], before.weights[0])
        else:
            assert after is before
    # requests (no ``own``) are not attacked
    assert channel.deliver(sent).unchanged


# -- attacks change what honest receivers compute -------------------------------------------------
WEIGHT_ATTACKS = ["sign_flip", "gaussian", "scaling", "alie", "ipm", "dissensus", "adaptive"]
PACKAGE_ATTACKS = ["jacobian_scale", "jacobian_sign_flip", "jacobian_noise", "logit_shift",
                   "label_flip"]


@pytest.mark.parametrize("attack", WEIGHT_ATTACKS + PACKAGE_ATTACKS)
def test_every_attack_changes_what_exposed_receivers_compute_and_only_theirs(attack):
    """One round: honest receivers with a Byzantine neighbour end elsewhere than under attack
    'none', the others exactly where they were. Weight attacks are run on DFedAvg (in
    NTK-DFL's first round every client still holds the initial weights, which several attacks
    send back unchanged), package attacks on NTK-DFL."""
    pairs = _pairs()
    algorithm = (nd.algorithms.get("dfedavg", local_epochs=1) if attack in WEIGHT_ATTACKS
                 else nd.algorithms.NTKDFL(**NTK))
    quiet, _ = _fit(algorithm, pairs, protocol.Byzantine(0.2, "none"))
    hit, h = _fit(algorithm, pairs, protocol.Byzantine(0.2, attack))
    clients = hit.byzantine_clients
    graph = nd.topology.RandomGraph(2).draw(6, nd.trainer.stream_rng(0, "topology", 0))
    exposed = graph[:, clients].any(1) & ~clients
    assert exposed.any()
    changed = np.abs(_flat(quiet) - _flat(hit)).max(1) > 1e-6
    assert changed[exposed].all()
    assert not changed[~graph[:, clients].any(1) & ~clients].any()
    assert h["byzantine_share_max"][0] == pytest.approx(byzantine_share_max(graph, clients))


def test_attack_none_marks_clients_without_changing_anything():
    pairs = _pairs()
    plain, hp = _fit(nd.algorithms.NTKDFL(**NTK), pairs)
    marked, hm = _fit(nd.algorithms.NTKDFL(**NTK), pairs, protocol.Byzantine(0.2, "none"))
    np.testing.assert_array_equal(_flat(plain), _flat(marked))
    assert hp["bytes_sent"] == hm["bytes_sent"]


@pytest.mark.parametrize("attack", ["jacobian_scale", "jacobian_sign_flip", "logit_shift",
                                    "label_flip", "adaptive"])
@pytest.mark.parametrize("defence", [None, "screen"])
def test_lazy_tampering_is_what_explicit_tampered_packages_give(attack, defence):
    """The lazy path applies a package attack without forming J; forming the packages and
    tampering with their arrays must give the same round."""
    pairs = _pairs()
    threat = protocol.Byzantine(0.2, attack)
    d = None if defence is None else nd.Defence(defence)
    lazy, hl = _fit(nd.algorithms.NTKDFL(**NTK), pairs, threat, d, rounds=2)
    explicit, he = _fit(nd.algorithms.NTKDFL(packages="explicit", **NTK), pairs, threat, d,
                        rounds=2)
    assert hl["tau"] == he["tau"]
    np.testing.assert_allclose(_flat(lazy), _flat(explicit), atol=2e-4, rtol=1e-3)


def test_dfedavg_under_attack_with_each_weight_defence():
    pairs = _pairs()
    dfedavg = nd.algorithms.get("dfedavg", local_epochs=1)
    threat = protocol.Byzantine(0.2, "gaussian", {"std": 100.0})
    results = {}
    for name in ("none", "median", "trimmed_mean", "clipping", "balance"):
        trainer, _ = _fit(dfedavg, pairs, threat, nd.Defence(name) if name != "none" else None)
        results[name] = _flat(trainer)[~trainer.byzantine_clients]
    assert np.abs(results["none"]).max() > 10  # the attack lands without a defence
    for name in ("median", "trimmed_mean", "clipping", "balance"):
        assert np.abs(results[name]).max() < 10, name  # each defence keeps it out


def test_a_defended_receiver_that_heard_no_one_keeps_its_own_weights():
    weights = [tf.constant(np.arange(6, dtype=np.float32).reshape(3, 2))]
    rin = types.SimpleNamespace(index=0, defence=nd.Defence("median"), total_rounds=1)
    out = base.average_received(weights, protocol.Delivery([], True), rin)
    np.testing.assert_array_equal(out[0].numpy(), weights[0].numpy())


# -- the package screen ------------------------------------------------------------------------
def _kernel_case(slots=3):
    """Two receivers' neighbourhoods of ``slots`` slots x 2 samples with a hand-built kernel."""
    rng = np.random.default_rng(0)
    feats = rng.uniform(0.5, 1.0, size=(2, 2 * slots, 4))
    h = np.einsum("bnd,bmd->bnm", feats, feats)  # positive entries, like a ReLU net's NTK
    logits = np.zeros((2, 2 * slots, 3))
    labels = np.zeros((2, 2 * slots, 3))
    labels[:, :, 0] = 1.0
    logits[:, :, 0] = 2.0  # every slot fits its labels equally well
    return h, logits, labels, np.ones((2, 2 * slots))


def test_the_screen_leaves_consistent_packages_alone():
    h, logits, labels, mask = _kernel_case()
    result = package_screen.screen(h, logits, labels, mask, slots=3)
    assert not result.clipped.any() and not result.dropped.any()
    np.testing.assert_array_equal(result.row_scale, 1.0)
    np.testing.assert_array_equal(result.row_keep, 1.0)


def test_the_screen_clips_a_scaled_slot_to_its_ratio():
    h, logits, labels, mask = _kernel_case()
    scale = np.ones(6)
    scale[4:] = 10.0  # receiver 0's slot 2 sends 10 J: its block grows 100-fold
    h[0] = h[0] * np.outer(scale, scale)
    result = package_screen.screen(h, logits, labels, mask, slots=3, params={"clip_ratio": 4})
    ratio = np.diag(h[0])[4:].mean() / np.median(np.diag(h[0])[:2])  # by hand
    assert result.clipped[0].tolist() == [False, False, True] and not result.clipped[1].any()
    np.testing.assert_allclose(result.row_scale[0, 4:], np.sqrt(4 / ratio), rtol=1e-6)
    # after clipping, that slot's mean diagonal is 4x the own median
    clipped = h[0] * np.outer(result.row_scale[0], result.row_scale[0])
    assert np.diag(clipped)[4:].mean() / np.median(np.diag(clipped)[:2]) == pytest.approx(4)


def test_the_screen_drops_negated_and_misfit_slots():
    h, logits, labels, mask = _kernel_case()
    sign = np.ones(6)
    sign[2:4] = -1.0  # receiver 0's slot 1 negates its Jacobians
    h[0] = h[0] * np.outer(sign, sign)
    logits[1, 4:, 0] = -8.0  # receiver 1's slot 2 sends logits that miss its labels
    result = package_screen.screen(h, logits, labels, mask, slots=3)
    assert result.dropped.tolist() == [[False, True, False], [False, False, True]]
    assert result.row_keep[0].tolist() == [1, 1, 0, 0, 1, 1]


def test_the_fit_check_keeps_a_worse_but_better_than_uniform_slot():
    h, logits, labels, mask = _kernel_case()
    logits[0, 4:, 0] = 0.5  # slot 2: loss ln(1 + 2 e^-0.5) = 0.79, 3.3x the others' 0.24
    by_hand = np.log(1 + 2 * np.exp(-0.5)) / np.log(1 + 2 * np.exp(-2.0))
    assert by_hand > 3 and np.log(1 + 2 * np.exp(-0.5)) < np.log(3)
    kept = package_screen.screen(h, logits, labels, mask, slots=3)
    assert not kept.dropped.any()  # below a uniform guess's ln 3: an honest unfamiliar slot
    without_floor = package_screen.screen(h, logits, labels, mask, slots=3,
                                          params={"loss_floor": 1e-9})
    assert without_floor.dropped.tolist() == [[False, False, True], [False, False, False]]


def test_a_byzantine_half_of_the_slots_cannot_raise_the_fit_bar():
    h, logits, labels, mask = _kernel_case(slots=4)
    logits[0, 4:, 0] = -8.0  # receiver 0: slots 2 and 3 of 4 miss their labels (loss ~10)
    honest = np.log(1 + 2 * np.exp(-2.0))  # 0.24: the own and the honest slot
    byz = np.log(1 + 2 * np.exp(8.0))  # 8.7
    median = (honest + byz) / 2  # of the four slot losses, by hand
    assert 3 * median > byz  # the neighbourhood median alone would keep both
    result = package_screen.screen(h, logits, labels, mask, slots=4)
    assert result.dropped.tolist() == [[False, False, True, True], [False] * 4]


def test_the_screen_drops_sign_flipped_packages_in_training_and_no_honest_one():
    pairs = _pairs()
    screen = nd.Defence("screen")
    _, clean = _fit(nd.algorithms.NTKDFL(**NTK), pairs, protocol.Byzantine(0.2, "none"), screen)
    assert clean["packages_dropped"] == [0.0] and clean["packages_clipped"] == [0.0]
    trainer, h = _fit(nd.algorithms.NTKDFL(**NTK), pairs,
                      protocol.Byzantine(0.2, "jacobian_sign_flip"), screen)
    graph = nd.topology.RandomGraph(2).draw(6, nd.trainer.stream_rng(0, "topology", 0))
    tampered = graph[:, trainer.byzantine_clients].sum()  # one package per Byzantine edge
    assert h["packages_dropped"] == [float(tampered)]


# -- metrics and the final aggregate -------------------------------------------------------------
def test_delta_max_is_a_hand_count():
    graph = np.zeros((4, 4), bool)
    for i, j in [(0, 1), (0, 2), (1, 3), (2, 3)]:
        graph[i, j] = graph[j, i] = True
    clients = np.array([False, True, True, False])  # 0's neighbours are both Byzantine
    assert byzantine_share_max(graph, clients) == pytest.approx(2 / 3)


def test_honest_metrics_and_the_robust_final_aggregate(small_fashion):
    clients, test = small_fashion
    trainer = nd.DecentralizedTrainer(
        small_mlp, nd.algorithms.get("dfedavg", local_epochs=1), nd.topology.RandomGraph(4),
        seed=0, channel=protocol.Channel(byzantine=protocol.Byzantine(0.2, "gaussian",
                                                                      {"std": 50.0})),
        defence=nd.Defence("median", final="robust"))
    h = trainer.fit(clients, rounds=2, validation_data=test, verbose=0).history
    honest = ~trainer.byzantine_clients
    acc = np.sort(trainer.last_client_accuracy[honest])
    assert h["val_honest_client_mean_accuracy"][-1] == pytest.approx(acc.mean())
    assert h["val_honest_client_worst10_accuracy"][-1] == pytest.approx(acc[:2].mean())
    # the robust final aggregate is the mean of the clients it reports keeping
    final = trainer.aggregated_weights()
    assert h["aggregate_kept"][-1] == len(trainer.last_kept) >= 10
    np.testing.assert_allclose(final[0], trainer.client_weights[0].numpy()[trainer.last_kept]
                               .mean(0), rtol=1e-5, atol=1e-7)


# -- the experiment ------------------------------------------------------------------------------
def test_the_matrix_parts_are_complete():
    cells = robustness.cells("attacks")
    ntk = [c for c in cells if c.algorithm == "ntk_dfl"]
    dfedavg = [c for c in cells if c.algorithm == "dfedavg"]
    assert len(ntk) == (len(robustness.WEIGHT_ATTACKS) + len(robustness.PACKAGE_ATTACKS)) * 8
    assert len(dfedavg) == len(robustness.WEIGHT_ATTACKS) * 5
    assert len({c.name for c in cells}) == len(cells)
    with pytest.raises(ValueError, match="attacks' part first"):
        robustness.cells("fractions")
    rows = [dict(part="attacks", algorithm="dfedavg", attack=a, attack_params="", defence=d,
                 honest_aggregate=v) for a, d, v in [("alie", "none", 0.3), ("ipm", "none", 0.6),
                                                     ("alie", "median", 0.7),
                                                     ("ipm", "median", 0.5),
                                                     ("alie", "balance", 0.65),
                                                     ("ipm", "balance", 0.66)]]
    assert robustness.headline_from(rows) == {"dfedavg": ("alie", "", "balance")}
    # a defence not yet measured against every attack is not ranked: trimmed_mean's one cell
    # beats balance's worst, but ipm is missing; without any complete defence, no headline
    trimmed = dict(rows[0], defence="trimmed_mean", honest_aggregate=0.8)
    assert robustness.headline_from(rows + [trimmed]) == {"dfedavg": ("alie", "", "balance")}
    assert robustness.headline_from(rows[:2] + [trimmed]) == {}


def test_a_headline_given_by_hand_parses_into_headline_froms_form():
    got = robustness.parse_headline("ntk_dfl=ipm:epsilon=100/balance+screen, "
                                    "dfedavg=gaussian/clipping")
    assert got == {"ntk_dfl": ("ipm", "epsilon=100", "balance+screen"),
                   "dfedavg": ("gaussian", "", "clipping")}
    cells = robustness.cells("fractions", headline=got)
    assert robustness.Cell("ntk_dfl", "ipm", "epsilon=100", "balance+screen", 0.3) in cells
    for bad, match in [("ntk_dfl=gaussian", "algorithm=attack"),
                       ("dfedavg=label_flip/none", "no attack 'label_flip'"),
                       ("dfedavg=gaussian/screen", "defence 'screen'")]:
        with pytest.raises(ValueError, match=match):
            robustness.parse_headline(bad)


def test_a_cell_summary_and_its_table_read_the_last_round():
    cell = robustness.Cell("dfedavg", "alie", "", "median", 0.2)
    history = {"val_accuracy": [0.5, 0.6], "val_honest_accuracy": [0.55, 0.65],
               "val_honest_client_mean_accuracy": [0.4, 0.45],
               "val_honest_client_worst10_accuracy": [0.2, 0.25],
               "byzantine_share_max": [0.5, 0.25], "bytes_sent": [10.0, 10.0]}
    row = robustness.summarise(cell, "attacks", history, 3.0)
    assert (row["honest_aggregate"], row["honest_worst10"], row["aggregate"]) == (0.65, 0.25, 0.6)
    assert (row["delta_max_mean"], row["delta_max_max"], row["bytes_sent"]) == (0.375, 0.5, 20.0)
    # without Byzantine clients or a defence every client is honest
    plain = robustness.summarise(robustness.Cell("dfedavg", "none", "", "none", 0.0), "no_attack",
                                 {"val_accuracy": [0.7], "val_client_mean_accuracy": [0.6],
                                  "val_client_worst10_accuracy": [0.3], "bytes_sent": [1.0]}, 1.0)
    assert (plain["honest_aggregate"], plain["honest_worst10"]) == (0.7, 0.3)
    text = robustness.table([{**row, "seed": 0, "alpha": 0.1}, {**plain, "seed": 0, "alpha": 0.1}])
    assert "| alie  | — | 0.650 / 0.250 |" in text and "| none  | 0.700 / 0.300 |" in text


def test_the_headline_tables_place_each_part_s_cells(tmp_path):
    """Fractions, seeds and D-PSGD cells land in their columns, the seed spread is a hand
    count, and ``export`` writes the tables, rows and histories into the destination."""
    def row(cell, acc):
        return {"cell": cell.name, "part": "x", "algorithm": cell.algorithm,
                "attack": cell.attack, "attack_params": cell.attack_params,
                "defence": cell.defence, "fraction": cell.fraction, "seed": cell.seed,
                "alpha": cell.alpha, "honest_aggregate": acc, "honest_worst10": acc / 2,
                "diverged_round": ""}

    Cell = robustness.Cell
    rows = [row(Cell("dfedavg", "none", "", "none", 0.0), 0.8),
            row(Cell("dfedavg", "scaling", "", "median", 0.3), 0.6),
            row(Cell("dfedavg", "scaling", "", "none", 0.2, 1), 0.1),
            row(Cell("dfedavg", "scaling", "", "none", 0.2, 2), 0.3),
            row(Cell("dfedavg", "scaling", "", "none", 0.2, 0, 0.5), 0.4),
            row(Cell("dpsgd", "scaling", "", "median", 0.2), 0.7)]
    text = robustness.headline_tables(rows, {"dfedavg": ("scaling", "", "median")})
    assert "| `none` | 0.800 / 0.400 | — | — | — |" in text
    assert "| `median` | — | — | — | 0.600 / 0.300 |" in text
    # seeds 1 and 2 only: mean 0.2, sample sd |0.3 - 0.1| / sqrt(2) = 0.141
    assert "| scaling  / `none` | — | 0.100 / 0.050 | 0.300 / 0.150 | 0.200 ± 0.141 (2) | " \
           "0.400 / 0.200 |" in text
    assert "| scaling  | `median` | 0.700 / 0.350 |" in text
    logdir, dest = tmp_path / "runs", tmp_path / "docs"
    os.makedirs(logdir / rows[1]["cell"])
    (logdir / rows[1]["cell"] / "history.csv").write_text("round,val_accuracy\n1,0.6\n")
    robustness.write_rows(str(logdir / "matrix.csv"), rows)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"# R\n{robustness.BEGIN}\nold\n{robustness.END}\nafter\n")
    robustness.export(str(logdir), str(dest), {"dfedavg": ("scaling", "", "median")},
                      str(results_md))
    assert "| `median` | — | — | — | 0.600 / 0.300 |" in results_md.read_text()
    assert "old" not in results_md.read_text() and results_md.read_text().endswith("after\n")
    assert (dest / "histories" / (rows[1]["cell"] + ".csv")).read_text().endswith("1,0.6\n")
    assert "| `median` | — | — | — | 0.600 / 0.300 |" in (dest / "matrix.md").read_text()
    assert len(robustness.read_csv(str(dest / "matrix.csv"))) == len(rows)
    timed = [{"part": "attacks", "wall_seconds": "1800"}, {"part": "attacks", "wall_seconds": 900},
             {"part": "no_attack", "wall_seconds": 360}]
    assert robustness.part_times(timed) == ("Cell time by part (sum over its cells): no_attack "
                                            "1 cells, 0.1 h; attacks 2 cells, 0.8 h.\n")


def test_a_part_runs_its_cells_resumes_and_writes_its_table(tmp_path, monkeypatch):
    base = experiment.Config(algorithm="dfedavg", num_clients=8, samples_per_client=30,
                             num_neighbors=2, rounds=1, local_epochs=1, verbose=0,
                             logdir=str(tmp_path))
    rows = robustness.run_part(base, "no_attack", ("dfedavg",), only="_median_")
    assert [r["cell"] for r in rows] == ["dfedavg_none_median_f0_s0_a0.1"]
    assert 0.0 < float(rows[0]["honest_aggregate"]) <= 1.0
    assert "| none  | — | " in (tmp_path / "matrix.md").read_text()
    # a second call finds the cell done and runs nothing
    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("ran a finished cell"))
    again = robustness.run_part(base, "no_attack", ("dfedavg",), only="_median_")
    assert [r["cell"] for r in again] == [r["cell"] for r in rows]


def test_a_cell_that_diverges_is_a_row_and_the_part_goes_on(tmp_path, monkeypatch):
    """The honest models blowing up under an attack is a result: the cell gets a row with the
    round before's figures and its divergence round, the next cell still runs, and the table
    says so."""
    base = experiment.Config(algorithm="dfedavg", num_clients=8, samples_per_client=30,
                             num_neighbors=2, rounds=3, local_epochs=1, verbose=0,
                             logdir=str(tmp_path))
    real_run = experiment.run

    def run(cfg, dataset=None):
        if "_median_" not in cfg.logdir:
            return real_run(cfg, dataset)
        os.makedirs(cfg.logdir, exist_ok=True)  # two good rounds, then the blow-up
        with open(os.path.join(cfg.logdir, "history.csv"), "w") as f:
            f.write("round,val_accuracy,val_client_mean_accuracy,val_client_worst10_accuracy,"
                    "bytes_sent\n1,0.5,0.4,0.2,7\n2,0.6,0.5,0.3,7\n")
        raise nd.DivergenceError("dfedavg diverged in round 3", round=3)

    monkeypatch.setattr(experiment, "run", run)
    rows = robustness.run_part(base, "no_attack", ("dfedavg",), only="_m")  # median, then mean
    by_cell = {r["cell"]: r for r in rows}
    diverged = by_cell["dfedavg_none_median_f0_s0_a0.1"]
    assert (int(diverged["diverged_round"]), int(diverged["rounds"])) == (3, 2)
    assert (float(diverged["honest_aggregate"]), float(diverged["honest_worst10"])) == (0.6, 0.3)
    assert by_cell["dfedavg_none_trimmed_mean_f0_s0_a0.1"]["diverged_round"] == ""
    assert int(by_cell["dfedavg_none_trimmed_mean_f0_s0_a0.1"]["rounds"]) == 3
    assert "0.600 / 0.300 (diverged in round 3)" in (tmp_path / "matrix.md").read_text()


def test_a_resumed_cell_is_summarised_from_all_its_rounds(tmp_path, monkeypatch):
    """A cell killed and resumed returns a Keras History of the resumed rounds only; its row
    reads every round from history.csv and adds the earlier rounds' times to its wall time."""
    base = experiment.Config(algorithm="dfedavg", num_clients=8, samples_per_client=30,
                             num_neighbors=2, rounds=3, local_epochs=1, verbose=0,
                             logdir=str(tmp_path))

    def resumed_run(cfg, dataset=None):  # rounds 1-2 ran before the kill, round 3 now
        os.makedirs(cfg.logdir, exist_ok=True)
        with open(os.path.join(cfg.logdir, "history.csv"), "w") as f:
            f.write("round,val_accuracy,val_client_worst10_accuracy,byzantine_share_max,"
                    "round_seconds\n1,0.5,0.1,0.2,100\n2,0.6,0.2,0.4,200\n3,0.7,0.3,0.6,1\n")
        return None, types.SimpleNamespace(history={
            "val_accuracy": [0.7], "val_client_worst10_accuracy": [0.3],
            "byzantine_share_max": [0.6], "round_seconds": [1.0]})

    monkeypatch.setattr(experiment, "run", resumed_run)
    row, = robustness.run_part(base, "no_attack", ("dfedavg",), only="_median_")
    assert (int(row["rounds"]), float(row["honest_aggregate"]), float(row["honest_worst10"])) \
        == (3, 0.7, 0.3)
    assert float(row["delta_max_mean"]) == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert 300.0 <= float(row["wall_seconds"]) < 360.0  # rounds 1-2's 300 s + this process


def test_read_history_is_what_history_csv_wrote(tmp_path):
    path = str(tmp_path / "history.csv")
    writer = nd.callbacks.HistoryCSV(path)
    writer.on_train_begin()
    for epoch, logs in enumerate([{"val_accuracy": 0.5, "loss": 2.0}, {"val_accuracy": 0.75}]):
        writer.on_epoch_begin(epoch)
        writer.on_epoch_end(epoch, logs)
    assert nd.callbacks.read_history(path) == {"loss": [2.0], "val_accuracy": [0.5, 0.75]}
