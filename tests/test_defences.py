"""Robust neighbour averaging (ntkdfl_tf.defences) against independent references.

The references are hand computations on tiny arrays and explicit per-receiver Python loops
written here from the rules' definitions, never values copied from the module's output.
"""

import importlib.util
import itertools
import math
import pathlib

import numpy as np
import pytest

# Load the module from its file: it is pure NumPy, and importing the package would pull in
# TensorFlow (seconds) for nothing.
_PATH = pathlib.Path(__file__).resolve().parents[1] / "ntkdfl_tf" / "defences.py"
_SPEC = importlib.util.spec_from_file_location("_defences_under_test", _PATH)
defences = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(defences)

RULES = [
    ("none", {}),
    ("median", {}),
    ("trimmed_mean", {"f": 1}),
    ("clipping", {}),                       # fixed tau = 1 (the reference's experiments)
    ("clipping", {"tau": None, "f": 1}),    # the reference's adaptive radius
    ("balance", {"gamma": 0.8, "alpha": 0.3}),
]
IDS = [f"{r}{'-' + '-'.join(f'{k}{v}' for k, v in p.items()) if p else ''}" for r, p in RULES]


def _batch(seed=0, k=6, d=5, p=7):
    """Random receivers with 0..d valid slots (some padding in between), zero padding."""
    rng = np.random.default_rng(seed)
    own = rng.normal(size=(k, p)).astype(np.float32)
    # Neighbours near their receiver, so that clipping and balance accept some and not others.
    spread = rng.uniform(0.05, 0.8, size=(k, d, 1))
    received = (own[:, None] + spread * rng.normal(size=(k, d, p))).astype(np.float32)
    valid = rng.random((k, d)) < 0.7
    valid[0] = True          # a full row
    valid[1] = False         # a receiver that lost every link
    valid[2] = [True, False, True, False, False][:d] + [False] * max(0, d - 5)
    received[~valid] = 0.0
    return own, received, valid


# ---------------------------------------------------------------------------- references


def _closed(own, received, valid, i):
    return np.vstack([own[i][None], received[i][valid[i]]]).astype(np.float64)


def _ref_tau(own_i, neighbours, params):
    """The radius as the reference code picks it (codes/aggregator.py)."""
    if params["tau"] is not None:
        return params["tau"]
    distances = [np.linalg.norm(x - own_i) for x in neighbours]
    if not distances:
        return 0.0
    f = params["f"]
    if f == 1:  # the reference's own lines
        return sorted(distances)[-2] if len(distances) >= 2 else distances[-1]
    return sorted(distances)[max(len(distances) - 1 - f, 0)]


def _reference(rule, params, own, received, valid, t=0, total=1):
    """A per-receiver loop straight from each rule's definition (float64)."""
    params = {**defences.DEFAULT_PARAMS[rule], **params}
    out, accepted, radius = [], np.zeros(valid.shape, bool), np.full(len(own), np.inf)
    for i in range(len(own)):
        closed = _closed(own, received, valid, i)
        x, neighbours, slots = closed[0], closed[1:], np.flatnonzero(valid[i])
        m = len(closed)
        if rule == "none":
            out.append(closed.mean(axis=0))
            accepted[i, slots] = True
        elif rule == "median":
            out.append(np.median(closed, axis=0))
            accepted[i, slots] = True
        elif rule == "trimmed_mean":
            f = params["f"]
            column_sorted = np.sort(closed, axis=0)
            out.append(column_sorted[f:m - f].mean(axis=0) if m > 2 * f
                       else np.median(closed, axis=0))
            accepted[i, slots] = True
        elif rule == "clipping":
            tau = _ref_tau(x, neighbours, params)
            new = x.copy()
            for s, xj in zip(slots, neighbours):
                z = xj - x
                norm = np.linalg.norm(z)
                new += (z * min(1.0, tau / norm) if norm > 0 else z) / m
                accepted[i, s] = norm <= tau
            out.append(new)
            radius[i] = tau
        elif rule == "balance":
            r = params["gamma"] * math.exp(-params["kappa"] * t / total) * np.linalg.norm(x)
            keep = [xj for s, xj in zip(slots, neighbours) if np.linalg.norm(x - xj) <= r]
            for s, xj in zip(slots, neighbours):
                accepted[i, s] = np.linalg.norm(x - xj) <= r
            out.append(params["alpha"] * x + (1 - params["alpha"]) * np.mean(keep, axis=0)
                       if keep else x)
            radius[i] = r
    return np.array(out), accepted, radius


# ------------------------------------------------------------------ shared properties


@pytest.mark.parametrize("rule,params", RULES, ids=IDS)
def test_shared_properties(rule, params):
    own, received, valid = _batch()
    k, d, p = received.shape
    res = defences.robust_average(rule, params, own, received, valid)

    # Shapes and dtypes.
    assert res.weights.shape == (k, p) and res.weights.dtype == np.float32
    assert res.accepted.shape == (k, d) and res.accepted.dtype == bool
    assert res.radius.shape == (k,)
    assert not res.accepted[~valid].any()
    # A receiver without neighbours keeps its own weights.
    np.testing.assert_allclose(res.weights[1], own[1], rtol=1e-6, atol=1e-6)

    # Every neighbour identical to own: the output is own.
    same = np.repeat(own[:, None], d, axis=1)
    np.testing.assert_allclose(defences.robust_average(rule, params, own, same, valid).weights,
                               own, rtol=1e-6, atol=1e-6)

    # Permuting a receiver's slots (valid ones and padding alike) changes nothing.
    rng = np.random.default_rng(1)
    perm = np.stack([rng.permutation(d) for _ in range(k)])
    shuffled = defences.robust_average(rule, params, own,
                                       np.take_along_axis(received, perm[..., None], axis=1),
                                       np.take_along_axis(valid, perm, axis=1))
    np.testing.assert_allclose(shuffled.weights, res.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(shuffled.accepted, np.take_along_axis(res.accepted, perm, 1))
    np.testing.assert_allclose(shuffled.radius, res.radius, rtol=1e-6)

    # Padding never matters: huge, infinite or NaN values in invalid slots change nothing.
    for junk in (1e30, -3e38, np.inf, np.nan):
        padded = received.copy()
        padded[~valid] = junk
        again = defences.robust_average(rule, params, own, padded, valid)
        np.testing.assert_array_equal(again.weights, res.weights)
        np.testing.assert_array_equal(again.accepted, res.accepted)
        np.testing.assert_array_equal(again.radius, res.radius)

    # Receivers are independent: changing receiver 3's data leaves the others untouched.
    own2, received2 = own.copy(), received.copy()
    own2[3] += 100.0
    received2[3] = rng.normal(scale=1e3, size=(d, p))
    other = defences.robust_average(rule, params, own2, received2, valid)
    rest = np.arange(k) != 3
    np.testing.assert_array_equal(other.weights[rest], res.weights[rest])
    np.testing.assert_array_equal(other.accepted[rest], res.accepted[rest])
    np.testing.assert_array_equal(other.radius[rest], res.radius[rest])


@pytest.mark.parametrize("rule,params", RULES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_receiver_loop(rule, params, seed):
    own, received, valid = _batch(seed, k=7, d=6, p=5)
    res = defences.robust_average(rule, params, own, received, valid, round_index=2,
                                  total_rounds=5)
    want, accepted, radius = _reference(rule, params, own, received, valid, t=2, total=5)
    np.testing.assert_allclose(res.weights, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.accepted, accepted)
    np.testing.assert_allclose(res.radius, radius, rtol=1e-6)


# ----------------------------------------------------------------- hand computations


def _one(own, received):
    """One receiver with every slot valid."""
    received = np.asarray(received, np.float32)[None]
    return (np.asarray(own, np.float32)[None], received,
            np.ones(received.shape[:2], bool))


def test_none_by_hand():
    res = defences.robust_average("none", None, *_one([0, 0, 0], [[3, 6, 9], [3, 0, -3]]))
    np.testing.assert_array_equal(res.weights, [[2, 2, 2]])
    assert res.accepted.all() and np.isinf(res.radius).all()


def test_none_is_the_exact_uniform_mean():
    own, received, valid = _batch(3)
    res = defences.robust_average("none", {}, own, received, valid)
    m = (1 + valid.sum(1)).astype(np.float32)
    total = own + (received * valid[..., None]).sum(1)  # padding is zero here
    np.testing.assert_allclose(res.weights, total / m[:, None], rtol=2e-7, atol=1e-7)


def test_median_by_hand():
    # Four values per coordinate (even): the mean of the middle two.
    res = defences.robust_average("median", {}, *_one(
        [0, 0, 0], [[1, 5, -1], [2, -4, 7], [10, 1, 1]]))
    # c0: 0 1 2 10 -> 1.5; c1: -4 0 1 5 -> 0.5; c2: -1 0 1 7 -> 0.5
    np.testing.assert_array_equal(res.weights, [[1.5, 0.5, 0.5]])
    # Three values (odd): the middle one.
    res = defences.robust_average("median", {}, *_one([0, 0, 0], [[1, 5, -1], [2, -4, 7]]))
    np.testing.assert_array_equal(res.weights, [[1, 0, 0]])


def test_trimmed_mean_by_hand():
    res = defences.robust_average("trimmed_mean", {"f": 1}, *_one(
        [0, 0, 0], [[1, 5, -1], [2, -4, 7], [10, 1, 1], [4, 4, 4]]))
    # c0: 0 1 2 4 10 -> mean(1, 2, 4); c1: -4 0 1 4 5 -> mean(0, 1, 4); c2: -1 0 1 4 7 -> same
    np.testing.assert_allclose(res.weights, [[7 / 3, 5 / 3, 5 / 3]], rtol=1e-6)
    assert res.accepted.all()


def test_clipping_fixed_tau_by_hand():
    res = defences.robust_average("clipping", {"tau": 1.0}, *_one(
        [0, 0, 0], [[3, 4, 0], [0, 0.5, 0]]))
    # [3, 4, 0] (norm 5) is clipped to [0.6, 0.8, 0]; [0, 0.5, 0] passes; m = 3.
    np.testing.assert_allclose(res.weights, [[0.6 / 3, 1.3 / 3, 0]], rtol=1e-6)
    np.testing.assert_array_equal(res.accepted, [[False, True]])
    np.testing.assert_array_equal(res.radius, [1.0])


def test_clipping_adaptive_tau_by_hand():
    # Distances 5, 2, 1: tau = the second largest = 2, so only [3, 4, 0] is clipped.
    res = defences.robust_average("clipping", {"tau": None}, *_one(
        [0, 0, 0], [[3, 4, 0], [0, 2, 0], [1, 0, 0]]))
    # ([1.2, 1.6, 0] + [0, 2, 0] + [1, 0, 0]) / 4
    np.testing.assert_allclose(res.weights, [[0.55, 0.9, 0]], rtol=1e-6)
    np.testing.assert_array_equal(res.accepted, [[False, True, True]])
    np.testing.assert_allclose(res.radius, [2.0])
    # With a single neighbour the reference takes its distance: nothing is clipped.
    one = defences.robust_average("clipping", {"tau": None}, *_one([0, 0, 0], [[3, 4, 0]]))
    np.testing.assert_allclose(one.weights, [[1.5, 2, 0]], rtol=1e-6)
    np.testing.assert_allclose(one.radius, [5.0])
    # f = 2: the two farthest are clipped to the third distance.
    two = defences.robust_average("clipping", {"tau": None, "f": 2}, *_one(
        [0, 0, 0], [[3, 4, 0], [0, 2, 0], [1, 0, 0]]))
    np.testing.assert_allclose(two.weights, [[(0.6 + 1) / 4, (0.8 + 1) / 4, 0]], rtol=1e-6)
    np.testing.assert_allclose(two.radius, [1.0])


def test_balance_by_hand():
    own, received = [3, 4, 0], [[3, 5, 0], [4, 4, 1], [0, 0, 0]]  # distances 1, 1.414, 5
    params = {"gamma": 0.3, "kappa": 1.0, "alpha": 0.5}
    # t = 0: radius 0.3 * 5 = 1.5, the first two accepted.
    res = defences.robust_average("balance", params, *_one(own, received), round_index=0,
                                  total_rounds=10)
    np.testing.assert_allclose(res.weights, [[0.5 * 3 + 0.5 * 3.5, 0.5 * 4 + 0.5 * 4.5, 0.25]],
                               rtol=1e-6)
    np.testing.assert_array_equal(res.accepted, [[True, True, False]])
    np.testing.assert_allclose(res.radius, [1.5])
    # t = 1 of 10: radius 1.5 * e^-0.1 = 1.357, only the first.
    res = defences.robust_average("balance", params, *_one(own, received), round_index=1,
                                  total_rounds=10)
    np.testing.assert_allclose(res.weights, [[3, 4.5, 0]], rtol=1e-6)
    np.testing.assert_allclose(res.radius, [1.5 * math.exp(-0.1)])
    # alpha = 0.2 keeps a fifth of the own model.
    res = defences.robust_average("balance", {**params, "alpha": 0.2}, *_one(own, received),
                                  round_index=1, total_rounds=10)
    np.testing.assert_allclose(res.weights, [[3, 0.2 * 4 + 0.8 * 5, 0]], rtol=1e-6)
    # t = 5 of 10: radius 0.91 < 1, nothing accepted: own unchanged.
    res = defences.robust_average("balance", params, *_one(own, received), round_index=5,
                                  total_rounds=10)
    np.testing.assert_array_equal(res.weights, [own])
    assert not res.accepted.any()


# ------------------------------------------------------------------------ robustness


def test_one_huge_outlier():
    rng = np.random.default_rng(4)
    honest = (1.0 + 0.05 * rng.normal(size=(5, 3))).astype(np.float32)
    own, others = honest[:1], honest[1:]
    received = np.vstack([others, np.full((1, 3), 1e6, np.float32)])[None]
    valid = np.ones((1, 5), bool)
    lo, hi = honest.min(0), honest.max(0)
    reach = np.linalg.norm(others - own, axis=1).max()

    def run(rule, params=None):
        return defences.robust_average(rule, params, own, received, valid).weights[0]

    assert np.linalg.norm(run("none") - own[0]) > 1e4         # dragged away
    for rule, params in [("median", {}), ("trimmed_mean", {"f": 1}),
                         ("balance", {"gamma": 0.3})]:
        out = run(rule, params)
        assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6), rule
    # Clipping: each step is at most tau, so the result stays in the ball of radius tau
    # (fixed) or of the farthest honest neighbour (adaptive: tau = an honest distance).
    assert np.linalg.norm(run("clipping", {"tau": 1.0}) - own[0]) <= 1.0
    assert np.linalg.norm(run("clipping", {"tau": None}) - own[0]) <= reach + 1e-6
    # BALANCE rejects exactly the outlier.
    res = defences.robust_average("balance", {"gamma": 0.3}, own, received, valid)
    np.testing.assert_array_equal(res.accepted, [[True, True, True, True, False]])


def test_non_finite_sender_does_not_poison_robust_rules():
    own, received, valid = _one([1, 1, 1], [[1.1, 0.9, 1.0], [0.9, 1.1, 1.0], [np.nan] * 3,
                                            [1.0, 1.0, 1.05]])
    for rule, params in [("median", {}), ("trimmed_mean", {"f": 1}), ("clipping", {}),
                         ("clipping", {"tau": None}), ("balance", {})]:
        res = defences.robust_average(rule, params, own, received, valid)
        assert np.isfinite(res.weights).all(), rule


# ------------------------------------------------------------- trimmed mean fallback


def test_trimmed_mean_falls_back_to_median():
    rng = np.random.default_rng(5)
    own = rng.normal(size=(2, 4)).astype(np.float32)
    received = rng.normal(size=(2, 5, 4)).astype(np.float32)
    valid = np.array([[True, True, False, False, False],     # m = 3 <= 2f = 4: median
                      [True, True, True, True, True]])       # m = 6: trim 2 from each end
    res = defences.robust_average("trimmed_mean", {"f": 2}, own, received, valid)
    closed0 = np.vstack([own[0], received[0, :2]])
    np.testing.assert_allclose(res.weights[0], np.median(closed0, axis=0), rtol=1e-6)
    closed1 = np.sort(np.vstack([own[1], received[1]]), axis=0)
    np.testing.assert_allclose(res.weights[1], closed1[2:4].mean(axis=0), rtol=1e-6)
    # m = 4 = 2f exactly: still the median (even count: mean of the middle two).
    valid[0, 2] = True
    res = defences.robust_average("trimmed_mean", {"f": 2}, own, received, valid)
    closed0 = np.vstack([own[0], received[0, :3]])
    np.testing.assert_allclose(res.weights[0], np.median(closed0, axis=0), rtol=1e-6)


def test_check_neighbourhood():
    with pytest.raises(ValueError, match=r"f=2.*\b4\b") as err:
        defences.check_neighbourhood("trimmed_mean", {"f": 2}, 4)
    assert "f <= 1" in str(err.value)
    with pytest.raises(ValueError, match="f=1"):
        defences.check_neighbourhood("trimmed_mean", {}, 2)
    defences.check_neighbourhood("trimmed_mean", {"f": 2}, 5)
    for rule in defences.WEIGHT_RULES:
        if rule != "trimmed_mean":
            defences.check_neighbourhood(rule, {}, 1)
    with pytest.raises(ValueError, match="neighbourhood_size"):
        defences.check_neighbourhood("median", {}, 0)
    with pytest.raises(ValueError, match="krum"):
        defences.check_neighbourhood("krum", {}, 5)


# ------------------------------------------------------------------------ parameters


def test_check_params_defaults():
    assert defences.WEIGHT_RULES == ("none", "median", "trimmed_mean", "clipping", "balance")
    assert set(defences.DEFAULT_PARAMS) == set(defences.WEIGHT_RULES)
    assert defences.check_params("balance", {"alpha": 0.2}) == {
        "gamma": 0.3, "kappa": 1.0, "alpha": 0.2}
    assert defences.DEFAULT_PARAMS["balance"]["alpha"] == 0.5      # not mutated
    assert defences.check_params("trimmed_mean", None) == {"f": 1}
    assert defences.check_params("trimmed_mean", {"f": 3.0}) == {"f": 3}  # CLI-parsed floats
    assert defences.check_params("clipping", {"tau": None})["tau"] is None
    assert defences.check_params("none", {}) == {}


@pytest.mark.parametrize("rule,params,names", [
    ("krum", {}, ["krum", "trimmed_mean", "balance"]),
    ("balance", {"g": 1}, ["'g'", "gamma", "kappa", "alpha"]),
    ("median", {"f": 1}, ["'f'", "median"]),
    ("trimmed_mean", {"f": -1}, ["f=-1"]),
    ("trimmed_mean", {"f": 1.5}, ["f=1.5"]),
    ("trimmed_mean", {"f": True}, ["f=True"]),
    ("trimmed_mean", {"f": "1"}, ["f='1'"]),
    ("clipping", {"tau": -1.0}, ["tau=-1.0"]),
    ("clipping", {"tau": 0}, ["tau=0"]),
    ("clipping", {"tau": None, "f": -2}, ["f=-2"]),
    ("balance", {"gamma": 0}, ["gamma=0"]),
    ("balance", {"gamma": float("nan")}, ["gamma=nan"]),
    ("balance", {"alpha": 1.5}, ["alpha=1.5", "[0, 1]"]),
    ("balance", {"kappa": -1}, ["kappa=-1"]),
    ("balance", [("gamma", 1)], ["dict"]),
])
def test_check_params_errors(rule, params, names, one_line_error):
    one_line_error(defences.check_params, rule, params, names=names)


def test_shape_and_round_errors():
    own, received, valid = _batch()
    with pytest.raises(ValueError, match=r"own must be \[K, P\]"):
        defences.robust_average("none", {}, own[0], received, valid)
    with pytest.raises(ValueError, match=r"received must be \[K, D, P\]"):
        defences.robust_average("none", {}, own, received[..., :-1], valid)
    with pytest.raises(ValueError, match=r"received must be \[K, D, P\]"):
        defences.robust_average("none", {}, own, received[:-1], valid)
    with pytest.raises(ValueError, match=r"valid must be \[K, D\]"):
        defences.robust_average("none", {}, own, received, valid[:, :-1])
    with pytest.raises(ValueError, match="total_rounds=0"):
        defences.robust_average("balance", {}, own, received, valid, total_rounds=0)
    with pytest.raises(ValueError, match="round_index=-1"):
        defences.robust_average("balance", {}, own, received, valid, round_index=-1)
    with pytest.raises(ValueError, match="krum"):
        defences.robust_average("krum", {}, own, received, valid)


def test_no_received_slots():
    own = np.arange(6, dtype=np.float32).reshape(2, 3)
    for rule, params in RULES:
        res = defences.robust_average(rule, params, own, np.zeros((2, 0, 3), np.float32),
                                      np.zeros((2, 0), bool))
        np.testing.assert_allclose(res.weights, own, rtol=1e-6)
        assert res.accepted.shape == (2, 0)


# ------------------------------------------------------------------ final aggregation


def test_robust_final_average_drops_far_outliers():
    rng = np.random.default_rng(6)
    honest = (1.0 + 0.1 * rng.normal(size=(8, 4))).astype(np.float32)
    flat = np.vstack([honest[:3], np.full((1, 4), 50.0), honest[3:],
                      np.full((1, 4), -80.0), np.full((1, 4), np.nan)]).astype(np.float32)
    is_honest = np.array([True] * 3 + [False] + [True] * 5 + [False, False])
    res = defences.robust_final_average(flat)
    np.testing.assert_array_equal(res.kept, is_honest)
    assert res.weights.dtype == np.float32 and res.weights.shape == (4,)
    hand = sum(honest.astype(np.float64)) / 8
    np.testing.assert_allclose(res.weights, hand, rtol=1e-6)


def test_robust_final_average_cut_by_hand():
    # One coordinate: median 0.5, d = .5 .5 1.5 1.5 2.5 |x - .5|, median(d) = 1.5, MAD = 1,
    # cut = 1.5 + 3 * 1.4826 = 5.948: x = 6 (d 5.5) is kept, x = 7 (d 6.5) is not.
    base = [0.0, 1.0, -1.0, 2.0, -2.0]
    res = defences.robust_final_average(np.array(base + [6.0], np.float32)[:, None])
    assert res.kept.all()
    np.testing.assert_allclose(res.weights, [6.0 / 6], rtol=1e-6)
    res = defences.robust_final_average(np.array(base + [7.0], np.float32)[:, None])
    np.testing.assert_array_equal(res.kept, [True] * 5 + [False])
    np.testing.assert_allclose(res.weights, [0.0], atol=1e-7)


def test_robust_final_average_keeps_everyone_honest():
    rng = np.random.default_rng(7)
    flat = rng.normal(size=(10, 6)).astype(np.float32)
    res = defences.robust_final_average(flat)
    assert res.kept.all()
    np.testing.assert_allclose(res.weights, flat.astype(np.float64).mean(0), rtol=1e-5,
                               atol=1e-6)
    # At least the half closest to the median is always kept.
    for k, seed in itertools.product((1, 2, 5, 9), range(3)):
        flat = np.random.default_rng(seed).standard_cauchy(size=(k, 3)).astype(np.float32)
        assert defences.robust_final_average(flat).kept.sum() >= math.ceil(k / 2)
    with pytest.raises(ValueError, match=r"flat must be \[K, P\]"):
        defences.robust_final_average(np.zeros(3))
