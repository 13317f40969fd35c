"""Byzantine senders: who they are and what they send instead of the honest message.

``Byzantine(fraction, attack, params)`` is the threat model the ``Channel`` applies. Which
clients are Byzantine is drawn once per run from the trainer's ``byzantine`` stream; they keep
training as the algorithm says, but every message they send over an averaging step (weights)
or as a Jacobian package is replaced. The attacker is omniscient, as in the literature it
follows (ALIE, IPM, ClippedGossip): it knows each receiver's weights, what the honest
neighbours send it, and the receiver's defence.

Weight attacks (``protocol.attacks``): ``sign_flip``, ``gaussian``, ``scaling``, ``alie``,
``ipm``, ``dissensus``. Package attacks (NTK-DFL only), on the package's arrays as the receiver
decodes them:

- ``jacobian_scale`` (``factor``=10): every Jacobian multiplied by ``factor``; H is quadratic in
  J, so the sender's block of the kernel grows by factor².
- ``jacobian_sign_flip``: every Jacobian negated (kernel cross terms and its share of the
  update J^T R flip sign).
- ``jacobian_noise`` (``std``=3): Gaussian noise of ``std`` times the package's Jacobian RMS
  added to every entry (needs the Jacobians formed: the worker materialises packages).
- ``logit_shift`` (``shift``=10): the labelled class's logit lowered by ``shift`` in the logits
  the flow starts from (the sent logits; the receiver's own evaluation of candidates is
  unaffected).
- ``label_flip``: labels y -> C - 1 - y (flow targets and the tau choice's loss).
- ``adaptive`` (``margin``=0.99, ``max_factor``=10): weights at ``margin`` times the defence's
  acceptance radius from the receiver, in the direction that undoes the honest neighbours'
  pull (``adaptive_weights``); packages scaled to ``margin`` times the package screen's
  clipping threshold (``max_factor`` without a screen).
"""

import dataclasses
import typing

import numpy as np

from ntkdfl_tf.protocol import attacks

PACKAGE_PARAMS = {"jacobian_scale": {"factor": 10.0}, "jacobian_sign_flip": {},
                  "jacobian_noise": {"std": 3.0}, "logit_shift": {"shift": 10.0},
                  "label_flip": {}}
ADAPTIVE_PARAMS = {"margin": 0.99, "max_factor": 10.0}
PACKAGE_ATTACKS = tuple(PACKAGE_PARAMS)
ATTACKS = ("none",) + tuple(attacks.WEIGHT_ATTACKS) + PACKAGE_ATTACKS + ("adaptive",)


class PackageAttack(typing.NamedTuple):
    """The attack a tampered package carries: its name and resolved parameters."""

    name: str
    params: dict


def check_attack(attack, params=None):
    """``(attack, params with defaults)``; ValueError naming a bad attack, key or value."""
    if attack not in ATTACKS:
        raise ValueError(f"Unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}.")
    params = dict(params or {})
    if attack in attacks.WEIGHT_ATTACKS:
        return attack, attacks.check_params(attack, params)
    defaults = {"none": {}, "adaptive": ADAPTIVE_PARAMS, **PACKAGE_PARAMS}[attack]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"attack {attack!r} takes no parameter {unknown[0]!r}; its parameters "
                         f"are {', '.join(defaults) or 'none'}.")
    resolved = dict(defaults, **params)
    for key, value in resolved.items():
        if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or \
                not np.isfinite(value) or value <= 0:
            raise ValueError(f"attack {attack!r}: {key} must be a positive number, got "
                             f"{value!r}.")
    if attack == "adaptive" and resolved["margin"] >= 1:
        raise ValueError(f"attack 'adaptive': margin must be below 1 (just under the "
                         f"threshold), got {resolved['margin']!r}.")
    return attack, {k: float(v) for k, v in resolved.items()}


@dataclasses.dataclass(frozen=True)
class Byzantine:
    """Which share of the clients is Byzantine and what they send.

    Args:
        fraction: share of clients that are Byzantine, in [0, 1); round(fraction * K) of
            them, drawn once per run from the trainer's ``byzantine`` stream.
        attack: an attack name (module docstring); ``none`` marks the clients without changing
            what they send (the honest metrics then exclude them).
        params: the attack's parameters (defaults in the module docstring).

    Raises:
        ValueError: a fraction outside [0, 1), an unknown attack, or a bad parameter.
    """

    fraction: float = 0.2
    attack: str = "alie"
    params: dict = None

    def __post_init__(self):
        if not isinstance(self.fraction, (int, float, np.floating)) or \
                isinstance(self.fraction, bool) or not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"byzantine fraction must be in [0, 1), got {self.fraction!r}; "
                             "at least one client must be honest.")
        attack, params = check_attack(self.attack, self.params)
        object.__setattr__(self, "params", params)

    @property
    def on_weights(self):
        """True when the attack replaces weight messages."""
        return self.attack in attacks.WEIGHT_ATTACKS or self.attack == "adaptive"

    @property
    def on_packages(self):
        """True when the attack replaces Jacobian packages."""
        return self.attack in PACKAGE_ATTACKS or self.attack == "adaptive"

    @property
    def package_attack(self):
        return PackageAttack(self.attack, self.params) if self.on_packages else None

    @property
    def config(self):
        return {"fraction": float(self.fraction), "attack": self.attack,
                "params": dict(self.params)}

    def clients(self, num_clients, rng):
        """Boolean ``[K]``: the Byzantine clients (``round(fraction * K)`` of them)."""
        chosen = np.zeros(num_clients, bool)
        chosen[rng.choice(num_clients, int(round(self.fraction * num_clients)),
                          replace=False)] = True
        return chosen


def adaptive_weights(own, received, valid, byzantine, radius, margin=0.99):
    """The ``adaptive`` weight attack: each Byzantine slot sends
    own_i + margin * r_i * u_i, with u_i the unit vector opposite to the honest neighbours'
    mean pull (mean honest - own_i) and r_i the defence's acceptance radius (``radius[i]``;
    where it is infinite, the largest honest distance: hidden inside the honest spread).

    Shapes as ``attacks.byzantine_weights``; returns ``[K, D, P]`` float32.
    """
    honest = valid & ~byzantine
    count = honest.sum(1, keepdims=True)
    pull = np.where(count > 0, (received * honest[..., None]).sum(1) / np.maximum(count, 1)
                    - own, 0.0)
    norm = np.linalg.norm(pull, axis=1, keepdims=True)
    direction = -pull / np.maximum(norm, 1e-12)
    spread = np.where(honest, np.linalg.norm(received - own[:, None], axis=2), 0.0).max(1)
    r = np.where(np.isfinite(radius), radius, spread)
    attack = own + margin * r[:, None] * direction
    return np.where(byzantine[..., None], attack[:, None], received).astype(np.float32)


def tamper_package(attack, jacobians, logits, labels, num_classes, rng, factor=None):
    """A materialised package's arrays as a Byzantine sender replaces them.

    Args:
        attack: a ``PackageAttack``.
        jacobians: list of ``[n, C, ...]`` arrays; logits ``[n, C]``; labels ``[n]`` ids.
        rng: the adversary's generator (noise).
        factor: the Jacobian scale of ``adaptive`` (the worker computes it from the
            receiver's kernel); ignored by the other attacks.

    Returns:
        ``(jacobians, logits, labels)``.
    """
    name, p = attack
    if name in ("jacobian_scale", "jacobian_sign_flip", "adaptive"):
        scale = {"jacobian_scale": p.get("factor"), "jacobian_sign_flip": -1.0,
                 "adaptive": factor}[name]
        jacobians = [j * np.float32(scale) for j in jacobians]
    elif name == "jacobian_noise":
        rms = np.sqrt(np.mean([np.mean(np.square(j, dtype=np.float64)) for j in jacobians]))
        jacobians = [j + (p["std"] * rms * rng.standard_normal(j.shape)).astype(np.float32)
                     for j in jacobians]
    elif name == "logit_shift":
        logits = logits - np.float32(p["shift"]) * np.eye(num_classes, dtype=np.float32)[labels]
    elif name == "label_flip":
        labels = (num_classes - 1 - labels).astype(labels.dtype)
    return jacobians, logits, labels


class LazyTampering(typing.NamedTuple):
    """A package attack as a receiver's lazy evaluation applies it, per neighbourhood row.

    ``row_scale`` multiplies each row's Jacobian (H -> D H D, update J^T D R), ``labels`` are
    the one-hot labels as sent, ``logit_offset`` is added to the logits the flow starts from.
    """

    row_scale: np.ndarray  # [B, N] float32
    labels: np.ndarray  # [B, N, C] float32
    logit_offset: np.ndarray  # [B, N, C] float32


def lazy_tampering(attack, rows, labels, factor=None):
    """``tamper_package`` for lazy packages: the same arrays without forming J.

    Args:
        attack: a ``PackageAttack`` (not ``jacobian_noise``, which needs J).
        rows: ``[B, N]`` bool, the rows that came from Byzantine senders.
        labels: ``[B, N, C]`` one-hot labels (zero on padding).
        factor: ``[B, N]`` Jacobian scale of ``adaptive`` per row.
    """
    name, p = attack
    scale = np.ones(rows.shape, np.float32)
    offset = np.zeros(labels.shape, np.float32)
    if name == "jacobian_scale":
        scale[rows] = p["factor"]
    elif name == "jacobian_sign_flip":
        scale[rows] = -1.0
    elif name == "adaptive":
        scale = np.where(rows, factor, 1.0).astype(np.float32)
    elif name == "logit_shift":
        offset[rows] = -p["shift"] * labels[rows]
    elif name == "label_flip":
        labels = labels.copy()
        labels[rows] = labels[rows][:, ::-1]  # one-hot of C - 1 - y
    elif name == "jacobian_noise":
        raise ValueError("jacobian_noise needs the Jacobians formed (packages='explicit').")
    return LazyTampering(scale, labels.astype(np.float32), offset)
