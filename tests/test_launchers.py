"""The launchers end to end on a tiny real-data setting, as a user runs them."""

import csv
import math
import os
import subprocess
import sys

import keras
import pytest

from ntkdfl_tf import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_clients=6", "--samples_per_client=30", "--num_neighbors=2", "--rounds=2",
        "--taus=10,20", "--local_epochs=1", "--verbose=2"]


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launchers", script), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_train_writes_history_tensorboard_and_model(tmp_path, model):
    """``--model=cnn`` goes through the conv kernel; the MLP through the dense one."""
    out = _run("train.py", *TINY, f"--model={model}", f"--logdir={tmp_path}/logs",
               f"--save_dir={tmp_path}/models")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "logs" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert {"val_accuracy", "val_client_mean_accuracy", "loss", "bytes_sent"} <= set(rows[0])
    for key in ("flow_loss", "model_loss", "client_weight_spread", "val_accuracy"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "logs" / "validation"))
    model = keras.models.load_model(tmp_path / "models" / "logs.keras")
    assert model.output_shape == (None, 10)
    assert str(tmp_path / "models" / "logs.keras") in out.stdout


def test_bad_flag_value_is_one_clear_line(tmp_path):
    out = _run("train.py", "--num_clients=4", "--num_neighbors=7", f"--logdir={tmp_path}")
    assert out.returncode != 0
    assert "error: num_neighbors=7" in out.stderr
    assert "Traceback" not in out.stderr


def test_divergence_is_one_line_naming_the_rate_and_its_flag(tmp_path):
    out = _run("train.py", *TINY, "--algorithm=dfedavg", "--local_learning_rate=1e30",
               f"--logdir={tmp_path}/logs", f"--save_dir={tmp_path}/models")
    assert out.returncode != 0
    assert "error: dfedavg diverged in round 1" in out.stderr, out.stderr[-3000:]
    assert ("lower the learning rate (learning_rate 1e+30 in round 1). Set it with "
            "--local_learning_rate.") in out.stderr
    assert "Traceback" not in out.stderr


def test_compare_writes_histories_summary_and_figures(tmp_path):
    out = _run("compare.py", *TINY, "--algorithms=ntk_dfl,dfedavg", "--target_accuracy=0.2",
               "--alphas=0.1,iid", f"--logdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    names = [f"{alg}_{part}_k2_random" for alg in ("ntk_dfl", "dfedavg")
             for part in ("alpha0.1", "iid")]
    for name in names:
        assert os.path.exists(tmp_path / name / "history.csv")
    with open(tmp_path / "summary.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names)
    for r in rows.values():
        assert 0.0 < float(r["final_accuracy"]) <= float(r["best_accuracy"]) <= 1.0
        assert r["rounds_to_target"] in ("1", "2")  # 20% is reached within two rounds
        assert r["partition"] == ("iid" if "iid" in r["run"] else "dirichlet")
        assert r["alpha"] == ("" if "iid" in r["run"] else "0.1")
        gain = float(r["final_accuracy"]) - float(r["final_client_mean_accuracy"])
        assert abs(float(r["aggregate_gain"]) - gain) < 1e-9
        assert 0.0 < float(r["final_client_weight_spread"]) < float("inf")
    # NTK-DFL sends Jacobians as well as weights: far more bytes per round
    assert (float(rows["ntk_dfl_iid_k2_random"]["total_bytes_sent"])
            > 10 * float(rows["dfedavg_iid_k2_random"]["total_bytes_sent"]))
    for fig in ("accuracy.png", "accuracy_vs_bytes.png", "linearisation.png",
                "heterogeneity.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_compare_plans_every_sweep_combination(tmp_path):
    """Sweeps over alpha, kappa, static/dynamic topology and the ablation each get their own run."""
    from ntkdfl_tf import compare, experiment

    base = experiment.Config(logdir=str(tmp_path))
    runs = compare.plan(base, ["ntk_dfl", "dfedavg"], alphas=[0.1, 0.5], num_neighbors=[2, 5],
                        topologies=["random", "ring"], ablation=True)
    assert len(runs) == (2 + 1) * 2 * 2 * 2  # ntk_dfl with/without averaging, dfedavg
    names = [name for name, _ in runs]
    assert len(set(names)) == len(names)
    assert len({cfg.logdir for _, cfg in runs}) == len(runs)
    ring_ablation = dict(runs)["ntk_dfl_alpha0.5_k2_ring_no_averaging"]
    assert (ring_ablation.topology, ring_ablation.per_round_averaging, ring_ablation.alpha) == (
        "ring", False, 0.5)


def test_sweep_figures_skip_partitions_without_alpha(tmp_path):
    """A shards run has no alpha: the alpha figure leaves it out instead of failing on float('')."""
    from ntkdfl_tf import compare

    def row(alg, partition, alpha, gain):
        return {"algorithm": alg, "partition": partition, "alpha": alpha, "dropout": 0.0,
                "per_round_averaging": True, "aggregate_gain": gain,
                "final_client_weight_spread": 1.0, "final_accuracy": 0.8,
                "final_client_mean_accuracy": 0.7}

    shards = [row("dfedavg", "shards", "", 0.1), row("ntk_dfl", "shards", "", 0.1)]
    def figures(rows):
        return {os.path.basename(p) for p in compare.plot(str(tmp_path), {}, rows)}

    assert "heterogeneity.png" not in figures(shards)  # nothing to sweep, and no error
    swept = shards + [row("ntk_dfl", "dirichlet", 0.1, 0.08), row("ntk_dfl", "iid", "", 0.05)]
    assert "heterogeneity.png" in figures(swept)


@pytest.mark.parametrize("name", sorted(experiment.PRESETS))
def test_every_preset_builds_its_algorithm(name):
    cfg = experiment.Config(**experiment.PRESETS[name])  # a misspelt field raises TypeError
    algorithm = experiment.make_algorithm(cfg)
    assert algorithm.taus == tuple(cfg.taus)
    assert algorithm.jacobian_batches == cfg.jacobian_batches
    assert algorithm.flow == cfg.flow


def test_compare_sweeps_codecs_and_reports_bytes_to_target(tmp_path):
    """--codecs (NTK-DFL only) and --weight_codecs (every algorithm) each get a run; the summary
    has their codecs, bytes per round and cumulative bytes at the first round on target."""
    out = _run("compare.py", *TINY, "--algorithms=ntk_dfl,dfedavg", "--target_accuracy=0.2",
               "--codecs=identity;factored", "--weight_codecs=identity;quantize:bits=8",
               f"--logdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"ntk_dfl_codec-identity_weights-identity",
                         "ntk_dfl_codec-factored_weights-identity",
                         "ntk_dfl_codec-identity_weights-q8", "ntk_dfl_codec-factored_weights-q8",
                         "dfedavg_weights-identity", "dfedavg_weights-q8"}
    for name, r in rows.items():
        with open(tmp_path / name / "history.csv") as f:
            sent = [float(h["bytes_sent"]) for h in csv.DictReader(f)]
        hit = int(r["rounds_to_target"])
        assert float(r["bytes_to_target"]) == sum(sent[:hit])
    # factored is lossless: the same accuracy at a fraction of the bytes
    plain, factored = (rows[f"ntk_dfl_codec-{c}_weights-identity"] for c in ("identity", "factored"))
    assert plain["final_accuracy"] == factored["final_accuracy"]
    assert float(factored["bytes_per_round"]) < float(plain["bytes_per_round"]) / 50
    assert (float(rows["dfedavg_weights-q8"]["bytes_per_round"])
            < float(rows["dfedavg_weights-identity"]["bytes_per_round"]) / 3.9)
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000


def _command(name):
    """The installed entry point (``pip install -e .`` puts it beside the interpreter)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(path), f"{path} missing: run pip install -e '.[test]' again"
    return path


@pytest.mark.parametrize("name, own_flag", [
    ("ntkdfl-train", "--num_clients"), ("ntkdfl-compare", "--algorithms"),
    ("ntkdfl-byzantine", "--part"), ("ntkdfl-selection", "--validation_fraction"),
    ("ntkdfl-reproduce", "--results_dir")])
def test_commands_list_their_flags(name, own_flag):
    out = subprocess.run([_command(name), "--helpshort"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-2000:]  # absl's help exits with 1
    assert own_flag + ":" in out.stdout and "--logdir:" in out.stdout
    assert "--flagfile" in out.stdout  # the usage text documents it


def test_train_command_reads_a_flagfile_and_prints_a_line_per_round(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("\n".join(TINY + ["--algorithm=dfedavg", f"--logdir={tmp_path}/logs",
                                          f"--save_dir={tmp_path}/models"]) + "\n")
    out = subprocess.run([_command("ntkdfl-train"), f"--flagfile={flagfile}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rounds = [line for line in out.stdout.splitlines() if line.startswith("Round ")]
    assert [line.split(" - ")[0] for line in rounds] == ["Round 1/2", "Round 2/2"]
    assert all("accuracy: " in line and " MB" in line for line in rounds)
    with open(tmp_path / "logs" / "history.csv") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2"]
