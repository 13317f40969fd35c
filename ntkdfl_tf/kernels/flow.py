"""Function-space training dynamics under a fixed kernel: df/dt = -(1/N) H r(f).

The residual r is softmax(f) - Y for cross-entropy and (f - Y)/C for squared error. A flow returns,
for each candidate tau (in grid steps of length eta), the residual sum
R_tau = sum_{s<tau} r(f(s * eta)) that the weight update needs, and the flow's prediction
f(tau * eta). Everything is batched over a leading client axis B; padded samples carry mask 0.
``h`` is a kernel [B, N, N] or a callable ``v -> H v`` (a matrix-free kernel).

Integrators: adaptive Dormand-Prince 5(4) with dense output (``dormand_prince_flow``: NTKDFL's
``flow="dopri5"`` and ``"exact"``), adaptive Runge-Kutta-Chebyshev (``rkc_flow``, ``"rkc"``),
forward Euler with a stiffness-driven step
(``adaptive_euler_flow``) or a fixed number of sub-steps (``euler_flow``), and the closed form for
squared error (``mse_closed_form``). Each integrator also comes as ``FlowSegments``
(``dormand_prince_segments``, ``rkc_segments``, ``adaptive_euler_segments``,
``euler_segments``): the same steps,
integrated candidate by candidate, so that a caller can stop once it has the candidates it needs
(NTKDFL's ``tau_search="early_stop"``). A stabilised integrator needs error control: the weight
update is J^T R, whose size is measured by the H-norm of R, and the error of a scheme that damps
the stiff modes instead of resolving them lands exactly there. Measured on a Fashion-MNIST
neighbourhood (N = 1187): second-order Runge-Kutta-Chebyshev with fixed macro steps of 10 grid
steps was within 2-7% of Euler in the 2-norm but 20-55% in the H-norm, and its best candidate
loss was 0.88-1.47 against Euler's 0.62; under error control (``rkc_flow``) its short first steps
resolve the stiff transient and the update stays within 1% of the exact flow's (tests). The
same holds, less severely, for forward Euler itself against the exact flow (README, the flow
argument).
"""

import typing

import tensorflow as tf

from ntkdfl_tf.kernels import losses


class FlowSegments(typing.NamedTuple):
    """A flow integrated candidate by candidate, its state carried through ``tf.while_loop``.

    ``state = advance(state, t)`` integrates on from wherever ``state`` stands to the candidate
    taus[t] (``t``: an int or int32 scalar tensor, never decreasing from one call to the next);
    then ``read(state, t)`` is ``(R_tau, f(tau * eta))`` ``[B, N, C]`` of that candidate,
    ``steps(state, t)`` the integrator's steps per grid step so far and ``check(state, t)`` the
    flow's own check over what it integrated (as the matching ``*_flow`` function returns
    them). Advancing through every candidate in turn does exactly what the one-call flow does.
    """

    start: typing.Any
    advance: typing.Callable
    read: typing.Callable
    steps: typing.Callable
    check: typing.Callable


def as_operator(h):
    """``h`` as a callable ``v [B, N, K] -> H v``: a kernel tensor, or already a callable."""
    return h if callable(h) else (lambda v: tf.matmul(h, v))


def lambda_max(h, iterations=30, mask=None):
    """Largest eigenvalue of each symmetric PSD kernel by power iteration.

    Args:
        h: kernels [B, N, N], or a callable ``v -> H v`` (then ``mask`` [B, N] gives the shape).
        iterations: power iterations (static unroll: a handful of mat-vecs).
        mask: optional [B, N] start vector (ones if omitted).

    Returns:
        [B] eigenvalue estimates (never above the true value, up to rounding).
    """
    apply = as_operator(h)
    v = (tf.ones(tf.shape(h)[:2], tf.float32) if mask is None else mask)[..., None]
    for _ in range(iterations):
        v = apply(v)
        v = v / (tf.norm(v, axis=1, keepdims=True) + 1e-30)
    return tf.reduce_sum(v * apply(v), axis=[1, 2])


def client_substeps(h, n, eta, iterations=30, mask=None):
    """[B] float: each client's Euler sub-steps per grid step, ceil(1.1 lambda_max(H/N) eta / 2).

    Softmax's Jacobian has eigenvalues <= 1/2, so dt * lambda_max(H/N) / 2 <= 1 keeps the
    explicit step inside its stability region with margin (NTK-DFL.md: same curve as 5x finer
    steps) for any f. Power iteration slightly underestimates lambda_max, hence the 10% margin.
    """
    lam = lambda_max(h, iterations, mask) / n * 1.1
    return tf.maximum(1.0, tf.math.ceil(lam * eta / 2.0))


def euler_substeps(h, n, eta, iterations=30, mask=None):
    """Euler sub-steps per grid step that keep every client's step stable (``client_substeps``,
    the largest over the batch): int32 scalar."""
    return tf.cast(tf.reduce_max(client_substeps(h, n, eta, iterations, mask)), tf.int32)


def flow_stiffness(h, f, mask, n, loss="cross_entropy", iterations=30, start=None):
    """Largest eigenvalue of the flow's Jacobian at ``f``, (1/N) H S(f), by power iteration.

    S is block-diagonal (one C x C softmax Jacobian per sample) and PSD, so (1/N) H S is similar
    to the PSD S^1/2 H S^1/2 / N: its eigenvalues are real and non-negative and power iteration
    finds the largest. It never exceeds lambda_max(H/N) / 2 (softmax's Jacobian is <= 1/2) and is
    often far below it: confident predictions have a small S.

    Args:
        h: kernels [B, N, N] or a callable ``v -> H v``. f: logits [B, N, C]. mask: [B, N].
        n: real samples per client [B].
        loss: a ``losses`` object or its name (``"cross_entropy"``, ``"mse"``).
        iterations: power iterations (static unroll).
        start: optional start vector [B, N, C] (e.g. the last call's, to track a moving f).

    Returns:
        ``(mu, v)``: [B] estimates of the largest eigenvalue and the [B, N, C] iterate.
    """
    apply, loss = as_operator(h), losses.get(loss)
    m, scale = mask[..., None], (1.0 / n)[:, None, None]
    jacobian_product = lambda v: scale * apply(loss.residual_jvp(f, v) * m)
    # off the softmax's null direction (constant across classes), on every sample
    default = m * (1.0 + 0.1 * tf.cast(tf.range(tf.shape(f)[-1]), f.dtype))
    if start is None:
        start = default
    else:  # a warm start that died (saturated softmax: S v = 0) would stay 0: re-seed it
        dead = tf.norm(start, axis=[1, 2], keepdims=True) <= 1e-20
        start = tf.where(dead, default, start)
    v = start
    for _ in range(iterations):
        v = jacobian_product(v)
        v = v / (tf.norm(v, axis=[1, 2], keepdims=True) + 1e-30)
    return tf.norm(jacobian_product(v), axis=[1, 2]), v


def adaptive_euler_flow(h, f0, y, mask, n, eta, taus, loss="cross_entropy", recheck=25,
                        bound_step=False):
    """Forward Euler whose step follows the flow's stiffness as the flow moves.

    The flow's Jacobian (1/N) H S(f) changes with f: S is small for confident predictions and
    grows as samples pass through uncertainty. Every ``recheck`` grid steps (and at each
    candidate tau) the largest eigenvalue mu is re-estimated (5 power iterations, warm-started)
    and the next segment takes ceil(1.1 * mu * eta) sub-steps per grid step, so dt * mu <= 1:
    the stiffest mode is damped, half the stability limit, leaving room for mu to double within
    a segment. Measured on Fashion-MNIST neighbourhoods: 1-2 sub-steps where the bound
    lambda_max(H/N)/2 asks for 2-6, with the same accuracy over rounds.

    Args:
        h, f0, y, mask, n, eta, loss: as ``euler_flow``.
        taus: increasing candidate grid steps, a Python sequence (the segment plan is static).
        recheck: grid steps between stiffness estimates.
        bound_step: bool (tensor): use ``euler_substeps`` (the bound for any f) instead.

    Returns:
        ``(R, f, substeps, monotone)``: as ``euler_flow``, the mean sub-steps per grid step, and
        whether the flow loss stayed finite and never rose from one segment end to the next
        (the exact flow never raises it: a rise means the step was too long).
    """
    flow = adaptive_euler_segments(h, f0, y, mask, n, eta, taus, loss, recheck, bound_step)
    last = len(taus) - 1
    state = flow.advance(flow.start, last)
    _, _, _, _, _, rs, fs, _, _, _ = state
    return rs, fs, flow.steps(state, last), flow.check(state, last)


def adaptive_euler_segments(h, f0, y, mask, n, eta, taus, loss="cross_entropy", recheck=25,
                            bound_step=False):
    """``adaptive_euler_flow`` as ``FlowSegments`` (same arguments)."""
    taus = [int(t) for t in taus]
    ends = sorted(set(range(recheck, taus[-1], recheck)) | set(taus))
    record = tf.constant([[float(e == t) for t in taus] for e in ends])  # [S, T]
    ends_t = tf.constant(ends, tf.int32)
    # segments to run to reach each candidate: the last one ends at it
    segments_to = tf.constant([ends.index(t) + 1 for t in taus], tf.int32)
    taus_t = tf.constant(taus, tf.int32)
    m, apply, scale = mask[..., None], as_operator(h), (1.0 / n)[:, None, None]
    loss = losses.get(loss)
    bound = euler_substeps(h, n, eta, mask=mask)
    _, v = flow_stiffness(h, f0, mask, n, loss)  # converge once; segments refine it
    flow_loss = lambda f: loss.mean(f, y, mask)

    def segment(i, start, f, acc, v, rs, fs, steps, last_loss, monotone):
        mu, v = flow_stiffness(h, f, mask, n, loss, iterations=5, start=v)
        sub = tf.maximum(1, tf.cast(tf.math.ceil(1.1 * tf.reduce_max(mu) * eta), tf.int32))
        sub = tf.where(bound_step, bound, sub)
        dt = eta / tf.cast(sub, f.dtype)

        def micro_step(k, f, acc):  # the residual at a grid point enters R
            r = loss.residual(f, y) * m
            acc = acc + tf.cast(k % sub == 0, f.dtype) * r
            return k + 1, f - dt * scale * apply(r), acc

        grid = ends_t[i] - start
        _, f, acc = tf.while_loop(lambda k, *_: k < grid * sub, micro_step,
                                  (tf.constant(0), f, acc))
        w = record[i][:, None, None, None]
        rs, fs = rs + w * acc[None], fs + w * f[None]
        now = flow_loss(f)
        rose = tf.reduce_any(now > last_loss * (1 + 1e-4) + 1e-6)
        monotone = monotone & ~rose & tf.reduce_all(tf.math.is_finite(now))
        return (i + 1, ends_t[i], f, acc, v, rs, fs, steps + grid * sub, now, monotone)

    zeros = tf.zeros(tf.concat([[len(taus)], tf.shape(f0)], 0), f0.dtype)  # shapes may be unknown
    start = (tf.constant(0), tf.constant(0), f0, tf.zeros_like(f0), v, zeros, zeros,
             tf.constant(0), flow_loss(f0), tf.constant(True))

    def advance(state, t):
        return tf.while_loop(lambda i, *_: i < segments_to[t], segment, state)

    return FlowSegments(
        start, advance, read=lambda state, t: (tf.gather(state[5], t), tf.gather(state[6], t)),
        steps=lambda state, t: (tf.cast(state[7], tf.float32) /
                                tf.cast(tf.gather(taus_t, t), tf.float32)),
        check=lambda state, t: state[9])


# Up to this many samples per client the Dormand-Prince loop works classes first.
CLASSES_FIRST_MAX_N = 512


def runs_classes_first(n_max):
    """Whether the adaptive flows' loop lays out ``n_max`` samples per client classes first."""
    return n_max is not None and n_max <= CLASSES_FIRST_MAX_N


class _Layout:
    """How the adaptive flows' loop lays out logits: ``[B, N, C]`` or classes first, ``[B, C, N]``.

    Classes first, the softmax's max and sum run across rows of N contiguous samples, which
    XLA's CPU code vectorises (over a last axis of a few classes it does not, and the flow
    evaluates the residual at every grid point and stage, ~1,900 times a call), and for small
    N XLA multiplies v H (H is symmetric) faster than H v. For large N, H v is the faster
    product, so larger slices keep ``[B, N, C]`` (the measurements: docs/performance.md, "The
    flow, classes first").
    """

    def __init__(self, h, f0, mask, loss):
        self.classes_first = runs_classes_first(f0.shape[-2])
        if not self.classes_first:
            self.mask, self.residual, self.apply = mask[..., None], loss.residual, as_operator(h)
            return
        self.mask = mask[:, None, :]
        swap = tf.linalg.matrix_transpose  # the last two axes
        if isinstance(loss, losses.CrossEntropy):  # tf.nn.softmax on axis 1 transposes twice
            def residual(f, y):
                e = tf.exp(f - tf.reduce_max(f, 1, keepdims=True))
                return e / tf.reduce_sum(e, 1, keepdims=True) - y
        else:
            def residual(f, y):
                return swap(loss.residual(swap(f), swap(y)))
        self.residual = residual
        if callable(h):
            self.apply = lambda v: swap(h(swap(v)))
        else:
            self.apply = lambda v: tf.matmul(v, h)  # (H v^T)^T = v H^T = v H

    def into(self, v):
        """``[..., N, C]`` into the loop's layout."""
        return tf.linalg.matrix_transpose(v) if self.classes_first else v

    def out_of(self, v):
        """The loop's layout back to ``[..., N, C]``."""
        return tf.linalg.matrix_transpose(v) if self.classes_first else v


# Dormand-Prince 5(4) (Hairer, Norsett & Wanner, Solving ODEs I, Table 5.2): stage matrix,
# fifth-order weights (also the last stage's row: first same as last), error weights (fifth minus
# embedded fourth order), and Shampine's (1986) weights for f at the step's midpoint, from which
# the dense output is the quartic through f, f' at both ends and f at the midpoint.
_DP_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_DP_MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2,
           -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
           -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)


def dormand_prince_flow(h, f0, y, mask, n, eta, taus, loss="cross_entropy", rtol=1e-6,
                        atol=1e-8, max_steps_per_grid_step=100):
    """The flow to a tolerance: adaptive Dormand-Prince 5(4), as the reference integrates it.

    Every client has its own step, controlled by its own error estimate (mixed tolerance
    ``atol + rtol * |f|``, root mean square over its real entries). Steps are not tied to the
    grid: f at the grid points s * eta a step covers comes from the method's dense output (a
    fourth-order interpolant from the step's stages, no further products with H; the
    reference's solver samples its grid the same way), and R_tau sums the residual there. Once
    the stiff modes have decayed the step is limited by stability only (dt * mu <= 3.3), so a
    step usually covers more than one grid point. One loop iteration is one attempted step for
    the whole batch (six products with H); clients that are done idle until the last one is.

    Args:
        h, f0, y, mask, n, eta, loss: as ``euler_flow``.
        taus: increasing candidate grid steps (a Python sequence or int32 tensor).
        rtol, atol: tolerances of the local error estimate.
        max_steps_per_grid_step: the loop stops after this many iterations per grid step.

    Returns:
        ``(R, f, steps, finished)``: as ``euler_flow``, the loop's iterations per grid step
        (attempted steps, rejected ones included), and whether every client reached the last
        tau. A client whose error turned non-finite or whose step vanished stops there, and a
        client the iteration limit cut off stops too: NaN in every R and f it did not reach.
    """
    return _whole(dormand_prince_segments(h, f0, y, mask, n, eta, taus, loss, rtol, atol,
                                          max_steps_per_grid_step), taus)


def rkc_flow(h, f0, y, mask, n, eta, taus, loss="cross_entropy", rtol=1e-3, atol=1e-5,
             max_steps_per_grid_step=100, rho=None):
    """The flow to a tolerance with Runge-Kutta-Chebyshev steps (Sommeijer, Shampine & Verwer,
    1998): second order, damped (epsilon = 2/13), with as many stages per step as the step's
    stiffness asks (s with 0.65 s^2 >= dt * rho, rho a bound on the flow's stiffness), so its
    stability interval grows with the square of its work. The flow's Jacobian -(1/N) H S(f)
    has real non-positive eigenvalues (``flow_stiffness``), the case these methods are made for:
    after the stiff transient, which the error control resolves with short steps, a step spans
    tens of grid points for a few products with H each, where Dormand-Prince is held to
    ~3.3 / mu. The error estimate is the method's own (ibid.), the dense output the cubic
    Hermite interpolant through f and f' at both ends; everything else (per-client steps,
    grid points, R_tau, arguments and returns) is as ``dormand_prince_flow``, but ``steps``
    counts products with H per grid step (a step's cost varies with its stages). ``rho``:
    ``[B]`` the stiffness each client's stage count is sized for; None: 1.5x the flow's
    stiffness at f0 (``flow_stiffness``, 31 products with H). Along the flow predictions
    mostly grow more confident and the stiffness falls; where it rises past ``rho`` the error
    estimate sees the unstable step and shortens it. (The bound 0.55 lambda_max(H) / N, valid
    for any f, took 1.1-1.5x the products for the same error: docs/performance.md.)
    """
    return _whole(rkc_segments(h, f0, y, mask, n, eta, taus, loss, rtol, atol,
                               max_steps_per_grid_step, rho), taus)


def _whole(flow, taus):
    """A ``FlowSegments`` advanced to its last candidate, read at every candidate."""
    last = -1
    state = flow.advance(flow.start, last)
    count = taus.shape[0] if tf.is_tensor(taus) else len(taus)  # static: a handful
    rs, fs = zip(*(flow.read(state, t) for t in range(count)))
    return tf.stack(rs), tf.stack(fs), flow.steps(state, last), flow.check(state, last)


class _Attempt(typing.NamedTuple):
    """One attempted step of an adaptive integrator, every client at once.

    Attributes:
        f_new: the solution at the step's end. rate_new: f' there (the next step's first stage).
        error: the local error estimate, shaped like f.
        dense: ``(a, b, c, d)``: f(t + theta dt) = f + theta (d + theta (c + theta (b + theta
            a))) for theta in [0, 1]; ``a`` None for a cubic.
        products: int32 scalar, the products with H the attempt took (the batch's).
    """

    f_new: tf.Tensor
    rate_new: tf.Tensor
    error: tf.Tensor
    dense: tuple
    products: tf.Tensor


def _combine(weights, ks):
    return tf.add_n([w * k for w, k in zip(weights, ks) if w])


def _dormand_prince_attempt(rate, f, k1, dt, hs):
    ks = [k1]
    for row in _DP_A:
        ks.append(rate(f + hs * _combine(row, ks)))
    f_new = f + hs * _combine(_DP_B, ks)
    k7 = rate(f_new)
    ks.append(k7)
    f_mid = f + hs * _combine(_DP_MID, ks)
    quartic = (2 * hs * (k7 - k1) - 8 * (f_new + f) + 16 * f_mid,
               hs * (5 * k1 - 3 * k7) + 18 * f + 14 * f_new - 32 * f_mid,
               hs * (k7 - 4 * k1) - 11 * f - 5 * f_new + 16 * f_mid, hs * k1)
    return _Attempt(f_new, k7, hs * _combine(_DP_E, ks), quartic, tf.constant(6))


def dormand_prince_segments(h, f0, y, mask, n, eta, taus, loss="cross_entropy", rtol=1e-6,
                            atol=1e-8, max_steps_per_grid_step=100):
    """``dormand_prince_flow`` as ``FlowSegments`` (same arguments).

    Advancing to a candidate runs the loop until every client has passed it; clients already
    past it step on meanwhile, exactly as in the one-call flow, so each client's steps are the
    same whatever the candidate at which its batch stops.
    """
    # the usual controller: safety 0.9, exponent 1/5, growth within [0.2, 5]
    return _adaptive_segments(_dormand_prince_attempt, (0.9, 0.2, 0.2, 5.0), None, h, f0, y,
                              mask, n, eta, taus, loss, rtol, atol, max_steps_per_grid_step)


_RKC_DAMPING = 2 / 13
_RKC_MAX_STAGES = 100


def rkc_segments(h, f0, y, mask, n, eta, taus, loss="cross_entropy", rtol=1e-3, atol=1e-5,
                 max_steps_per_grid_step=100, rho=None):
    """``rkc_flow`` as ``FlowSegments`` (same arguments)."""
    dtype = f0.dtype
    estimate = 0
    if rho is None:
        rho, estimate = 1.5 * flow_stiffness(h, f0, mask, n, loss)[0], 31  # power iterations
    rho = tf.maximum(tf.cast(rho, dtype), 1e-6)

    def attempt(rate, f, k1, dt, hs):
        stages = 1 + tf.cast(tf.floor(tf.sqrt(1.0 + 1.54 * dt * rho)), tf.int32)
        stages = tf.clip_by_value(stages, 2, _RKC_MAX_STAGES)
        w0 = 1.0 + _RKC_DAMPING / tf.square(tf.cast(stages, dtype))
        most = tf.reduce_max(stages)

        def chebyshev(j, c):  # (T, T', T'') at w0 for j - 1 and j - 2 -> for j and j - 1
            t1, t2, d1, d2, e1, e2 = c
            return (2 * w0 * t1 - t2, t1, 2 * t1 + 2 * w0 * d1 - d2, d1,
                    4 * d1 + 2 * w0 * e1 - e2, e1)

        ones, zeros = tf.ones_like(w0), tf.zeros_like(w0)
        start = (w0, ones, ones, zeros, zeros, zeros)  # j - 1 = 1, j - 2 = 0

        def freeze(j, new, old):  # each client stops at its own stage count
            return tuple(tf.where(j <= stages, a, b) for a, b in zip(new, old))

        _, end = tf.while_loop(lambda j, c: j <= most,
                               lambda j, c: (j + 1, freeze(j, chebyshev(j, c), c)),
                               (tf.constant(2), start))
        w1 = end[2] / end[4]  # T_s'(w0) / T_s''(w0)
        b2 = 1.0 / (4.0 * tf.square(w0))  # b_0 = b_1 = b_2 = T_2'' / T_2'^2
        y1 = f + hs * _per_client(b2 * w1) * k1

        def stage(j, y_1, y_2, c, b_1, b_2):
            values = chebyshev(j, c)
            b = values[4] / tf.square(values[2])  # T_j'' / T_j'^2
            mu, nu = 2 * b * w0 / b_1, -b / b_2
            mu_t = 2 * b * w1 / b_1
            gamma_t = -(1 - b_1 * c[0]) * mu_t  # -a_{j-1} mu~_j, a_{j-1} = 1 - b_{j-1} T_{j-1}
            y_j = (_per_client(1 - mu - nu) * f + _per_client(mu) * y_1 +
                   _per_client(nu) * y_2 + hs * (_per_client(mu_t) * rate(y_1) +
                                                 _per_client(gamma_t) * k1))
            live = _per_client(j <= stages)
            return (j + 1, tf.where(live, y_j, y_1), tf.where(live, y_1, y_2),
                    freeze(j, values, c), tf.where(j <= stages, b, b_1),
                    tf.where(j <= stages, b_1, b_2))

        _, f_new, *_ = tf.while_loop(lambda j, *_: j <= most, stage,
                                     (tf.constant(2), y1, f, start, b2, b2))
        k_new = rate(f_new)
        error = (12 * (f - f_new) + 6 * hs * (k1 + k_new)) / 15
        hermite = (None, 2 * (f - f_new) + hs * (k1 + k_new),
                   3 * (f_new - f) - hs * (2 * k1 + k_new), hs * k1)
        return _Attempt(f_new, k_new, error, hermite, most)

    # the stage count's cap bounds the step: 0.65 s^2 must cover dt * rho
    max_dt = ((_RKC_MAX_STAGES - 1) ** 2 - 1) / (1.54 * rho)
    # the method's controller: safety 0.8, exponent 1/3, growth within [0.1, 10]
    return _adaptive_segments(attempt, (0.8, 1 / 3, 0.1, 10.0), max_dt, h, f0, y, mask, n,
                              eta, taus, loss, rtol, atol, max_steps_per_grid_step,
                              count_products=True, products_before=estimate)


def _per_client(x):  # [B] -> [B, 1, 1]
    return x[:, None, None]


class _LoopState(typing.NamedTuple):
    """The adaptive loop's state: attempts so far, per client the next grid point ``s``, time
    ``t``, step ``dt``, solution ``f`` and its rate ``k1``, the residual sum ``acc`` so far, the
    records ``rs``/``fs`` ``[T, ...]`` of R_tau and f(tau eta), ``failed``, and the products
    with H so far."""

    attempts: tf.Tensor
    s: tf.Tensor
    t: tf.Tensor
    dt: tf.Tensor
    f: tf.Tensor
    k1: tf.Tensor
    acc: tf.Tensor
    rs: tf.Tensor
    fs: tf.Tensor
    failed: tf.Tensor
    products: tf.Tensor


def _adaptive_segments(attempt, controller, max_dt, h, f0, y, mask, n, eta, taus, loss, rtol,
                       atol, max_steps_per_grid_step, count_products=False, products_before=0):
    """The loop both adaptive integrators share, as ``FlowSegments``: per-client steps under
    an error controller, the grid points each accepted step covers read from its dense output.

    Args:
        attempt: ``(rate, f, k1, dt [B], dt [B, 1, 1]) -> _Attempt``, one step of the method
            (``rate``: f -> f', ``k1``: f' at f).
        controller: ``(safety, exponent, shrink, grow)``: a step's factor is
            ``safety * error ** -exponent`` within ``[shrink, grow]``.
        max_dt: ``[B]`` longest step per client, or None.
        count_products: ``steps`` counts products with H per grid step (for a method whose
            steps differ in cost), not attempted steps; ``products_before`` of them were taken
            before the loop.
        The rest: as ``dormand_prince_flow``.
    """
    safety, exponent, shrink, grow = controller
    taus = tf.cast(tf.convert_to_tensor(taus), tf.int32)
    last = taus[-1]
    scale = (1.0 / n)[:, None, None]
    dtype = f0.dtype
    eta = tf.cast(eta, dtype)
    end = eta * tf.cast(last, dtype)
    count = tf.maximum(tf.reduce_sum(mask, 1), 1.0) * tf.cast(tf.shape(f0)[-1], dtype)
    layout = _Layout(h, f0, mask, losses.get(loss))
    f0, y, m, residual, apply = layout.into(f0), layout.into(y), layout.mask, layout.residual, \
        layout.apply

    def rate(f):
        return -scale * apply(residual(f, y) * m)

    def step(state):
        it, s, t, dt, f, k1, acc, rs, fs, failed, products = state
        active = (s <= last) & ~failed
        remaining = end - t
        step_size = dt if max_dt is None else tf.minimum(dt, max_dt)
        step_size = tf.where(active, tf.where(step_size * 1.01 >= remaining, remaining,
                                              step_size), 0.0)
        hs = _per_client(step_size)
        trial = attempt(rate, f, k1, step_size, hs)
        f_new = trial.f_new
        tol = atol + rtol * tf.maximum(tf.abs(f), tf.abs(f_new))
        norm = tf.sqrt(tf.reduce_sum(tf.square(trial.error / tol) * m, [1, 2]) / count)
        finite = tf.math.is_finite(norm) & tf.reduce_all(tf.math.is_finite(f_new), [1, 2])
        accept = active & finite & (norm <= 1.0)
        factor = tf.clip_by_value(safety * tf.pow(tf.maximum(norm, 1e-10), -exponent), shrink,
                                  grow)
        factor = tf.where(accept, factor, tf.minimum(factor, 1.0))
        dt = tf.where(active, step_size * tf.where(finite, factor, shrink), dt)
        failed = failed | (active & (~finite | (dt < eta * 1e-9)))

        # the grid points in (t, t + step] (a point within 1e-4 eta past the end counts: the
        # step that ends the flow lands there), each from the dense output
        t_new = t + step_size
        through = tf.cast(tf.floor(t_new / eta + 1e-4), tf.int32)
        through = tf.where(accept, tf.minimum(through, last), s - 1)

        def grid_point(j, acc, rs, fs):
            point = s + j
            valid = point <= through
            theta = _per_client((tf.cast(point, dtype) * eta - t) /
                                tf.where(step_size > 0, step_size, 1.0))
            a, b, c, d = trial.dense
            top = b if a is None else b + theta * a  # a cubic skips the quartic term
            f_at = f + theta * (d + theta * (c + theta * top))
            # R_point (the sum over s' < point) and f(point eta) are read, then r(f) is added
            hit = ((taus[:, None] == point[None]) & valid[None])[..., None, None]  # [T, B, 1, 1]
            rs = tf.where(hit, acc[None], rs)
            fs = tf.where(hit, f_at[None], fs)
            acc = tf.where(_per_client(valid), acc + residual(f_at, y) * m, acc)
            return j + 1, acc, rs, fs

        points = tf.reduce_max(through - s + 1)
        _, acc, rs, fs = tf.while_loop(lambda j, *_: j < points, grid_point,
                                       (tf.constant(0), acc, rs, fs))
        s = tf.where(accept, through + 1, s)
        t = tf.where(accept, t_new, t)
        f = tf.where(_per_client(accept), f_new, f)
        k1 = tf.where(_per_client(accept), trial.rate_new, k1)
        return _LoopState(it + 1, s, t, dt, f, k1, acc, rs, fs, failed,
                          products + trial.products)

    batch = tf.shape(f0)[0]
    zeros = tf.zeros(tf.concat([[tf.shape(taus)[0]], tf.shape(f0)], 0), dtype)
    init = _LoopState(tf.constant(0), tf.ones([batch], tf.int32), tf.zeros([batch], dtype),
                      tf.fill([batch], eta / 4), f0, rate(f0), residual(f0, y) * m, zeros,
                      zeros, tf.zeros([batch], tf.bool),
                      tf.constant(1 + products_before))  # and the first rate
    limit = max_steps_per_grid_step * last

    def advance(state, t):
        target = taus[t]
        return tf.while_loop(
            lambda st: (st.attempts < limit) & tf.reduce_any((st.s <= target) & ~st.failed),
            lambda st: (step(st),), (state,))[0]

    def read(state, t):  # NaN for a client that stopped before the candidate
        s, rs, fs = state.s, state.rs, state.fs
        missed = (taus[t] >= s)[:, None, None]
        nan = tf.constant(float("nan"), dtype)
        return (layout.out_of(tf.where(missed, nan, tf.gather(rs, t))),
                layout.out_of(tf.where(missed, nan, tf.gather(fs, t))))

    return FlowSegments(
        init, advance, read,
        steps=lambda state, t: (
            tf.cast(state.products if count_products else state.attempts, tf.float32) /
            tf.cast(taus[t], tf.float32)),
        check=lambda state, t: tf.reduce_all(state.s > taus[t]))


def euler_flow(h, f0, y, mask, n, eta, taus, substeps, loss="cross_entropy",
               record_outputs=True):
    """Integrates the flow with forward Euler, ``substeps`` steps per grid step.

    Args:
        h: kernels [B, N, N] (zero rows/columns at padding), or a callable ``v -> H v``.
        f0: initial logits [B, N, C]. y: one-hot labels [B, N, C]. mask: [B, N].
        n: real samples per client [B] (float). eta: grid step (scalar tensor).
        taus: increasing int32 candidate grid steps [T]. substeps: int32 scalar.
        loss: a ``losses`` object or its name (``"cross_entropy"``, ``"mse"``).
        record_outputs: also return f(tau*eta).

    Returns:
        ``(R, f)``: residual sums [T, B, N, C] and flow predictions f(tau*eta) [T, B, N, C]
        (None when ``record_outputs`` is False).
    """
    # One loop per candidate, each continuing the last: R_tau and f(tau * eta) are read between
    # them, with no per-step bookkeeping (it cost as much memory traffic as the product with H).
    flow = euler_segments(h, f0, y, mask, n, eta, taus, substeps, loss)
    state, rs, fs = flow.start, [], []
    for t in range(taus.shape[0]):  # static: a handful of candidates
        state = flow.advance(state, t)
        r, f = flow.read(state, t)
        rs.append(r)
        fs.append(f)
    return tf.stack(rs), (tf.stack(fs) if record_outputs else None)


def euler_segments(h, f0, y, mask, n, eta, taus, substeps, loss="cross_entropy"):
    """``euler_flow`` as ``FlowSegments`` (same arguments)."""
    m, loss = mask[..., None], losses.get(loss)
    apply = as_operator(h)
    scale = (1.0 / n)[:, None, None]
    dt = eta / tf.cast(substeps, f0.dtype)

    # Micro-step k; grid point s = k // substeps. The residual at a grid point enters R.
    def micro_step(k, f, acc):
        r = loss.residual(f, y) * m
        acc = acc + tf.cast(k % substeps == 0, f.dtype) * r
        return k + 1, f - dt * scale * apply(r), acc

    def advance(state, t):
        end = taus[t] * substeps
        return tf.while_loop(lambda k, *_: k < end, micro_step, state)

    return FlowSegments((tf.constant(0), f0, tf.zeros_like(f0)), advance,
                        read=lambda state, t: (state[2], state[1]),
                        steps=lambda state, t: tf.cast(substeps, tf.float32),
                        check=lambda state, t: tf.constant(True))


def mse_closed_form(h, f0, y, mask, n, eta, taus):
    """Exact squared-error flow through the eigenbasis of H: f(t) - Y = exp(-tH/(NC)) (f0 - Y).

    Same arguments and returns as ``euler_flow`` (with loss ``"mse"``); exact for any eta.
    """
    c = tf.cast(tf.shape(y)[-1], f0.dtype)
    lam, q = tf.linalg.eigh(h)  # [B, N], [B, N, N]
    decay = tf.maximum(lam, 0.0) / (n[:, None] * c)  # per-unit-time rate of each mode
    proj = tf.matmul(q, (f0 - y) * mask[..., None], transpose_a=True)  # [B, N, C]
    t = tf.cast(taus, f0.dtype)[:, None, None]
    ratio = tf.exp(-eta * decay)[None]
    # sum_{s<tau} ratio^s, with the lambda -> 0 limit tau
    geometric = tf.where(decay[None] * eta > 1e-7, (1 - ratio ** t) / (1 - ratio),
                         t * tf.ones_like(ratio))
    r_sum = tf.matmul(q[None], geometric[..., None] * proj[None]) / c
    f_tau = y + tf.matmul(q[None], tf.exp(-t * eta * decay[None])[..., None] * proj[None])
    return r_sum, f_tau * mask[..., None] + f0 * (1 - mask[..., None])
