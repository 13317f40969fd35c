"""Robust neighbour averaging (Byzantine defences) as pure, vectorised NumPy functions.

Every round each client ``i`` (a *receiver*) holds its own flat weights ``own[i]`` and the
flat weights its neighbours sent it, ``received[i, :]``, zero-padded to a common width ``D``
with ``valid[i, :]`` marking the real slots. A defence replaces the plain uniform average
over the *closed* neighbourhood (own weights plus the valid received ones, ``m_i = 1 +
valid[i].sum()`` vectors). Everything is batched over receivers and parameters: no Python
loop over either, so a round costs a handful of array operations.

Rules (``WEIGHT_RULES``):

- ``none``: the uniform mean over the closed neighbourhood.
- ``median``: the coordinate-wise median over the closed neighbourhood.
- ``trimmed_mean``: per coordinate, drop the ``f`` largest and ``f`` smallest of the ``m_i``
  values and average the rest; receivers with ``m_i <= 2 f`` fall back to the median.
- ``clipping``: self-centred clipping, the rule of ClippedGossip (He, Karimireddy, Jaggi,
  "Byzantine-robust decentralized learning via ClippedGossip", ICLR 2023).
- ``balance``: BALANCE (Fang et al., 2024): keep the neighbours within a shrinking ball around
  the receiver's own weights and mix their mean with its own weights.

``robust_final_average`` is the matching end-of-training aggregation over all clients.

Non-finite values a Byzantine sender may send are handled rather than propagated by the
robust rules: the coordinate-wise rules rank NaN above every number, clipping gives a
non-finite difference no weight, and BALANCE rejects it (its distance is not finite).
"""

import dataclasses
import math
import numbers
import typing

import numpy as np

WEIGHT_RULES = ("none", "median", "trimmed_mean", "clipping", "balance")

# The only parameters each rule takes, with their defaults.
DEFAULT_PARAMS = {
    "none": {},
    "median": {},
    # f: Byzantine values trimmed from each end, per coordinate.
    "trimmed_mean": {"f": 1},
    # tau: the clipping radius. None (the default of the reference code's ``--agg scp``) chooses
    # it per receiver and round from the distances to its neighbours, clipping the f farthest
    # (the reference assumes f = 1): a fixed radius depends on the weights' scale, which differs
    # between models and rounds. A positive number is a fixed radius, as in the reference's
    # experiments (``--agg scp1``: tau = 1). f is only read when tau is None. See
    # ``robust_average`` for the sources.
    "clipping": {"tau": None, "f": 1},
    # gamma: the acceptance radius relative to ||own||; kappa: its decay over training;
    # alpha: the weight kept on the receiver's own model.
    "balance": {"gamma": 0.3, "kappa": 1.0, "alpha": 0.5},
}


class RobustAverage(typing.NamedTuple):
    """The result of ``robust_average``.

    Attributes:
        weights: ``[K, P]`` float32, each receiver's new weights.
        accepted: ``[K, D]`` bool, the received vectors the rule used: every valid slot for
            ``none``, ``median`` and ``trimmed_mean`` (coordinate-wise rules use them all),
            the valid slots that were not clipped for ``clipping``, the accepted set for
            ``balance``; padding slots are always False.
        radius: ``[K]`` float, the rule's acceptance radius around the receiver's own weights:
            the clipping threshold ``tau_i`` for ``clipping``,
            ``gamma * exp(-kappa * t / T) * ||own_i||`` for ``balance``, ``inf`` otherwise.
    """

    weights: np.ndarray
    accepted: np.ndarray
    radius: np.ndarray


class RobustFinal(typing.NamedTuple):
    """The result of ``robust_final_average``.

    Attributes:
        weights: ``[P]`` float32, the mean of the kept clients.
        kept: ``[K]`` bool, the clients averaged.
    """

    weights: np.ndarray
    kept: np.ndarray


def _choices(values):
    return ", ".join(values) if values else "(none)"


def _number(rule, key, value):
    """``value`` as a finite float, or ValueError naming the rule and key."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(float(value)):
        raise ValueError(f"defence {rule!r}: {key}={value!r} must be a finite number.")
    return float(value)


def _is_int(value, low):
    """Whether ``value`` is an integer (not a bool) ``>= low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def _count(rule, key, value):
    """``value`` as a non-negative int (integral floats such as 1.0 allowed)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and \
            math.isfinite(float(value)) and float(value).is_integer() and value >= 0:
        return int(value)
    raise ValueError(f"defence {rule!r}: {key}={value!r} must be a non-negative integer "
                     f"(the number of Byzantine neighbours to tolerate), e.g. {key}=1.")


def check_params(rule, params):
    """Validate a rule's parameters and fill in its defaults.

    Args:
        rule: one of ``WEIGHT_RULES``.
        params: a mapping of parameter overrides (None or empty: the defaults).

    Returns:
        A new dict: ``DEFAULT_PARAMS[rule]`` updated with ``params``.

    Raises:
        ValueError: unknown rule, unknown parameter, or a bad value; the message names it
            and the valid choices.
    """
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown defence rule {rule!r}; choose one of {_choices(WEIGHT_RULES)}.")
    params = {} if params is None else params
    if not isinstance(params, typing.Mapping):
        raise ValueError(f"defence {rule!r}: params must be a dict such as "
                         f"{DEFAULT_PARAMS[rule]!r}, got {params!r}.")
    allowed = DEFAULT_PARAMS[rule]
    for key in params:
        if key not in allowed:
            raise ValueError(f"defence {rule!r} has no parameter {key!r}; valid parameters: "
                             f"{_choices(tuple(allowed))}.")
    out = {**allowed, **params}
    if rule == "trimmed_mean":
        out["f"] = _count(rule, "f", out["f"])
    elif rule == "clipping":
        out["f"] = _count(rule, "f", out["f"])
        if out["tau"] is not None:
            out["tau"] = _number(rule, "tau", out["tau"])
            if out["tau"] <= 0:
                raise ValueError(f"defence 'clipping': tau={out['tau']!r} must be > 0 (a fixed "
                                 f"clipping radius), or None for the adaptive radius.")
    elif rule == "balance":
        for key in ("gamma", "kappa", "alpha"):
            out[key] = _number(rule, key, out[key])
        if out["gamma"] <= 0:
            raise ValueError(f"defence 'balance': gamma={out['gamma']!r} must be > 0 (the "
                             f"acceptance radius relative to ||own||), e.g. gamma=0.3.")
        if out["kappa"] < 0:
            raise ValueError(f"defence 'balance': kappa={out['kappa']!r} must be >= 0 (the "
                             f"radius' decay rate), e.g. kappa=1.")
        if not 0.0 <= out["alpha"] <= 1.0:
            raise ValueError(f"defence 'balance': alpha={out['alpha']!r} must lie in [0, 1] "
                             f"(the weight on the receiver's own model), e.g. alpha=0.5.")
    return out


def check_neighbourhood(rule, params, neighbourhood_size):
    """Fail before training if ``rule`` cannot work on a neighbourhood of this size.

    Args:
        rule: one of ``WEIGHT_RULES``.
        params: the rule's parameters (validated with ``check_params``).
        neighbourhood_size: clients in a closed neighbourhood (own + neighbours), e.g. the
            smallest over the topology.

    Raises:
        ValueError: ``trimmed_mean`` with ``2 f >= neighbourhood_size`` (nothing would be
            left to average), or bad arguments.
    """
    params = check_params(rule, params)
    if not _is_int(neighbourhood_size, 1):
        raise ValueError(f"neighbourhood_size={neighbourhood_size!r} must be an integer >= 1 "
                         f"(the receiver itself plus its neighbours).")
    if rule == "trimmed_mean" and 2 * params["f"] >= neighbourhood_size:
        f, size = params["f"], int(neighbourhood_size)
        raise ValueError(
            f"defence 'trimmed_mean' with f={f} trims 2*f={2 * f} of each coordinate's values "
            f"but a closed neighbourhood has only {size} (own + {size - 1} neighbours); use "
            f"f <= {(size - 1) // 2} or a topology with at least {2 * f} neighbours per client.")


def _inputs(own, received, valid):
    """Check shapes and dtypes; return float32 own, received and bool valid."""
    own = np.asarray(own)
    received = np.asarray(received)
    valid = np.asarray(valid)
    if own.ndim != 2:
        raise ValueError(f"own must be [K, P] (one flat weight vector per receiver), got shape "
                         f"{own.shape}; stack the receivers' flattened weights.")
    k, p = own.shape
    if received.ndim != 3 or received.shape[0] != k or received.shape[2] != p:
        raise ValueError(f"received must be [K, D, P] = [{k}, D, {p}] to match own {own.shape}, "
                         f"got shape {received.shape}; pad each receiver's messages to D slots.")
    if valid.shape != received.shape[:2]:
        raise ValueError(f"valid must be [K, D] = {list(received.shape[:2])} to match received "
                         f"{received.shape}, got shape {valid.shape}.")
    if valid.dtype != bool:
        if not np.isin(valid, (0, 1)).all():
            raise ValueError(f"valid must be a bool mask (True: a real message), got values "
                             f"{np.unique(valid)[:5]}.")
        valid = valid.astype(bool)
    return own.astype(np.float32, copy=False), received.astype(np.float32, copy=False), valid


def _sorted_closed(own, received, valid):
    """The closed neighbourhood sorted per coordinate: ``[K, 1 + D, P]`` and ``m [K]``.

    Padding slots hold NaN, which ``np.sort`` places after every number; a NaN a sender sent
    ties with the padding, so it simply ranks as the largest value. The first ``m_i`` ranks of
    row ``i`` are therefore exactly its ``m_i`` values in order.
    """
    stack = np.concatenate([own[:, None], np.where(valid[..., None], received, np.nan)], axis=1)
    return np.sort(stack, axis=1), 1 + valid.sum(axis=1)


def _rank_median(sorted_stack, m):
    """Coordinate-wise median from a sorted stack whose row i has ``m[i]`` real values."""
    lo = np.take_along_axis(sorted_stack, ((m - 1) // 2)[:, None, None], axis=1)[:, 0]
    hi = np.take_along_axis(sorted_stack, (m // 2)[:, None, None], axis=1)[:, 0]
    # Halves first: no overflow for huge values, and exactly lo when lo == hi.
    return (np.float32(0.5) * lo + np.float32(0.5) * hi).astype(np.float32)


def _norms(x):
    """Euclidean norm over the last axis, accumulated in float64 (float32 squares overflow)."""
    x = np.asarray(x)
    return np.sqrt(np.einsum("...p,...p->...", x, x, dtype=np.float64))


def _mean(own, received, valid):
    total = own + np.where(valid[..., None], received, np.float32(0)).sum(axis=1)
    return total / (1 + valid.sum(axis=1)).astype(np.float32)[:, None]


def _trimmed_mean(own, received, valid, f):
    s, m = _sorted_closed(own, received, valid)
    ranks = np.arange(s.shape[1])
    keep = (ranks[None] >= f) & (ranks[None] < (m - f)[:, None])  # [K, 1 + D]
    left = np.maximum(m - 2 * f, 1).astype(np.float32)
    trimmed = np.where(keep[..., None], s, np.float32(0)).sum(axis=1) / left[:, None]
    # Receivers that lost links (m_i <= 2f) have nothing left to average: median instead.
    short = m <= 2 * f
    if short.any():
        trimmed[short] = _rank_median(s[short], m[short])
    return trimmed


def _clipping_radius(dist, valid, tau, f):
    """``tau_i`` per receiver: fixed, or the reference code's adaptive rule."""
    k = len(valid)
    if tau is not None:
        return np.full(k, tau, dtype=np.float64)
    n = valid.sum(axis=1)
    # NaN padding sorts after every distance; a NaN distance ranks as the largest.
    ordered = np.sort(np.where(valid, dist, np.nan), axis=1)
    # The (f+1)-th largest of the n_i distances is rank n_i - 1 - f ascending: the f farthest
    # neighbours are clipped. With n_i <= f the nearest distance (reference: its only one).
    rank = np.clip(n - 1 - f, 0, None)
    if ordered.shape[1] == 0:
        return np.zeros(k)
    picked = np.take_along_axis(ordered, rank[:, None], axis=1)[:, 0]
    # No neighbour: nothing to clip; radius 0 (accept nothing but itself).
    return np.where(n > 0, np.nan_to_num(picked, nan=0.0, posinf=np.inf), 0.0)


def _clipping(own, received, valid, tau, f):
    diff = received - own[:, None]                       # [K, D, P]
    dist = _norms(diff)                                  # [K, D] float64
    radius = _clipping_radius(dist, valid, tau, f)
    finite = np.isfinite(dist)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(dist > radius[:, None], radius[:, None] / dist, 1.0)
    # A non-finite difference gets no weight (the reference's clip returns 0 for NaN).
    scale = np.where(valid & finite, scale, 0.0).astype(np.float32)
    m = (1 + valid.sum(axis=1)).astype(np.float32)
    # The own term clip(own - own) = 0 drops out; each neighbour weighs 1/m_i.
    step = np.einsum("kd,kdp->kp", scale, np.where(scale[..., None] > 0, diff, np.float32(0)))
    weights = own + step / m[:, None]
    accepted = valid & finite & (dist <= radius[:, None])
    return weights, accepted, radius


def _balance(own, received, valid, gamma, kappa, alpha, round_index, total_rounds):
    dist = _norms(received - own[:, None])               # [K, D]
    radius = gamma * math.exp(-kappa * round_index / total_rounds) * _norms(own)
    accepted = valid & (dist <= radius[:, None])         # NaN distances compare False
    count = accepted.sum(axis=1)
    total = np.where(accepted[..., None], received, np.float32(0)).sum(axis=1)
    mean = total / np.maximum(count, 1).astype(np.float32)[:, None]
    mixed = np.float32(alpha) * own + np.float32(1.0 - alpha) * mean
    # Nothing accepted: keep the own model unchanged.
    return np.where((count > 0)[:, None], mixed, own), accepted, radius


def robust_average(rule, params, own, received, valid, round_index=0, total_rounds=1):
    """Each receiver's robust average over its closed neighbourhood.

    The closed neighbourhood of receiver ``i`` is ``own[i]`` plus the valid rows of
    ``received[i]``: ``m_i = 1 + valid[i].sum()`` vectors.

    ``clipping`` is the self-centred clipping of ClippedGossip (He, Karimireddy, Jaggi, ICLR
    2023)::

        x_i' = x_i + sum_j w_ij * clip(x_j - x_i, tau_i),  clip(z, tau) = z * min(1, tau / ||z||)

    with uniform mixing weights ``w_ij = 1 / m_i`` over the closed neighbourhood (the
    reference uses Metropolis weights; the own term is ``clip(0) = 0``). The radius ``tau_i``
    follows the reference implementation, github.com/epfml/byzantine-robust-decentralized-
    optimizer (commit 5387d60), ``codes/aggregator.py``, ``get_aggregator`` and
    ``SelfCenteredClipping.__call__``:

    - ``--agg scp<tau>``: a fixed ``tau_i = tau``. Every experiment of the reference uses this
      (``run.sh``: ``scp1`` for the dumbbell and delta experiments, Figs. 4-5; ``scp0.1`` and
      ``scp1`` for honest majority, Fig. 6; ``scp10`` on CIFAR-10, Fig. 11).
    - ``--agg scp`` (``tau=None``, the default here, as it is the code's default: a fixed
      radius depends on the scale of the weights): ``tau_i = sorted(||x_j - x_i|| for neighbours j)[-2]``,
      the second-largest neighbour distance (the only one with a single neighbour): the
      farthest neighbour, assumed Byzantine, is clipped to the next one. Here ``tau=None``
      with ``f`` Byzantine neighbours generalises it to the ``(f+1)``-th largest distance
      (the nearest one when ``n_i <= f``; 0 with no neighbour); ``f = 1`` is the reference.

    The notebook ``consensus.ipynb`` also has the theory's oracle radius
    ``tau_i = sqrt(sum_{honest j} W_ij ||x_j - x_i||^2 / delta_i)``; it needs to know which
    neighbours are honest, so it is not offered.

    Args:
        rule: one of ``WEIGHT_RULES``.
        params: the rule's parameters (see ``DEFAULT_PARAMS``; None: the defaults).
        own: ``[K, P]`` float32, each receiver's own flat weights.
        received: ``[K, D, P]`` float32, the flat weights received (padding slots ignored).
        valid: ``[K, D]`` bool, the real slots of ``received``.
        round_index: the round ``t`` (0-based), for ``balance``'s decaying radius.
        total_rounds: the rounds ``T`` of training, for ``balance``'s decaying radius.

    Returns:
        A ``RobustAverage`` of ``weights [K, P]`` float32, ``accepted [K, D]`` bool and
        ``radius [K]`` float.

    Raises:
        ValueError: a bad rule or parameter, mismatched shapes, or bad round arguments.
    """
    params = check_params(rule, params)
    own, received, valid = _inputs(own, received, valid)
    if not _is_int(total_rounds, 1):
        raise ValueError(f"total_rounds={total_rounds!r} must be an integer >= 1 (the rounds "
                         f"of training).")
    if not _is_int(round_index, 0):
        raise ValueError(f"round_index={round_index!r} must be an integer >= 0 (the 0-based "
                         f"round).")
    k = len(own)
    everything = (valid.copy(), np.full(k, np.inf))
    with np.errstate(over="ignore", invalid="ignore"):  # padding may hold anything
        if rule == "none":
            return RobustAverage(_mean(own, received, valid).astype(np.float32), *everything)
        if rule == "median":
            s, m = _sorted_closed(own, received, valid)
            return RobustAverage(_rank_median(s, m), *everything)
        if rule == "trimmed_mean":
            weights = _trimmed_mean(own, received, valid, params["f"])
            return RobustAverage(weights.astype(np.float32), *everything)
        if rule == "clipping":
            weights, accepted, radius = _clipping(own, received, valid, params["tau"],
                                                  params["f"])
        else:
            weights, accepted, radius = _balance(own, received, valid, params["gamma"],
                                                 params["kappa"], params["alpha"],
                                                 round_index, total_rounds)
    return RobustAverage(weights.astype(np.float32), accepted, radius.astype(np.float64))


def robust_final_average(flat):
    """The final aggregation over all clients without averaging Byzantine models blindly.

    Each client's distance ``d_k`` to the coordinate-wise median model is compared with a
    robust z-score cut: clients with ``d_k <= median(d) + 3 * 1.4826 * MAD(d)`` are kept (1.4826
    makes the MAD a standard-deviation estimate for Gaussian distances), and always at least
    the ``ceil(K / 2)`` clients closest to the median, so honest clients are never all dropped.

    Args:
        flat: ``[K, P]``, every client's flat weights.

    Returns:
        A ``RobustFinal`` of ``weights [P]`` float32 (the mean of the kept clients) and
        ``kept [K]`` bool.

    Raises:
        ValueError: ``flat`` is not a non-empty ``[K, P]`` array.
    """
    flat = np.asarray(flat)
    if flat.ndim != 2 or flat.shape[0] < 1:
        raise ValueError(f"flat must be [K, P] with K >= 1 (one flat weight vector per client), "
                         f"got shape {flat.shape}; stack the clients' flattened weights.")
    flat = flat.astype(np.float32, copy=False)
    k = len(flat)
    with np.errstate(over="ignore", invalid="ignore"):
        # The clients as one receiver's closed neighbourhood: NaN ranks as the largest value.
        center = _rank_median(np.sort(flat, axis=0)[None], np.array([k]))[0]
        d = _norms(flat - center)
        d = np.where(np.isfinite(d), d, np.inf)
        med = np.median(d)
        mad = np.median(np.abs(d - med))
        kept = d <= med + 3.0 * 1.4826 * mad
    kept[np.argsort(d, kind="stable")[:(k + 1) // 2]] = True
    weights = flat[kept].mean(axis=0, dtype=np.float64).astype(np.float32)
    return RobustFinal(weights, kept)


# -- the receivers' defence as one configuration object ------------------------------------------
SCREEN = "screen"
FINAL_RULES = ("mean", "robust")


def _screen_params():
    from ntkdfl_tf.algorithms import package_screen  # the screen lives beside NTK-DFL's worker

    return package_screen.SCREEN_PARAMS


@dataclasses.dataclass(frozen=True)
class Defence:
    """What honest receivers do against Byzantine neighbours, chosen by name.

    Args:
        name: a weight rule (``none``, ``median``, ``trimmed_mean``, ``clipping``,
            ``balance``), ``screen`` (NTK-DFL's package screen, weights averaged uniformly), or
            ``<rule>+screen`` (both).
        params: one dict for the rule's parameters (``DEFAULT_PARAMS``) and the screen's
            (``clip_ratio``, ``min_cosine``, ``loss_ratio``, ``loss_floor``:
            ``algorithms.package_screen``).
        final: the final aggregate: ``mean`` of every client, or ``robust``
            (``robust_final_average``: the clients near the coordinate-wise median).

    Raises:
        ValueError: an unknown name, parameter or final rule (one line naming it).
    """

    name: str = "none"
    params: dict = None
    final: str = "mean"

    def __post_init__(self):
        parts = [p.strip() for p in str(self.name).split("+")]
        screen = SCREEN in parts
        rules = [p for p in parts if p != SCREEN]
        if len(rules) > 1 or (rules and rules[0] not in WEIGHT_RULES) or \
                len(parts) != len(rules) + screen:
            raise ValueError(f"Unknown defence {self.name!r}; choose one of "
                             f"{', '.join(WEIGHT_RULES)}, {SCREEN}, or '<rule>+{SCREEN}'.")
        rule = rules[0] if rules else "none"
        params = dict(self.params or {})
        screen_keys = set(_screen_params())
        screen_params = {k: v for k, v in params.items() if k in screen_keys}
        if screen_params and not screen:
            raise ValueError(f"defence {self.name!r} has no package screen; the parameters "
                             f"{', '.join(sorted(screen_params))} belong to '{SCREEN}'.")
        rule_params = check_params(rule, {k: v for k, v in params.items()
                                          if k not in screen_keys})
        for key, value in screen_params.items():
            if not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or \
                    (key != "min_cosine" and value <= 0):
                raise ValueError(f"defence {self.name!r}: {key} must be a positive number, "
                                 f"got {value!r}.")
        if self.final not in FINAL_RULES:
            raise ValueError(f"Unknown final aggregation {self.final!r}; choose one of "
                             f"{', '.join(FINAL_RULES)}.")
        object.__setattr__(self, "params", dict(rule_params, **screen_params))
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "_rule_params", rule_params)
        object.__setattr__(self, "_screen", dict(_screen_params(), **screen_params)
                           if screen else None)

    @property
    def weight_rule(self):
        """The weight-averaging rule's name (``none``: the uniform mean)."""
        return self._rule

    @property
    def screen(self):
        """The package screen's parameters, or None without one."""
        return self._screen

    @property
    def config(self):
        return {"name": self.name, "params": dict(self.params), "final": self.final}

    def validate(self, topology, algorithm):
        """Errors before training: a screen without Jacobian packages, or a rule that cannot
        work in the topology's neighbourhoods (a declared f too large)."""
        if self._screen is not None and getattr(algorithm, "name", "") != "ntk_dfl":
            raise ValueError(f"defence {self.name!r}: the package screen acts on Jacobian "
                             f"packages, which only NTK-DFL sends; drop '+{SCREEN}' for "
                             f"{algorithm.name}.")
        degree = getattr(topology, "num_neighbors", None)
        if degree is not None:
            check_neighbourhood(self._rule, self._rule_params, int(degree) + 1)

    def average(self, own, received, valid, round_index=0, total_rounds=1):
        """The weight rule over each receiver's closed neighbourhood (``robust_average``)."""
        return robust_average(self._rule, self._rule_params, own, received, valid,
                              round_index, total_rounds)

    def radius(self, own, received, valid, round_index=0, total_rounds=1):
        """Each receiver's acceptance radius under the weight rule ``[M]`` (inf: none)."""
        return self.average(own, received, valid, round_index, total_rounds).radius
