"""What Byzantine senders put in weight messages: pure, batched NumPy attacks.

Every round each receiver i gets flat weight vectors from its neighbours, stacked as
``received[i, slot]``. Some slots come from Byzantine senders; ``byzantine_weights`` replaces
exactly those slots by the attack's vector and leaves honest and padding slots bit-identical.
The attacker is omniscient (the threat model of ALIE, IPM and ClippedGossip): for each
receiver it knows the receiver's own weights ``own[i]`` and what the honest neighbours send it.
All attacks are vectorised over receivers and parameters.

Notation, per receiver i: ``x_j`` the honest vector in slot j; ``x_b`` the vector Byzantine
slot b would have sent honestly; ``H_i`` the honest slots; ``f_i`` the number of Byzantine
slots; ``n_i = 1 + #valid slots`` the closed-neighbourhood size (own + neighbours); ``mu_i`` and
``sigma_i`` the coordinate-wise mean and sample std (ddof=1) of {own_i} U {x_j : j in H_i}.

=============  ==========================================================  ==================
attack         what each Byzantine slot of receiver i sends                 defaults
=============  ==========================================================  ==================
sign_flip      -scale * x_b                                                 scale=1
gaussian       g ~ N(mean, std^2) i.i.d. per coordinate and per slot        mean=0, std=1
scaling        own_i + factor * (x_b - own_i)                               factor=10
alie           mu_i - z * sigma_i (z=None: Baruch et al.'s z_i formula)     z=1.5
ipm            -epsilon * mu_i                                              epsilon=0.1
dissensus      own_i - epsilon * sum_{j in H_i} (x_j - own_i) / f_i          epsilon=1.5
=============  ==========================================================  ==================

References checked (facts only; this code is written from the definitions):

- ClippedGossip, He, Karimireddy, Jaggi, "Byzantine-robust decentralized learning via
  ClippedGossip", ICLR 2023: ``epfml/byzantine-robust-decentralized-optimizer``,
  ``codes/attacks.py`` (``BitFlippingWorker``, ``ALittleIsEnoughAttack``, ``IPMAttack``,
  ``DissensusWorker``, ``get_attackers``) and ``run.sh`` (attack strings of the experiments).
- ByzFL, ``LPD-EPFL/byzfl``, ``byzfl/attacks/attacks.py`` (``Gaussian``, ``SignFlipping``,
  ``InnerProductManipulation``, ``ALittleIsEnough``).
"""

import math
import numbers
import statistics

import numpy as np

WEIGHT_ATTACKS = ("sign_flip", "gaussian", "scaling", "alie", "ipm", "dissensus")

DEFAULT_PARAMS = {
    "sign_flip": {"scale": 1.0},
    "gaussian": {"mean": 0.0, "std": 1.0},
    "scaling": {"factor": 10.0},
    # 1.5 as the original ALIE code's and ByzFL's default; the paper's formula with the
    # neighbourhood's n_i and f_i gives z = 0 (no attack) for one Byzantine in six
    "alie": {"z": 1.5},
    "ipm": {"epsilon": 0.1},
    "dissensus": {"epsilon": 1.5},
}

# ALIE's probability (n - s) / n reaches 1 once the Byzantine slots are a majority of the
# closed neighbourhood (s <= 0): Phi^-1 would be infinite. Clipping to [1 - P, P] caps |z| at
# Phi^-1(0.999) ~ 3.09, i.e. "as far as a Gaussian honest cloud plausibly reaches".
ALIE_MAX_PROBABILITY = 0.999

# (kind of value, description for the error message) per parameter
_RULES = {
    ("sign_flip", "scale"): ("positive", "a positive number"),
    ("gaussian", "mean"): ("finite", "a finite number"),
    ("gaussian", "std"): ("non_negative", "a non-negative number"),
    ("scaling", "factor"): ("positive", "a positive number"),
    ("alie", "z"): ("finite_or_none", "None or a finite number"),
    ("ipm", "epsilon"): ("positive", "a positive number"),
    ("dissensus", "epsilon"): ("positive", "a positive number"),
}


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and \
        math.isfinite(float(value))


def _value_ok(kind, value):
    if kind == "finite_or_none" and value is None:
        return True
    if not _is_number(value):
        return False
    return {"finite": True, "finite_or_none": True, "positive": value > 0,
            "non_negative": value >= 0}[kind]


def check_params(attack, params=None):
    """The attack's parameters with defaults filled in.

    Args:
        attack: one of ``WEIGHT_ATTACKS``.
        params: a dict of overrides (``None``: none); its keys must be among
            ``DEFAULT_PARAMS[attack]``.

    Returns:
        A new dict: ``DEFAULT_PARAMS[attack]`` updated with ``params``, numbers as floats.

    Raises:
        ValueError: an unknown attack, an unknown key or a bad value (one line naming it and
            listing the valid choices).
    """
    if attack not in DEFAULT_PARAMS:
        raise ValueError(f"Unknown weight attack {attack!r}; choose one of "
                         f"{', '.join(WEIGHT_ATTACKS)}.")
    params = dict(params or {})
    defaults = DEFAULT_PARAMS[attack]
    unknown = sorted(set(params) - set(defaults), key=str)
    if unknown:
        raise ValueError(f"attack {attack!r} takes no parameter {unknown[0]!r}; its parameters "
                         f"are {', '.join(defaults)}.")
    resolved = dict(defaults, **params)
    for key, value in resolved.items():
        kind, wanted = _RULES[(attack, key)]
        if not _value_ok(kind, value):
            raise ValueError(f"attack {attack!r}: {key} must be {wanted}, got {value!r}.")
    return {k: (None if v is None else float(v)) for k, v in resolved.items()}


def _check_shapes(own, received, valid, byzantine):
    if received.ndim != 3 or own.shape != (received.shape[0], received.shape[2]) or \
            valid.shape != received.shape[:2] or byzantine.shape != received.shape[:2]:
        raise ValueError(f"byzantine_weights: expected own [K, P], received [K, D, P], valid and "
                         f"byzantine [K, D]; got own {own.shape}, received {received.shape}, "
                         f"valid {valid.shape}, byzantine {byzantine.shape}.")
    if np.any(byzantine & ~valid):
        raise ValueError("byzantine_weights: a Byzantine slot is a padding slot (byzantine must "
                         "be a subset of valid).")


def honest_statistics(own, received, honest):
    """Coordinate-wise mean and sample std of each receiver's honest vectors.

    The honest vectors of receiver i are own_i and its honest slots, as in ClippedGossip's
    ``ALittleIsEnoughAttack``/``IPMAttack`` (``models = [target model] + good neighbours``);
    the std is the sample std (ddof=1, ``torch.std``'s default there), 0 for a single vector.

    Args:
        own: ``[K, P]``; received: ``[K, D, P]``; honest: ``[K, D]`` bool.

    Returns:
        ``(mean, std)``, each ``[K, P]`` float64.
    """
    count = 1 + honest.sum(1)[:, None]
    # one pass per slot (D is the degree, small) keeps memory at O(K P), not a [K, D, P] copy
    total = own.astype(np.float64)
    for d in range(received.shape[1]):
        total += np.where(honest[:, d, None], received[:, d], 0.0)
    mean = total / count
    squares = np.square(own - mean)
    for d in range(received.shape[1]):
        squares += np.where(honest[:, d, None], np.square(received[:, d] - mean), 0.0)
    std = np.sqrt(squares / np.maximum(count - 1, 1))  # count 1: squares is 0, so std 0
    return mean, std


def alie_z(n, f):
    """ALIE's z per receiver (Baruch et al. 2019, Algorithm 3), vectorised.

    s = floor(n/2 + 1) - f supporters are needed; z = Phi^-1((n - s) / n), the probability
    clipped to [1 - ALIE_MAX_PROBABILITY, ALIE_MAX_PROBABILITY]: it reaches 1 (z infinite) once
    the Byzantine slots are a majority (s <= 0). For f >= 1 the probability is >= 1/2, so z >= 0.

    Args:
        n: ``[K]`` int, closed-neighbourhood sizes (own + valid slots).
        f: ``[K]`` int, Byzantine slots per receiver.

    Returns:
        ``[K]`` float64.
    """
    n = np.asarray(n, np.float64)
    s = np.floor(n / 2 + 1) - np.asarray(f, np.float64)
    p = np.clip((n - s) / np.maximum(n, 1), 1 - ALIE_MAX_PROBABILITY, ALIE_MAX_PROBABILITY)
    # inv_cdf is scalar: evaluate it once per distinct probability (a handful), not per receiver
    levels, where = np.unique(p, return_inverse=True)
    inv_cdf = statistics.NormalDist().inv_cdf
    return np.array([inv_cdf(float(q)) for q in levels], np.float64)[where.reshape(p.shape)]


def byzantine_weights(attack, params, own, received, valid, byzantine, rng):
    """``received`` with every Byzantine slot replaced by the attack's vector.

    Attacks (sources and the reference files checked in each bullet):

    - ``sign_flip`` (``scale``=1): sends ``-scale * x_b``, the negation of the vector the
      sender would have sent, not relative to the receiver: ClippedGossip's
      ``BitFlippingWorker`` (``codes/attacks.py``) sends ``-flattened_model``, its own model
      negated. (ByzFL's ``SignFlipping`` negates the honest mean instead; that is the
      centralised gradient version.)
    - ``gaussian`` (``mean``=0, ``std``=1): a vector with coordinates i.i.d. N(mean, std^2),
      drawn afresh for every Byzantine slot from ``rng``; ByzFL's ``Gaussian``
      (``byzfl/attacks/attacks.py``, ``mu=0.0, sigma=1.0``). The only attack that draws.
    - ``scaling`` (``factor``=10): model replacement (Bagdasaryan et al., "How to backdoor
      federated learning", AISTATS 2020): ``own_i + factor * (x_b - own_i)``. With uniform
      averaging over the closed neighbourhood and ``factor = n_i``, when the honest vectors are
      close to own_i the receiver's average becomes ~x_b: the attacker's model replaces it.
    - ``alie`` (``z``=None): "A little is enough" (Baruch et al., NeurIPS 2019):
      ``mu_i - z_i * sigma_i`` over own_i and the honest slots (``honest_statistics``), with
      z_i from the paper's formula for n = n_i, f = f_i (``alie_z``) unless ``z`` is given.
      Checked ``ALittleIsEnoughAttack`` in ClippedGossip's ``codes/attacks.py``: it also puts
      the receiver's model among the honest ones and uses ``torch.std`` (ddof=1), but its z
      uses the global worker counts and Phi^-1((n - m - s) / (n - m)); its experiments pass
      z=10 (``ALIE10`` in ``run.sh``).
    - ``ipm`` (``epsilon``=0.1): inner-product manipulation (Xie, Koyejo, Gupta, UAI 2020):
      ``-epsilon * mu_i``, mu_i the mean of own_i and the honest slots, as ClippedGossip's
      ``IPMAttack`` (``codes/attacks.py``; ``get_attackers`` passes epsilon=0.1).
    - ``dissensus`` (``epsilon``=1.5): ClippedGossip's own attack (He, Karimireddy, Jaggi,
      ICLR 2023), ``DissensusWorker`` in ``codes/attacks.py``:
      ``own_i - epsilon * sum_{j in H_i} w_ij (x_j - own_i) / sum_{b Byzantine} w_ib``. With
      uniform mixing weights over the closed neighbourhood (ClippedGossip's fallback
      ``1 / (deg + 1)``; its gossip runs use Metropolis weights) the weights cancel:
      ``own_i - epsilon * sum_{j in H_i} (x_j - own_i) / f_i``, which cancels epsilon times
      the honest pull on own_i. The code takes epsilon from the attack name; every run in
      ``run.sh`` uses ``dissensus1.5``.

    Args:
        attack: one of ``WEIGHT_ATTACKS``.
        params: overrides of ``DEFAULT_PARAMS[attack]`` (checked by ``check_params``).
        own: ``[K, P]`` float32, each receiver's own current weights.
        received: ``[K, D, P]`` float32, what each slot's sender would send honestly (zero
            padding).
        valid: ``[K, D]`` bool, the real slots.
        byzantine: ``[K, D]`` bool, slots whose sender is Byzantine (a subset of ``valid``).
        rng: ``np.random.Generator``, the adversary's stream (used by ``gaussian`` only).

    Returns:
        ``[K, D, P]`` float32: a copy of ``received`` whose Byzantine slots hold the attack's
        vectors; honest and padding slots are bit-identical to ``received``.

    Raises:
        ValueError: a bad attack or parameter, mismatched shapes, or a Byzantine padding slot.
    """
    p = check_params(attack, params)
    own = np.asarray(own, np.float32)
    received = np.asarray(received, np.float32)
    valid = np.asarray(valid, bool)
    byzantine = np.asarray(byzantine, bool)
    _check_shapes(own, received, valid, byzantine)
    out = received.copy()
    rows, slots = np.nonzero(byzantine)  # row-major: the order gaussian draws in
    if not len(rows):
        return out
    honest = valid & ~byzantine
    if attack == "sign_flip":
        forged = -p["scale"] * received[rows, slots].astype(np.float64)
    elif attack == "gaussian":
        forged = p["mean"] + p["std"] * rng.standard_normal((len(rows), received.shape[2]))
    elif attack == "scaling":
        mine = own[rows].astype(np.float64)
        forged = mine + p["factor"] * (received[rows, slots] - mine)
    elif attack in ("alie", "ipm"):
        mean, std = honest_statistics(own, received, honest)
        if attack == "ipm":
            per_receiver = -p["epsilon"] * mean
        else:
            z = (alie_z(1 + valid.sum(1), byzantine.sum(1)) if p["z"] is None else
                 np.full(len(own), p["z"]))
            per_receiver = mean - z[:, None] * std
        forged = per_receiver[rows]
    else:  # dissensus
        pull = -honest.sum(1)[:, None] * own.astype(np.float64)
        for d in range(received.shape[1]):  # per slot: O(K P) memory, D is small
            pull += np.where(honest[:, d, None], received[:, d], 0.0)
        per_receiver = own - p["epsilon"] * pull / np.maximum(byzantine.sum(1), 1)[:, None]
        forged = per_receiver[rows]
    out[rows, slots] = forged.astype(np.float32)
    return out
