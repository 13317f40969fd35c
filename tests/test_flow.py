"""Function-space flows against NumPy references; NTK-DFL updates against weight-space descent."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import kernels
from ntkdfl_tf.algorithms import NTKDFL
from ntkdfl_tf.algorithms.base import ClientTensors
from ntkdfl_tf.algorithms.ntkdfl import ADAPTIVE_FLOWS
from ntkdfl_tf.functional import ModelFunctions
from ntkdfl_tf.kernels import flow as flow_module

B, N, C = 2, 12, 3
EULER = tf.function(kernels.euler_flow)  # traced: eager while-loops are slow
ADAPTIVE = tf.function(kernels.adaptive_euler_flow)


def _problem(scale, top=0.0, seed=0):
    """Random PSD kernels (zeroed at padding), logits, one-hot labels, mask and counts.

    ``top`` adds an NTK-like dominant, nearly constant mode (the bias direction) to a Wishart tail.
    """
    rng = np.random.default_rng(seed)
    mask = np.ones((B, N), np.float32)
    mask[1, 9:] = 0.0
    a = rng.standard_normal((B, N, N))
    v = 1.0 + 0.2 * rng.standard_normal((B, N, 1))
    h = scale * a @ np.swapaxes(a, 1, 2) / N + top * v @ np.swapaxes(v, 1, 2)
    h = h * mask[:, :, None] * mask[:, None, :]
    f0 = rng.standard_normal((B, N, C)).astype(np.float32)
    y = np.eye(C, dtype=np.float32)[rng.integers(0, C, (B, N))] * mask[..., None]
    return h.astype(np.float32), f0, y, mask, mask.sum(1)


def _tf(*arrays):
    return [tf.constant(a) for a in arrays]


def _rel(actual, expected):
    return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)


def _softmax(f):
    e = np.exp(f - f.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mse_closed_form_and_euler_match_exact_solution():
    """MSE: closed form equals the NumPy eigen-solution; fine-step Euler converges to it."""
    h, f0, y, mask, n = _problem(scale=20.0)
    eta, taus = 0.05, (5, 20, 50)
    m = mask[..., None].astype(np.float64)
    # exact: f(t) - Y = exp(-t H/(N C)) (f0 - Y) on real rows; R_tau = sum_{s<tau} (f(s eta) - Y)/C
    lam, q = np.linalg.eigh(h.astype(np.float64))

    def f_at(t):
        decay = np.exp(-t * np.maximum(lam, 0) / (n[:, None] * C))
        return y + q @ (decay[..., None] * (np.swapaxes(q, 1, 2) @ ((f0 - y) * m)))

    r_ref = np.stack([sum((f_at(s * eta) - y) * m / C for s in range(t)) for t in taus])
    f_ref = np.stack([f_at(t * eta) * m + f0 * (1 - m) for t in taus])

    args = _tf(h, f0, y, mask, n) + [tf.constant(eta), tf.constant(taus)]
    r_closed, f_closed = kernels.mse_closed_form(*args)
    assert _rel(r_closed, r_ref) < 1e-4 and _rel(f_closed, f_ref) < 1e-4
    r_euler, f_euler = EULER(*args, substeps=tf.constant(200), loss="mse")
    assert r_euler.shape == (len(taus), B, N, C)
    for t in range(len(taus)):
        assert _rel(r_euler[t], r_closed[t]) < 2e-3
        assert _rel(f_euler[t], f_closed[t]) < 2e-3
    assert np.all(np.asarray(r_euler)[:, 1, 9:] == 0)  # padding rows never accumulate


def test_cross_entropy_flow_matches_rk4_reference():
    """CE: Euler with euler_substeps steps matches an RK4 NumPy reference on the eta grid."""
    h, f0, y, mask, n = _problem(scale=3.0, top=20.0, seed=1)
    eta, taus = 0.1, (10, 30, 60)
    lam = np.linalg.eigvalsh(h.astype(np.float64)).max(-1)
    assert 1.5 < eta * lam.max() / N < 4  # stiff: one Euler step per grid step is marginal
    args = _tf(h, f0, y, mask, n) + [tf.constant(eta), tf.constant(taus)]
    substeps = int(kernels.euler_substeps(args[0], args[4], args[5]))
    assert eta / substeps * lam.max() / N / 2 <= 1.0  # the documented stability rule

    m, hd, fine = mask[..., None].astype(np.float64), h.astype(np.float64), 50
    rhs = lambda f: -(hd @ ((_softmax(f) - y) * m)) / n[:, None, None]
    f, acc, r_ref, f_ref = f0.astype(np.float64), 0.0, [], []
    for s in range(max(taus)):
        acc = acc + (_softmax(f) - y) * m
        for _ in range(fine):
            dt = eta / fine
            k1 = rhs(f); k2 = rhs(f + dt / 2 * k1); k3 = rhs(f + dt / 2 * k2); k4 = rhs(f + dt * k3)
            f = f + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if s + 1 in taus:
            r_ref.append(acc)
            f_ref.append(f)

    def errors(k):
        r, f = EULER(*args, substeps=tf.constant(k))
        return np.array([[_rel(r[t], r_ref[t]), _rel(f[t], f_ref[t])] for t in range(len(taus))])

    chosen, finer = errors(substeps), errors(4 * substeps)
    assert np.all(chosen < 1e-2)  # R_tau and f(tau * eta)
    assert np.all(finer < chosen / 2.5)  # first-order convergence towards the reference


def _rk4_reference(h, f0, y, mask, n, eta, taus, fine=50):
    """R_tau and f(tau * eta) of the CE flow by RK4 with ``fine`` steps per grid step (NumPy)."""
    m, hd = mask[..., None].astype(np.float64), h.astype(np.float64)
    rhs = lambda f: -(hd @ ((_softmax(f) - y) * m)) / n[:, None, None]
    f, acc, r_ref, f_ref = f0.astype(np.float64), 0.0, [], []
    for s in range(max(taus)):
        acc = acc + (_softmax(f) - y) * m
        for _ in range(fine):
            dt = eta / fine
            k1 = rhs(f); k2 = rhs(f + dt / 2 * k1); k3 = rhs(f + dt / 2 * k2); k4 = rhs(f + dt * k3)
            f = f + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if s + 1 in taus:
            r_ref.append(acc)
            f_ref.append(f)
    return r_ref, f_ref


def _confidently_wrong(y):
    """Logits that put 8 nats on a wrong class: S(f0) ~ 0, and it grows as the flow fixes them."""
    return (8.0 * np.roll(y, 1, axis=-1)).astype(np.float32)


@pytest.mark.parametrize("start", ["random", "confidently_wrong"])
def test_flow_stiffness_matches_explicit_eigenvalues(start):
    """mu = lambda_max((1/N) H S(f)) against NumPy's eigenvalues of the explicit NC x NC matrix."""
    h, f0, y, mask, n = _problem(scale=3.0, top=20.0, seed=1)
    f = f0 if start == "random" else _confidently_wrong(y)
    mu, _ = kernels.flow_stiffness(*_tf(h, f, mask, n))
    for b in range(B):
        p = _softmax(f[b].astype(np.float64))
        s = np.zeros((N * C, N * C))
        for i in np.flatnonzero(mask[b]):
            s[i * C:(i + 1) * C, i * C:(i + 1) * C] = np.diag(p[i]) - np.outer(p[i], p[i])
        a = np.kron(h[b].astype(np.float64), np.eye(C)) @ s / n[b]
        expected = np.linalg.eigvals(a).real.max()
        assert abs(mu[b] - expected) < 0.05 * expected
        assert expected <= np.linalg.eigvalsh(h[b].astype(np.float64)).max() / n[b] / 2 + 1e-9


@pytest.mark.parametrize("start", ["random", "confidently_wrong"])
# eta = 0.1: lambda_max(H/N) eta ~ 2, in the range measured on Fashion-MNIST (bound 2-6
# sub-steps), at NTKDFL's recheck of 25 grid steps. eta = 1 is 2-5x stiffer per grid step than
# measured (the bound asks 12 sub-steps): there
# a confidently wrong start needs re-estimates every 5 grid steps (at 25 it errs 15-48% with the
# loss still monotone: the limit the README states).
@pytest.mark.parametrize("eta,taus,recheck", [(0.1, (10, 30, 60), 25), (1.0, (20, 60, 150), 5)])
def test_adaptive_flow_matches_rk4_reference_with_fewer_steps(start, eta, taus, recheck):
    h, f0, y, mask, n = _problem(scale=3.0, top=20.0, seed=1)
    f0 = f0 if start == "random" else _confidently_wrong(y)
    r_ref, f_ref = _rk4_reference(h, f0, y, mask, n, eta, taus)
    args = _tf(h, f0, y, mask, n) + [tf.constant(eta)]
    r, f, substeps, monotone = ADAPTIVE(*args, taus=taus, recheck=recheck)
    bound = int(kernels.euler_substeps(args[0], args[4], args[5]))
    assert bool(monotone) and 1.0 <= float(substeps) < bound
    for t in range(len(taus)):  # measured: <= 4.2% (R) where the bound's step gives <= 0.8%
        assert _rel(r[t], r_ref[t]) < 0.06 and _rel(f[t], f_ref[t]) < 0.06
    # bound_step: the same flow as euler_flow with the bound's sub-steps
    r_b, f_b, steps_b, _ = ADAPTIVE(*args, taus=taus, recheck=recheck,
                                    bound_step=tf.constant(True))
    r_e, f_e = EULER(*args, tf.constant(taus), substeps=tf.constant(bound))
    assert float(steps_b) == bound
    np.testing.assert_allclose(r_b, r_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f_b, f_e, rtol=1e-5, atol=1e-5)


def test_adaptive_flow_reports_a_rising_loss(monkeypatch):
    """With the stiffness estimate forced to 0 (one step per grid step, far too long), the flow
    loss rises and ``monotone`` is False; the true stiffness keeps it True."""
    h, f0, y, mask, n = _problem(scale=3.0, top=20.0, seed=1)
    args = _tf(h, f0, y, mask, n) + [tf.constant(1.0)]
    assert bool(tf.function(kernels.adaptive_euler_flow)(*args, taus=(20, 60))[3])
    monkeypatch.setattr(flow_module, "flow_stiffness",
                        lambda h, f, mask, n, loss, iterations=30, start=None:
                        (tf.zeros_like(n), tf.zeros_like(f) if start is None else start))
    assert not bool(tf.function(kernels.adaptive_euler_flow)(*args, taus=(20, 60))[3])


@pytest.mark.parametrize("spectrum", ["wishart", "gapped"])
def test_lambda_max_matches_eigvalsh(spectrum):
    """Power iteration: exact with a spectral gap, never above and within 10% without one."""
    rng = np.random.default_rng(2)
    if spectrum == "wishart":
        h, *_ = _problem(scale=1.0, seed=3)
    else:  # top eigenvalue twice the next one
        q = np.linalg.qr(rng.standard_normal((B, N, N)))[0]
        lam = np.sort(rng.uniform(0.1, 1.0, (B, N)))
        lam[:, -1] = 2.0 * lam[:, -2]
        h = ((q * lam[:, None, :]) @ np.swapaxes(q, 1, 2)).astype(np.float32)
    expected = np.linalg.eigvalsh(h.astype(np.float64)).max(-1)
    got = kernels.lambda_max(tf.constant(h)).numpy()
    assert np.all(got <= expected * (1 + 1e-5))
    assert np.all(got >= expected * (0.9 if spectrum == "wishart" else 1 - 1e-4))


def _linear_setup(loss, eta, tau, d=4, **options):
    """A linear model (f = xW + b), two clients' weights and data (one padded), the algorithm."""
    keras.utils.set_random_seed(0)
    fns = ModelFunctions(keras.Sequential([keras.Input((d,)), keras.layers.Dense(C)]))
    rng = np.random.default_rng(4)
    w = [np.stack([v + 0.5 * b * rng.standard_normal(v.shape) for b in range(B)]).astype(np.float32)
         for v in fns.initial_weights()]
    x = rng.standard_normal((B, N, d)).astype(np.float32)
    mask = np.ones((B, N), np.float32)
    mask[1, 8:] = 0.0
    x *= mask[..., None]
    y = np.eye(C, dtype=np.float32)[rng.integers(0, C, (B, N))] * mask[..., None]
    clients = ClientTensors(tf.constant(x), tf.constant(y), tf.constant(mask),
                            mask.sum(1).astype(np.int64))
    weights = [tf.constant(v) for v in w]
    worker = NTKDFL(learning_rate=eta, taus=(tau,), loss=loss, **options).make_worker(fns)
    worker.bind(clients)
    h = kernels.make_kernel(fns, "dense")(weights, clients.features, clients.mask)
    result = worker._evolve(
        weights, weights, clients.features, clients.labels, clients.mask, h,
        tf.constant(eta, tf.float32), tf.ones((B, N)), tf.zeros((B, N, C)), tf.constant(False),
        None)
    assert bool(result.monotone)
    assert np.all(result.tau_index.numpy() == 0)
    return w, x, y, mask, h, [v.numpy() for v in result.weights], result.loss.numpy()


def _gradient(w, b, x, y, m, loss):
    """Gradient of the mean per-sample loss over real samples for f = xW + b (NumPy, float64)."""
    f = x @ w + b
    r = _softmax(f) - y if loss == "cross_entropy" else (f - y) / C
    r = r * m[:, None] / m.sum()
    return x.T @ r, r.sum(0)


def test_ntkdfl_cross_entropy_equals_gradient_descent_on_linear_model():
    """Linear model, one Euler step per grid step: the update is tau steps of full-batch GD."""
    eta, tau = 0.05, 7
    w, x, y, mask, h, new, cand_loss = _linear_setup("cross_entropy", eta, tau,
                                                     flow="euler_adaptive")
    assert int(kernels.euler_substeps(h, tf.constant(mask.sum(1)), tf.constant(eta))) == 1
    for b in range(B):
        wk, bk = w[0][b].astype(np.float64), w[1][b].astype(np.float64)
        for _ in range(tau):
            gw, gb = _gradient(wk, bk, x[b], y[b], mask[b], "cross_entropy")
            wk, bk = wk - eta * gw, bk - eta * gb
        np.testing.assert_allclose(new[0][b], wk, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new[1][b], bk, rtol=1e-4, atol=1e-5)
        p = _softmax(x[b] @ wk + bk)
        ce = -(np.log((p * y[b]).sum(-1) + (1 - mask[b])) * mask[b]).sum() / mask[b].sum()
        np.testing.assert_allclose(cand_loss[b], ce, rtol=1e-4)


@pytest.mark.parametrize("loss, options", [("mse", {}), ("mse", {"jit_compile": True}),
                                           ("cross_entropy", {})],
                         ids=["mse", "mse_jit", "cross_entropy"])
def test_ntkdfl_equals_riemann_sum_of_weight_space_gradient_flow(loss, options):
    """A linear model's NTK is exact, so the update (MSE: closed form; cross-entropy: the default
    flow) is -eta * sum_{s<tau} grad L(w(s eta)) along the exact weight-space gradient flow."""
    eta, tau, fine = 0.2, 6, 200
    w, x, y, mask, h, new, cand_loss = _linear_setup(loss, eta, tau, **options)
    lam = np.linalg.eigvalsh(np.asarray(h, np.float64)).max() / mask.sum(1).min() / C
    assert eta * lam > 0.05  # flow and discrete GD differ visibly at this step
    for b in range(B):
        wk, bk = w[0][b].astype(np.float64), w[1][b].astype(np.float64)
        w0, b0, sum_w, sum_b = wk, bk, 0.0, 0.0
        for _ in range(tau):
            gw, gb = _gradient(wk, bk, x[b], y[b], mask[b], loss)
            sum_w, sum_b = sum_w + gw, sum_b + gb
            for _ in range(fine):  # RK4 in weight space from t_s to t_{s+1}
                dt = eta / fine
                grad = lambda u, v: _gradient(u, v, x[b], y[b], mask[b], loss)
                k1 = grad(wk, bk)
                k2 = grad(wk - dt / 2 * k1[0], bk - dt / 2 * k1[1])
                k3 = grad(wk - dt / 2 * k2[0], bk - dt / 2 * k2[1])
                k4 = grad(wk - dt * k3[0], bk - dt * k3[1])
                wk = wk - dt / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
                bk = bk - dt / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        np.testing.assert_allclose(new[0][b], w0 - eta * sum_w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new[1][b], b0 - eta * sum_b, rtol=1e-4, atol=1e-5)
        if loss == "mse":  # (cross-entropy's candidate loss: the gradient-descent test above)
            err = ((x[b] @ new[0][b] + new[1][b] - y[b]) ** 2).sum(-1) / (2 * C)
            np.testing.assert_allclose(cand_loss[b], (err * mask[b]).sum() / mask[b].sum(),
                                       rtol=1e-4)


def test_mse_closed_form_is_not_compiled_with_xla():
    """jit_compile=True compiles the cross-entropy worker with XLA, but not the MSE closed
    form's (XLA's CPU eigendecomposition is far slower than LAPACK's)."""
    fns = ModelFunctions(keras.Sequential([keras.Input((4,)), keras.layers.Dense(C)]))
    assert NTKDFL(jit_compile=True).make_worker(fns).jit_compile
    assert not NTKDFL(jit_compile=True, loss="mse").make_worker(fns).jit_compile
    assert not NTKDFL(jit_compile=False).make_worker(fns).jit_compile


@pytest.mark.parametrize("name, tol", [("adaptive_euler_flow", 1e-6),
                                       # rounding differs between the two traces, and with it
                                       # the error controller's steps
                                       ("dormand_prince_flow", 1e-4), ("rkc_flow", 1e-3)])
def test_adaptive_flows_trace_with_unknown_batch_and_size(name, tol):
    """reduce_retracing relaxes the client-batch and neighbourhood sizes to None when they vary
    (dropout changes the group sizes): the flow must trace and agree with the static-shape one."""
    flow = getattr(kernels, name)
    h, f0, y, mask, n = _problem(scale=3.0, top=20.0, seed=1)
    args = _tf(h, f0, y, mask, n) + [tf.constant(0.1)]
    relaxed = tf.function(
        lambda h, f0, y, mask, n, eta: flow(h, f0, y, mask, n, eta, taus=(10, 30)),
        input_signature=[tf.TensorSpec([None, None, None]), tf.TensorSpec([None, None, C]),
                         tf.TensorSpec([None, None, C]), tf.TensorSpec([None, None]),
                         tf.TensorSpec([None]), tf.TensorSpec([])])
    r, f, _, _ = relaxed(*args)
    r_static, f_static, _, _ = tf.function(flow)(*args, taus=(10, 30))
    np.testing.assert_allclose(r, r_static, rtol=tol, atol=max(tol / 10, 1e-6))
    np.testing.assert_allclose(f, f_static, rtol=tol, atol=max(tol / 10, 1e-6))


def test_flow_stiffness_reseeds_a_dead_warm_start():
    """A warm start of zeros (left by a saturated softmax) is replaced by the default start, so
    the estimate does not stay stuck at mu = 0 once the flow leaves saturation."""
    h, f0, y, mask, n = _tf(*_problem(scale=3.0, top=20.0, seed=1))
    mu_ref, _ = kernels.flow_stiffness(h, f0, mask, n, "cross_entropy")
    mu, _ = kernels.flow_stiffness(h, f0, mask, n, "cross_entropy", start=tf.zeros_like(f0))
    assert float(tf.reduce_min(mu)) > 0.0
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5)


DOPRI = tf.function(kernels.dormand_prince_flow)
RKC = tf.function(kernels.rkc_flow)
EXACT_TOL, DEFAULT_TOL, RKC_TOL = (
    dict(rtol=ADAPTIVE_FLOWS[name].rtol, atol=ADAPTIVE_FLOWS[name].atol)
    for name in ("exact", NTKDFL().flow, "rkc"))


def _reference_flow(h, f0, y, mask, n, eta, taus):
    """R_tau and f(tau * eta) of the CE flow in float64 by SciPy's DOP853 (rtol 1e-10)."""
    from scipy.integrate import solve_ivp

    r_ref, f_ref = np.zeros((len(taus),) + f0.shape), np.zeros((len(taus),) + f0.shape)
    for b in range(f0.shape[0]):
        hb, m = h[b].astype(np.float64), mask[b][:, None].astype(np.float64)
        shape = f0.shape[1:]
        rhs = lambda t, x: (-(hb @ ((_softmax(x.reshape(shape)) - y[b]) * m)) / n[b]).ravel()
        grid = eta * np.arange(max(taus) + 1)
        sol = solve_ivp(rhs, (0, grid[-1]), f0[b].astype(np.float64).ravel(), method="DOP853",
                        t_eval=grid, rtol=1e-10, atol=1e-12)
        f = sol.y.T.reshape((-1,) + shape)
        r = (_softmax(f) - y[b]) * m
        for i, t in enumerate(taus):
            r_ref[i, b], f_ref[i, b] = r[:t].sum(0), f[t]
    return r_ref, f_ref


def _stiff_problem():
    """A kernel from explicit Jacobians ``[B, N, C, p]`` with a dominant, nearly shared
    direction, as in an NTK, at eta lambda_max(H/N) ~ 4: ``(jac, h, f0, y, mask, n, eta, taus)``
    and the float64 reference ``(r_ref, f_ref)``."""
    rng = np.random.default_rng(5)
    _, f0, y, mask, n = _problem(scale=1.0, seed=5)
    p = 40
    jac = rng.standard_normal((B, N, C, p)) * mask[:, :, None, None]
    jac[..., 0] += 3.0 * mask[..., None]
    h = np.einsum("bncp,bmcp->bnm", jac, jac) / C
    eta, taus = 0.3, (5, 20, 60)
    return (jac, h, f0, y, mask, n, eta, taus), _reference_flow(h, f0, y, mask, n, eta, taus)


@pytest.mark.parametrize("classes_first", [True, False])
def test_exact_flow_update_matches_float64_reference(classes_first, monkeypatch):
    """flow="exact": the update sum_c J_c^T R_tau,c (J explicit, H = (1/C) sum_c J_c J_c^T) and
    f(tau * eta) within 1e-4 of a float64 DOP853 solution at rtol 1e-10, in the stiff regime
    (eta lambda_max(H/N) ~ 4, where one Euler step per grid step is off by percents); in both
    of the loop's layouts (small slices run classes first)."""
    monkeypatch.setattr(kernels.flow, "CLASSES_FIRST_MAX_N", N if classes_first else N - 1)
    dopri = tf.function(kernels.dormand_prince_flow)  # traced under this layout
    (jac, h, f0, y, mask, n, eta, taus), (r_ref, f_ref) = _stiff_problem()
    lam = np.linalg.eigvalsh(h).max(-1) / n
    assert 3 < eta * lam.max() < 6
    r, f, steps, finished = dopri(*_tf(h.astype(np.float32), f0, y, mask, n),
                                  tf.constant(eta), taus, **EXACT_TOL)
    assert bool(finished)
    assert kernels.flow.runs_classes_first(N) == classes_first
    update = lambda r: np.einsum("bncp,tbnc->tbp", jac, np.asarray(r, np.float64))
    for t in range(len(taus)):
        for b in range(B):
            assert _rel(update(r)[t, b], update(r_ref)[t, b]) < 1e-4
            assert _rel(f[t, b], f_ref[t, b]) < 1e-4
    r_euler, _ = EULER(*_tf(h.astype(np.float32), f0, y, mask, n), tf.constant(eta),
                       tf.constant(taus), substeps=tf.constant(1))
    assert _rel(update(r_euler), update(r_ref)) > 0.01  # what the exact flow is for


@pytest.mark.parametrize("tolerances, bound", [(dict(rtol=1e-5, atol=1e-7), 1e-3),
                                               (RKC_TOL, 1e-2)], ids=["tight", "rkc_default"])
def test_rkc_flow_update_matches_float64_reference(tolerances, bound):
    """flow="rkc" in the stiff regime of the exact flow's test: the update sum_c J_c^T R_tau,c
    converges to the float64 DOP853 solution as its tolerance tightens (within 1e-3 at rtol
    1e-5), and its default tolerance stays within 1%."""
    (jac, h, f0, y, mask, n, eta, taus), (r_ref, f_ref) = _stiff_problem()
    args = (*_tf(h.astype(np.float32), f0, y, mask, n), tf.constant(eta), taus)
    r, f, _, finished = RKC(*args, **tolerances)
    assert bool(finished)
    update = lambda r: np.einsum("bncp,tbnc->tbp", jac, np.asarray(r, np.float64))
    for t in range(len(taus)):
        for b in range(B):
            assert _rel(update(r)[t, b], update(r_ref)[t, b]) < bound
            assert _rel(f[t, b], f_ref[t, b]) < bound


def test_exact_flow_mse_matches_closed_form():
    """loss="mse": the Dormand-Prince flow against the eigenbasis closed form (float64)."""
    h, f0, y, mask, n = _problem(scale=20.0, top=5.0, seed=6)
    eta, taus = 0.05, (5, 20, 50)
    r, f, _, finished = DOPRI(*_tf(h, f0, y, mask, n), tf.constant(eta), taus, loss="mse",
                              **EXACT_TOL)
    as64 = [tf.constant(a, tf.float64) for a in (h, f0, y, mask, n)]
    r_closed, f_closed = kernels.mse_closed_form(*as64, tf.constant(eta, tf.float64),
                                                 tf.constant(taus))
    assert bool(finished)
    assert _rel(r, r_closed.numpy()) < 1e-5 and _rel(f, f_closed.numpy()) < 1e-5


def _fashion_neighbourhoods(fashion, members=3, per_client=60, batch=2):
    """Real neighbourhoods: ``batch`` receivers, each with ``members`` clients of a Dirichlet
    split (alpha = 0.1); the MLP's initial weights, its dense kernel and its outputs."""
    (x, y), _ = fashion
    split = nd.data.dirichlet_partition(x, y, 20, 0.1, seed=0, samples_per_client=per_client)
    rng = np.random.default_rng(0)
    groups = [rng.choice(20, members, replace=False) for _ in range(batch)]
    xs, labels, mask = split.neighbourhoods(groups, 10)
    keras.utils.set_random_seed(0)
    fns = ModelFunctions(nd.models.mlp())
    weights = [tf.constant(np.repeat(w[None], batch, 0)) for w in fns.initial_weights()]
    feats = tf.reshape(fns.features(xs.reshape((-1,) + xs.shape[2:])), xs.shape[:2] + (-1,))
    labels, mask = tf.constant(labels), tf.constant(mask)
    h = kernels.make_kernel(fns, "dense")(weights, feats, mask)
    return fns, weights, feats, labels, mask, h


def test_default_flow_update_within_one_percent_of_exact_on_fashion_mnist(fashion):
    """The default flow's candidate updates -(eta/N) J^T R_tau (one VJP each) on real
    neighbourhoods at eta lambda_max(H/N) = 5: within 1% of the exact flow's for every tau
    (the issue's target is the median over clients), where the old default (Euler) is not;
    so are flow="rkc"'s, with fewer products with H than the default's."""
    fns, weights, feats, labels, mask, h = _fashion_neighbourhoods(fashion)
    n = tf.reduce_sum(mask, 1)
    lam = kernels.lambda_max(h, 100) / n
    eta = tf.constant(5.0 / float(tf.reduce_max(lam)))
    taus = NTKDFL().taus
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(weights)
        f0 = fns.forward(weights, feats)

    def updates(r_sums):
        out = []
        for r in r_sums:
            grads = tape.gradient(f0, weights, output_gradients=r * (eta / n)[:, None, None])
            out.append(np.concatenate([g.numpy().reshape(g.shape[0], -1) for g in grads], 1))
        return np.stack(out).astype(np.float64)

    args = (h, f0, labels, mask, n, eta)
    exact = updates(DOPRI(*args, taus, **EXACT_TOL)[0])
    errors = lambda dw: np.linalg.norm(dw - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    r_default, _, attempts, _ = DOPRI(*args, taus, **DEFAULT_TOL)
    default = errors(updates(r_default))
    r_rkc, _, products, _ = RKC(*args, taus, **RKC_TOL)
    rkc = errors(updates(r_rkc))
    euler = errors(updates(ADAPTIVE(*args, taus=taus)[0]))
    assert default.max() < 0.01, default
    # rkc's reason to exist: within the same 1%, fewer products with H over the long flow
    assert rkc.max() < 0.01, rkc
    assert float(products) < 6 * float(attempts), (float(products), 6 * float(attempts))
    assert np.median(euler) > 5 * default.max(), (euler, default)


@pytest.mark.parametrize("flow", [DOPRI, RKC], ids=["dopri5", "rkc"])
def test_adaptive_flow_reports_a_broken_kernel(flow):
    """A NaN in one client's kernel: that client stops with NaN in R and f (the candidates'
    losses then raise DivergenceError), the other finishes, and ``finished`` is False."""
    h, f0, y, mask, n = _problem(scale=3.0, top=20.0, seed=1)
    h[1, 0, 0] = np.nan
    r, f, _, finished = flow(*_tf(h, f0, y, mask, n), tf.constant(0.1), (10, 30))
    assert not bool(finished)
    assert np.isnan(r[:, 1]).all() and np.isnan(f[:, 1]).all()
    assert np.isfinite(r[:, 0]).all() and np.isfinite(f[:, 0]).all()




@pytest.mark.parametrize("name", ["dopri5", "rkc", "euler_adaptive", "euler_bound"])
def test_flow_segments_candidate_by_candidate_equal_the_one_call_flow(name):
    """``*_segments`` advanced candidate after candidate (the index a loop variable, as
    ``tau_search="early_stop"`` drives it) give the one-call flow's R_tau and f(tau eta) bit for
    bit, and its steps and check once at the last candidate."""
    h, f0, y, mask, n = _tf(*_problem(scale=3.0, top=20.0, seed=1))
    eta, taus = tf.constant(0.1), (10, 30, 45, 60)
    if name == "dopri5":
        whole = lambda: kernels.dormand_prince_flow(h, f0, y, mask, n, eta, taus, **DEFAULT_TOL)
        parts = lambda: kernels.dormand_prince_segments(h, f0, y, mask, n, eta, taus,
                                                         **DEFAULT_TOL)
    elif name == "rkc":
        whole = lambda: kernels.rkc_flow(h, f0, y, mask, n, eta, taus, **RKC_TOL)
        parts = lambda: kernels.rkc_segments(h, f0, y, mask, n, eta, taus, **RKC_TOL)
    elif name == "euler_adaptive":
        whole = lambda: kernels.adaptive_euler_flow(h, f0, y, mask, n, eta, taus, recheck=7)
        parts = lambda: kernels.adaptive_euler_segments(h, f0, y, mask, n, eta, taus, recheck=7)
    else:
        sub = tf.constant(3)
        whole = lambda: kernels.euler_flow(h, f0, y, mask, n, eta, tf.constant(taus), sub) + (
            sub, True)
        parts = lambda: kernels.euler_segments(h, f0, y, mask, n, eta, tf.constant(taus), sub)

    @tf.function
    def segmented():
        flow = parts()

        def body(t, state, rs, fs):
            state = flow.advance(state, t)
            r, f = flow.read(state, t)
            return t + 1, state, rs.write(t, r), fs.write(t, f)

        arrays = [tf.TensorArray(tf.float32, size=len(taus)) for _ in range(2)]
        _, state, rs, fs = tf.while_loop(lambda t, *_: t < len(taus), body,
                                         (tf.constant(0), flow.start, *arrays))
        last = len(taus) - 1
        return rs.stack(), fs.stack(), flow.steps(state, last), flow.check(state, last)

    r, f, steps, check = tf.function(whole)()
    r_seg, f_seg, steps_seg, check_seg = segmented()
    np.testing.assert_array_equal(r_seg, r)
    np.testing.assert_array_equal(f_seg, f)
    assert float(steps_seg) == float(steps) and bool(check_seg) == bool(check)
