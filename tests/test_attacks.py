"""Weight attacks of Byzantine senders (``protocol.attacks``) against independent references:
hand computations and explicit receiver-by-receiver loops written here, never the module's
own output."""

import importlib.util
import math
import os
import statistics

import numpy as np
import pytest

# Load the module from its file: it is pure NumPy, and importing it through the package would
# pull in TensorFlow (seconds) for nothing.
_PATH = os.path.join(os.path.dirname(__file__), "..", "ntkdfl_tf", "protocol", "attacks.py")
_SPEC = importlib.util.spec_from_file_location("_attacks_under_test", _PATH)
attacks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(attacks)

ATTACKS = ("sign_flip", "gaussian", "scaling", "alie", "ipm", "dissensus")


def _case(seed=0, K=6, D=4, P=9):
    """Random stacks with padding, receivers with 0, 1 and 2 Byzantine slots, one receiver
    without honest neighbours and one without any Byzantine neighbour."""
    rng = np.random.default_rng(seed)
    own = rng.normal(size=(K, P)).astype(np.float32)
    received = rng.normal(size=(K, D, P)).astype(np.float32)
    valid = np.ones((K, D), bool)
    valid[1, 3] = valid[2, 2:] = valid[4, 1:] = False
    byzantine = np.zeros((K, D), bool)
    byzantine[0, 1] = byzantine[1, [0, 2]] = byzantine[2, 0] = True
    byzantine[4, 0] = True  # receiver 4: its only neighbour is Byzantine
    byzantine[5, [1, 3]] = True  # receiver 3 has no Byzantine neighbour
    received[~valid] = 0.0
    return own, received, valid, byzantine


def _run(attack, params=None, case=None, seed=7):
    own, received, valid, byzantine = case if case is not None else _case()
    return attacks.byzantine_weights(attack, params, own, received, valid, byzantine,
                                     np.random.default_rng(seed))


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# -- one table over every attack ---------------------------------------------------------------
def test_the_attack_list_is_the_interface():
    assert attacks.WEIGHT_ATTACKS == ATTACKS
    assert set(attacks.DEFAULT_PARAMS) == set(ATTACKS)


@pytest.mark.parametrize("attack", ATTACKS)
def test_only_byzantine_slots_change(attack):
    case = _case()
    own, received, valid, byzantine = case
    before = [a.copy() for a in case]
    out = _run(attack, case=case)
    assert out.shape == received.shape and out.dtype == np.float32
    keep = ~byzantine  # honest and padding slots
    assert np.array_equal(_bits(out[keep]), _bits(received[keep]))
    changed = np.any(out != received, axis=2)
    assert changed[byzantine].all()
    assert np.isfinite(out).all()
    for a, b in zip(case, before):  # inputs untouched
        assert np.array_equal(a, b)


@pytest.mark.parametrize("attack", ATTACKS)
def test_padding_is_ignored_and_kept(attack):
    own, received, valid, byzantine = _case()
    dirty = received.copy()
    dirty[~valid] = 7.0  # what sits in a padding slot must neither leak in nor be overwritten
    out = _run(attack, case=(own, dirty, valid, byzantine))
    assert np.array_equal(_bits(out[~valid]), _bits(dirty[~valid]))
    assert np.array_equal(_bits(out[valid]), _bits(_run(attack)[valid]))


@pytest.mark.parametrize("attack", ATTACKS)
def test_receivers_are_independent(attack):
    own, received, valid, byzantine = _case()
    base = _run(attack, case=(own, received, valid, byzantine))
    j = 1
    own2, received2 = own.copy(), received.copy()
    own2[j] += 3.0
    received2[j, valid[j]] *= -2.0
    valid2, byzantine2 = valid.copy(), byzantine.copy()
    if attack != "gaussian":  # gaussian's draws follow the Byzantine slots' order; keep them
        valid2[j, 3] = True
        byzantine2[j] = [False, False, True, True]
    out = _run(attack, case=(own2, received2, valid2, byzantine2))
    others = np.arange(len(own)) != j
    assert np.array_equal(_bits(out[others]), _bits(base[others]))
    assert not np.array_equal(out[j], base[j])


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_fixed_seed_gives_the_same_messages(attack):
    assert np.array_equal(_bits(_run(attack, seed=3)), _bits(_run(attack, seed=3)))


def test_only_gaussian_depends_on_the_seed():
    for attack in ATTACKS:
        same = np.array_equal(_run(attack, seed=1), _run(attack, seed=2))
        assert same == (attack != "gaussian"), attack


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_byzantine_slot_returns_the_input(attack):
    own, received, valid, _ = _case()
    out = _run(attack, case=(own, received, valid, np.zeros_like(valid)))
    assert np.array_equal(_bits(out), _bits(received))


def test_a_byzantine_padding_slot_is_an_error():
    own, received, valid, byzantine = _case()
    byzantine[1, 3] = True  # a padding slot
    with pytest.raises(ValueError, match="subset of valid"):
        _run("ipm", case=(own, received, valid, byzantine))


# -- each attack against a reference -----------------------------------------------------------
def _slot_loop(fn):
    """Reference: an explicit loop over receivers and their Byzantine slots."""
    own, received, valid, byzantine = _case()
    expected = received.astype(np.float64)
    for i in range(len(own)):
        honest = [received[i, d].astype(np.float64) for d in range(received.shape[1])
                  if valid[i, d] and not byzantine[i, d]]
        for b in np.flatnonzero(byzantine[i]):
            expected[i, b] = fn(own[i].astype(np.float64), received[i, b].astype(np.float64),
                                honest, valid[i].sum(), byzantine[i].sum())
    return expected


def test_sign_flip_negates_the_senders_own_vector():
    out = _run("sign_flip", {"scale": 2.5})
    expected = _slot_loop(lambda own, x_b, honest, deg, f: -2.5 * x_b)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(_run("sign_flip")[0, 1], -_case()[1][0, 1])


def test_gaussian_draws_iid_coordinates_with_the_given_mean_and_std():
    K, D, P = 3, 3, 40_000
    own = np.zeros((K, P), np.float32)
    received = np.ones((K, D, P), np.float32)
    valid = np.ones((K, D), bool)
    byzantine = np.zeros((K, D), bool)
    byzantine[:, 0] = byzantine[2, 2] = True
    out = attacks.byzantine_weights("gaussian", {"mean": 2.0, "std": 0.5}, own, received,
                                    valid, byzantine, np.random.default_rng(0))
    forged = out[byzantine]  # 4 slots
    # 40,000 draws: the standard error of the mean is 0.5 / 200 = 0.0025
    np.testing.assert_allclose(forged.mean(1), 2.0, atol=0.015)
    np.testing.assert_allclose(forged.std(1), 0.5, atol=0.015)
    # a fresh draw per slot: the slots are uncorrelated, not one vector repeated
    corr = np.corrcoef(forged)
    assert np.abs(corr[~np.eye(len(forged), dtype=bool)]).max() < 0.03
    defaults = attacks.byzantine_weights("gaussian", None, own, received, valid, byzantine,
                                         np.random.default_rng(1))[byzantine]
    assert abs(defaults.mean()) < 0.01 and abs(defaults.std() - 1.0) < 0.01


def test_scaling_by_hand_and_as_model_replacement():
    own = np.array([[1.0, 1.0]], np.float32)
    received = np.array([[[2.0, 0.0], [1.0, 1.0]]], np.float32)
    valid = np.ones((1, 2), bool)
    byzantine = np.array([[True, False]])
    out = attacks.byzantine_weights("scaling", None, own, received, valid, byzantine,
                                    np.random.default_rng(0))
    # 1 + 10 (2 - 1) = 11 and 1 + 10 (0 - 1) = -9
    np.testing.assert_array_equal(out[0, 0], [11.0, -9.0])
    # factor = n_i = 3 (own + 2 slots): the receiver's plain average becomes the attacker's
    # model when the honest neighbour agrees with the receiver
    out = attacks.byzantine_weights("scaling", {"factor": 3}, own, received, valid, byzantine,
                                    np.random.default_rng(0))
    np.testing.assert_allclose((own[0] + out[0].sum(0)) / 3, [2.0, 0.0], rtol=1e-6)
    # and against the loop reference on the random case
    expected = _slot_loop(lambda own, x_b, honest, deg, f: own + 10 * (x_b - own))
    np.testing.assert_allclose(_run("scaling"), expected, rtol=1e-5, atol=1e-5)


def test_alie_z_by_hand():
    # n = 6, f = 2: s = floor(6/2 + 1) - 2 = 2, probability (6 - 2) / 6 = 2/3,
    # Phi^-1(2/3) = 0.43072730 (normal table)
    assert attacks.alie_z([6], [2])[0] == pytest.approx(0.4307273, abs=1e-6)
    # n = 6, f = 1: s = 3, probability 1/2, z = 0 (sends the honest mean)
    assert attacks.alie_z([6], [1])[0] == pytest.approx(0.0, abs=1e-12)
    # n = 11, f = 2: s = 4, probability 7/11, Phi^-1(0.63636) = 0.34885
    assert attacks.alie_z([11], [2])[0] == pytest.approx(0.34876, abs=1e-4)
    # n = 4, f = 3: s = 0, probability 1 -> clipped to 0.999, Phi^-1(0.999) = 3.090232
    assert attacks.alie_z([4], [3])[0] == pytest.approx(3.090232, abs=1e-5)
    # vectorised: the same numbers, in order
    np.testing.assert_allclose(attacks.alie_z([4, 6, 11, 6], [3, 2, 2, 1]),
                               [3.090232, 0.4307273, 0.34876, 0.0], atol=1e-4)


def _alie_reference(z=None):
    inv_cdf = statistics.NormalDist().inv_cdf

    def forge(own, x_b, honest, deg, f):
        pool = np.stack([own] + honest)
        n = deg + 1
        s = math.floor(n / 2 + 1) - f
        zz = z if z is not None else inv_cdf(min(max((n - s) / n, 0.001), 0.999))
        std = pool.std(0, ddof=1) if len(pool) > 1 else np.zeros_like(own)
        return pool.mean(0) - zz * std
    return _slot_loop(forge)


def test_alie_against_a_receiver_loop():
    np.testing.assert_allclose(_run("alie", {"z": None}), _alie_reference(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(_run("alie"), _alie_reference(1.5), rtol=1e-5, atol=1e-6)


def test_alie_and_ipm_without_honest_neighbours_use_the_receiver_alone():
    own = _case()[0]
    np.testing.assert_array_equal(_run("alie")[4, 0], own[4])  # std of one vector: 0
    np.testing.assert_allclose(_run("ipm", {"epsilon": 3})[4, 0], -3 * own[4], rtol=1e-6)


@pytest.mark.parametrize("epsilon", [0.1, 100.0])
def test_ipm_is_minus_epsilon_times_the_honest_mean(epsilon):
    expected = _slot_loop(lambda own, x_b, honest, deg, f:
                          -epsilon * np.mean(np.stack([own] + honest), 0))
    out = _run("ipm", None if epsilon == 0.1 else {"epsilon": epsilon})
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_dissensus_by_hand_on_three_neighbours():
    own = np.array([[0.0, 0.0]], np.float32)
    received = np.array([[[1.0, 2.0], [3.0, -2.0], [9.0, 9.0]]], np.float32)
    valid = np.ones((1, 3), bool)
    byzantine = np.array([[False, False, True]])
    out = attacks.byzantine_weights("dissensus", None, own, received, valid, byzantine,
                                    np.random.default_rng(0))
    # uniform weights 1/4: sum_j w (x_j - own) = [4, 0] / 4 = [1, 0]; divided by the Byzantine
    # weight 1/4 -> [4, 0]; own - 1.5 [4, 0] = [-6, 0]
    np.testing.assert_allclose(out[0, 2], [-6.0, 0.0])
    # epsilon = 1 cancels the honest pull exactly: the receiver's average stays at own
    out = attacks.byzantine_weights("dissensus", {"epsilon": 1}, own, received, valid,
                                    byzantine, np.random.default_rng(0))
    np.testing.assert_allclose((own[0] + out[0].sum(0)) / 4, own[0], atol=1e-6)
    # two Byzantine slots share the pull: each sends own - 1.5 * (x_1 - own) / 2 = [-0.75, -1.5]
    byzantine = np.array([[False, True, True]])
    out = attacks.byzantine_weights("dissensus", None, own, received, valid, byzantine,
                                    np.random.default_rng(0))
    np.testing.assert_allclose(out[0, 1:], [[-0.75, -1.5], [-0.75, -1.5]])


def test_dissensus_against_a_receiver_loop():
    expected = _slot_loop(lambda own, x_b, honest, deg, f:
                          own - 1.5 * sum((x - own for x in honest), np.zeros_like(own)) / f)
    np.testing.assert_allclose(_run("dissensus"), expected, rtol=1e-5, atol=1e-5)


# -- parameters --------------------------------------------------------------------------------
def test_defaults_are_the_documented_ones():
    assert attacks.DEFAULT_PARAMS == {
        "sign_flip": {"scale": 1.0}, "gaussian": {"mean": 0.0, "std": 1.0},
        "scaling": {"factor": 10.0}, "alie": {"z": 1.5}, "ipm": {"epsilon": 0.1},
        "dissensus": {"epsilon": 1.5}}


def test_check_params_fills_defaults_and_returns_a_copy():
    assert attacks.check_params("ipm", None) == {"epsilon": 0.1}
    assert attacks.check_params("ipm", {"epsilon": 100}) == {"epsilon": 100.0}
    assert attacks.check_params("alie", {"z": 2}) == {"z": 2.0}
    assert attacks.check_params("gaussian", {"std": 0}) == {"mean": 0.0, "std": 0.0}
    resolved = attacks.check_params("scaling", {})
    resolved["factor"] = -1
    assert attacks.DEFAULT_PARAMS["scaling"] == {"factor": 10.0}


@pytest.mark.parametrize("attack, params, names", [
    ("bogus", None, ["'bogus'", "sign_flip", "dissensus"]),
    ("ipm", {"eps": 1.0}, ["'eps'", "epsilon"]),
    ("sign_flip", {"factor": 2}, ["'factor'", "scale"]),
    ("ipm", {"epsilon": -1}, ["epsilon", "-1"]),
    ("dissensus", {"epsilon": 0}, ["epsilon", "positive"]),
    ("gaussian", {"std": -0.5}, ["std", "-0.5"]),
    ("alie", {"z": float("nan")}, ["z", "nan"]),
    ("sign_flip", {"scale": True}, ["scale", "True"]),
    ("scaling", {"factor": "10"}, ["factor", "'10'"])])
def test_check_params_errors_name_the_bad_thing(attack, params, names, one_line_error):
    one_line_error(attacks.check_params, attack, params, names=names)
    with pytest.raises(ValueError):  # byzantine_weights checks too
        _run(attack, params)
