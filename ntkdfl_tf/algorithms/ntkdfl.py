"""NTK-DFL (arXiv 2410.01922): neighbour averaging, then weight evolution along the kernel flow.

One round, as messages (every arrow through the round's channel):

    j --WeightsMessage(w_j)--> i          every edge j -> i of the round's graph
    i: w_bar_i = mean over i and whom it heard from (the ablation: w_bar_i = w_i, no first row)
    i --WeightsMessage(w_bar_i)--> j      to every neighbour i heard from (ablation: the graph's)
    j --JacobianPackage at w_bar_i--> i   to every client whose averaged weights reached j
    i: kernel from the packages, flow, candidate updates, tau  (``NTKDFLWorker``)
"""

import dataclasses
import typing
import warnings

import numpy as np
import tensorflow as tf

from ntkdfl_tf import kernels, protocol, topology
from ntkdfl_tf.algorithms import base
from ntkdfl_tf.errors import DivergenceError

FLOWS = ("dopri5", "exact", "rkc", "euler_adaptive", "euler_bound")


class AdaptiveFlow(typing.NamedTuple):
    """An error-controlled ``flow``: its integrator (the one-call flow and its segments), its
    tolerances, and the products with H per step its ``steps`` counts."""

    whole: typing.Callable
    segments: typing.Callable
    rtol: float
    atol: float
    products_per_step: int


_DOPRI = (kernels.dormand_prince_flow, kernels.dormand_prince_segments)
ADAPTIVE_FLOWS = {"dopri5": AdaptiveFlow(*_DOPRI, 1e-4, 1e-6, 6),
                  "exact": AdaptiveFlow(*_DOPRI, 1e-6, 1e-8, 6),
                  # rkc's steps count products with H themselves
                  "rkc": AdaptiveFlow(kernels.rkc_flow, kernels.rkc_segments, 1e-3, 1e-5, 1)}
PACKAGE_FORMS = ("lazy", "explicit")
TAU_SEARCHES = ("full", "early_stop")


class EvolveContext(typing.NamedTuple):
    """What every call of a round shares.

    Attributes:
        round_index, eta: the round and its grid step.
        slice_orders: ``slice_orders`` deal ``[m, K, per_slice]``, None without batching.
        codec: the packages' ``protocol.codecs.Codec``; its ``topk``/``quantize`` act on the
            materialised packages in the worker.
        seed: seed of this round's codec randomness (stochastic rounding).
        attack: the ``protocol.byzantine.PackageAttack`` tampered packages carry, or None.
        screen: the package screen's parameters (``package_screen``), or None: no screen.
        adversary_seed: seed of this round's attack randomness (``jacobian_noise``).
    """

    round_index: int
    eta: float
    slice_orders: np.ndarray
    codec: typing.Any = None
    seed: int = 0
    attack: typing.Any = None
    screen: dict = None
    adversary_seed: int = 0


class EvolveCall(typing.NamedTuple):
    """Evolve a group of clients from their averaged weights with the packages they received.

    Attributes:
        members: the receiving clients, int32 ``[B]`` (the last group padded by repetition).
        weights: their averaged weights w_bar, NumPy ``[B, *shape]`` per variable.
        senders: ``[B, S]`` whose packages each member uses: itself first, then every client
            whose package reached it (``topology.neighbourhoods`` layout; padding repeats it).
        valid: ``[B, S]`` float32, 1 for a real slot.
        keep: ``[B, S, n_max]`` float32, 1 for each sample a package carries (``subsample``);
            None: every sample.
        tampered: ``[B, S]`` bool, slots whose package a Byzantine sender tampered with; None:
            none was.
    """

    members: np.ndarray
    weights: list
    senders: np.ndarray
    valid: np.ndarray
    keep: np.ndarray = None
    tampered: np.ndarray = None

    @property
    def reads(self):
        """Every client whose samples the call reads (the lazy packages' senders)."""
        return np.unique(self.senders)


class EvolveResult(typing.NamedTuple):
    """A group's evolved weights and what the logs report, per member ``[B]``.

    Attributes:
        weights: NumPy ``[B, *shape]`` per variable.
        loss: the chosen candidates' real loss on the neighbourhood data (mean over slices).
        tau: the chosen tau (mean over slices).
        substeps: integrator steps per grid step of each slice's flow: Euler sub-steps,
            attempted Dormand-Prince steps (six products with H each), or for ``rkc`` products
            with H (its steps differ in cost; its stiffness estimate included); 0 for the
            closed form.
            Per grid step integrated: with ``tau_search="early_stop"`` up to the last candidate
            the call evaluated.
        flow_loss: the loss the linearised flow predicted at the chosen tau.
        redone: slices redone with the bound step (``flow="euler_adaptive"``).
        clipped, dropped: package slots the screen clipped and dropped, over the slices.
        over_budget: member-slices left unevolved because their kernel exceeded
            ``NTKDFL.flow_budget`` (their tau is reported as 0).
        bound_max: the most Euler sub-steps per grid step any member-slice's kernel asked
            (``kernels.client_substeps``, what ``flow_budget`` is compared with).
        candidates_evaluated: per slice, the candidate taus the group's call integrated to and
            evaluated (``NTKDFL.tau_search``: all of them for ``"full"``).
        candidate_losses: per slice, ``[T, B]`` every candidate's real loss (NaN for a
            candidate the call did not evaluate).
    """

    weights: list
    loss: np.ndarray
    tau: np.ndarray
    substeps: list
    flow_loss: np.ndarray
    redone: int
    clipped: int = 0
    dropped: int = 0
    over_budget: int = 0
    bound_max: float = 0.0
    candidates_evaluated: list = ()
    candidate_losses: list = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class NTKDFL(base.Algorithm):
    """NTK-DFL, one communication round per ``run_round``.

    Each client i averages weights over its closed neighbourhood (w_bar), receives every
    neighbour's Jacobian package at w_bar, builds the output-traced NTK H, integrates the
    function-space flow on the grid t_s = s * eta, and for every candidate tau forms the update
    -(eta/N) J^T R_tau as one vector-Jacobian product. The candidate whose real (non-linear)
    model has the lowest loss on the neighbourhood data becomes client i's model.

    Args:
        learning_rate: grid step eta; a float or a callable ``round -> float``.
        taus: increasing candidate evolution times, in grid steps.
        loss: ``"cross_entropy"`` (integrated as ``flow`` says) or ``"mse"`` (closed form
            through the eigenbasis of H, whatever ``flow``); see ``kernels.losses``.
        kernel: traced-NTK implementation, see ``ntkdfl_tf.kernels`` (``"auto"`` by default).
        per_round_averaging: False for the ablation without neighbour averaging.
        client_batch: clients evolved together in one TensorFlow call (1 by default; with
            ``jacobian_batches`` > 1 and ``jit_compile``, batches of 5 were fastest on CPU with
            ``dopri5``, 30-60 with the Euler flows: docs/performance.md). With an Euler
            ``flow`` a batch shares one step size, the finest any of its clients needs; with the
            error-controlled flows (``dopri5``, ``exact``, ``rkc``) every client keeps its own
            and the call lasts as long as its slowest. Batches are contiguous runs of client
            indices, the same every round (a remote executor keeps each run's data on one
            actor). Each batch is one step of the trainer's progress bar.
        jacobian_chunk: samples per Jacobian chunk for ``kernel="explicit"`` and explicit
            packages (bounds memory).
        jacobian_batches: the reference's Jacobian batching ``m``. Each round every client's
            samples are shuffled and dealt into m slices; slice k of a neighbourhood is slice k
            of every member. The weights then evolve slice after slice, each slice with its own
            kernel, flow and tau, the Jacobians (kernel and VJP) taken at the round's averaged
            weights and the outputs at the current weights. Kernel and flow cost fall ~m-fold.
        jit_compile: compile the flow, candidate updates and tau choice with XLA (not with
            ``loss="mse"``, whose eigendecomposition is far slower under XLA on a CPU).
        flow: how the cross-entropy flow is integrated (README: the flow argument).
            ``"dopri5"`` (default): adaptive Dormand-Prince 5(4) with rtol 1e-4, f at the grid
            points from its dense output (``kernels.dormand_prince_flow``). ``"exact"``: the
            same to rtol 1e-6, as the reference integrates it. ``"rkc"``: Runge-Kutta-Chebyshev
            steps to rtol 1e-3, whose stability interval grows with the square of their
            stages (``kernels.rkc_flow``; fewer products with H than ``dopri5``, measured in
            docs/performance.md). ``"euler_adaptive"``: forward
            Euler whose sub-steps follow the flow's own stiffness lambda_max((1/N) H S(f)),
            re-estimated every 25 grid steps (``kernels.adaptive_euler_flow``); if the flow
            loss ever rises, the slice is redone with the bound (the default before
            ``dopri5``). ``"euler_bound"``: Euler sub-steps from the bound lambda_max(H/N)/2,
            safe for any f (``kernels.euler_substeps``).
        packages: how a receiver uses its Jacobian packages. ``"lazy"`` (default): the
            simulation evaluates what it needs from the senders' samples at w_bar (the
            structured kernel never forms J). ``"explicit"``: every package is materialised
            (Jacobians in chunks of ``jacobian_chunk`` samples, logits, labels; per
            Jacobian-batching slice) and the kernel, the update J^T R, the labels and (without
            batching) the flow's start come from its arrays; the same update, for codecs that
            need J.
        flow_budget: a bound on each client's flow cost, in Euler sub-steps per grid step by
            the stability bound ceil(1.1 eta lambda_max(H/N) / 2) (``kernels.client_substeps``).
            A slice whose kernel asks more, as one inflated by a Byzantine neighbour's weights
            or Jacobians does, is not evolved: the client keeps its weights for that slice and
            the round logs it in ``flow_over_budget`` (and in ``flow_bound_max`` the most any
            kernel asked). None (default): no bound, the flow takes what the kernel asks. Set
            it above what honest rounds ask (``flow_bound_max`` without an attack) when
            neighbours may be Byzantine; the ``byzantine`` preset does.
        tau_search: how the candidate taus are searched. ``"full"`` (default): the flow runs to
            the largest tau and every candidate is evaluated. ``"early_stop"``: the flow is
            integrated from one candidate to the next, each candidate evaluated as it is
            reached, and a client stops once its candidates' real loss has risen for two
            consecutive candidates; its tau is the argmin over the candidates it evaluated
            (the same as ``"full"`` whenever its losses along the grid are unimodal). A client
            batch shares one call, so the call's flow stops when every member has stopped (or
            at the largest tau); a member that stopped earlier keeps its own argmin. The round
            logs ``candidates_evaluated``.
    """

    learning_rate: typing.Any = 0.01
    taus: tuple = (100, 200, 300, 400, 500, 600, 800)
    loss: str = "cross_entropy"
    kernel: str = "auto"
    per_round_averaging: bool = True
    client_batch: int = 1
    jacobian_chunk: int = 128
    jacobian_batches: int = 1
    jit_compile: bool = False
    flow: str = "dopri5"
    packages: str = "lazy"
    flow_budget: typing.Optional[int] = None
    tau_search: str = "full"

    name: typing.ClassVar[str] = "ntk_dfl"

    def __post_init__(self):
        taus = tuple(int(t) for t in np.atleast_1d(self.taus))
        if not taus or taus[0] < 1 or any(b <= a for a, b in zip(taus, taus[1:])):
            raise ValueError(f"taus must be positive and strictly increasing, got {taus}; "
                             "e.g. taus=(100, 200, 300, 400, 500, 600, 800).")
        object.__setattr__(self, "taus", taus)
        kernels.losses.get(self.loss)  # raises for an unknown name
        if self.flow not in FLOWS:
            raise ValueError(f"Unknown flow {self.flow!r}; choose one of {', '.join(FLOWS)}.")
        if self.tau_search not in TAU_SEARCHES:
            raise ValueError(f"Unknown tau_search {self.tau_search!r}; choose one of "
                             f"{', '.join(TAU_SEARCHES)}.")
        if self.packages not in PACKAGE_FORMS:
            raise ValueError(f"Unknown packages {self.packages!r}; choose one of "
                             f"{', '.join(PACKAGE_FORMS)}.")
        if self.kernel != "auto" and self.kernel not in kernels.KERNELS:
            raise ValueError(f"Unknown kernel {self.kernel!r}; choose auto or one of "
                             f"{', '.join(kernels.KERNELS)}.")
        if self.kernel == "matrix_free" and kernels.losses.get(self.loss).closed_form:
            raise ValueError("loss='mse' solves the flow through the eigenbasis of H, which "
                             "kernel='matrix_free' never forms; use kernel='dense' for MSE.")
        if self.kernel == "matrix_free" and self.packages == "explicit":
            raise ValueError("packages='explicit' builds H from the packages' Jacobians; it "
                             "cannot be combined with kernel='matrix_free'.")
        for name in ("client_batch", "jacobian_chunk", "jacobian_batches"):
            base.positive_int(name, getattr(self, name))
        if self.flow_budget is not None and (
                not isinstance(self.flow_budget, (int, np.integer)) or self.flow_budget < 1):
            raise ValueError(f"flow_budget must be a positive integer (Euler sub-steps per grid "
                             f"step) or None for no bound, got {self.flow_budget!r}.")
        if not callable(self.learning_rate):
            base.learning_rate_at(self.learning_rate, 0)  # validates now rather than at round 0

    def make_worker(self, fns):
        from ntkdfl_tf.algorithms.ntkdfl_worker import NTKDFLWorker

        return NTKDFLWorker(self, fns)

    # -- one round --------------------------------------------------------------------------
    def run_round(self, round_input, channel, executor):
        r = round_input
        k = r.num_clients
        eta = base.learning_rate_at(self.learning_rate, r.index)
        averaged, heard = self.average(r, channel)
        # i asks every neighbour it heard from for a package at w_bar_i ...
        requests = channel.deliver(protocol.weights_messages(heard.T, averaged))
        # ... and each neighbour the request reached replies with one
        packages = channel.deliver(self.packages_for(requests.messages, r.counts, r.fns,
                                                     r.sample_bytes))
        senders, valid = topology.neighbourhoods(
            protocol.heard_from(packages.messages, k))
        keep = samples_kept(packages.messages, senders, valid, r.max_samples)
        tampered = tampered_slots(packages.messages, senders, valid)
        del requests, packages  # the calls below carry what the round needs of them
        orders = slice_orders(r.counts, r.max_samples, self.jacobian_batches, r.rng)
        # contiguous groups, the same every round: a remote executor serves each block of
        # clients from the actor that holds their data
        groups = base.client_groups(k, min(self.client_batch, k))
        calls = [EvolveCall(g.indices, [a[g.indices] for a in averaged], senders[g.indices],
                            valid[g.indices], None if keep is None else keep[g.indices],
                            None if tampered is None else tampered[g.indices])
                 for g in groups]
        screen = None if r.defence is None else r.defence.screen
        adversary_seed = 0 if channel.adversary is None else int(
            channel.adversary.rng.integers(2**31))
        results = executor.map(EvolveContext(r.index, eta, orders, channel.codec, channel.seed,
                                             channel.package_attack, screen, adversary_seed),
                               calls, progress=r.progress)
        return self.combine(r, groups, results, eta, screen is not None)

    def average(self, round_input, channel):
        """Every client's w_bar (NumPy) and whom it heard from: the weights messages j -> i.

        The messages (views of a copy of every client's weights) are freed on return.
        """
        r = round_input
        own = [w.numpy() for w in r.weights]
        if not self.per_round_averaging:  # the ablation: each client evolves from its own
            return own, r.graph
        delivery = channel.deliver(protocol.weights_messages(r.graph, own), own=own)
        averaged = [a.numpy() for a in base.average_received(r.weights, delivery, r)]
        return averaged, protocol.heard_from(delivery.messages, r.num_clients)

    def packages_for(self, requests, counts, fns, sample_bytes=None):
        """One lazy ``JacobianPackage`` in reply to each delivered request (its receiver)."""
        specs, layout = {}, protocol.codecs.package_layout(fns, sample_bytes)
        for n in {int(counts[m.receiver]) for m in requests}:
            specs[n] = protocol.package_specs(n, fns.num_classes, fns.shapes)
        return [protocol.JacobianPackage(sender=m.receiver, receiver=m.sender,
                                         specs=specs[int(counts[m.receiver])], layout=layout)
                for m in requests]

    def combine(self, round_input, groups, results, eta, screened=False):
        """The groups' results -> the round's ``RoundOutput``."""
        k = round_input.num_clients
        new = [base.scatter_groups(groups, [res.weights[v] for res in results], k)
               for v in range(len(results[0].weights))]
        losses, chosen, flow_losses = (
            base.scatter_groups(groups, [getattr(res, f) for res in results], k, np.float64)
            for f in ("loss", "tau", "flow_loss"))
        substeps = [s for res in results for s in res.substeps]
        over_budget = sum(res.over_budget for res in results)
        if over_budget and over_budget == k * max(len(res.substeps) for res in results):
            # an attack can do this (the honest weights diverge), so the run goes on; from the
            # first round it is more likely a learning rate too large
            warnings.warn(
                f"NTK-DFL round {round_input.index + 1}: every client's kernel asked more than "
                f"flow_budget={self.flow_budget} Euler sub-steps per grid step (up to "
                f"{max(res.bound_max for res in results):.0f}), so no client evolved; if no "
                f"neighbour is Byzantine, lower learning_rate (now {eta}) or raise flow_budget.",
                RuntimeWarning, stacklevel=2)
        if not np.isfinite(losses).all():
            bad = np.flatnonzero(~np.isfinite(losses))
            raise DivergenceError(
                f"NTK-DFL diverged in round {round_input.index + 1}: no candidate tau gave a "
                f"finite loss for client(s) {bad[:10].tolist()} (NaN/inf in kernel or flow); "
                f"lower learning_rate (now {eta}) or the taus.", round=round_input.index + 1,
                clients=bad.tolist())
        # flow_loss: the loss the linearised flow predicted at the chosen tau; model_loss: the
        # updated network's actual loss on the same data (the two part where linearisation fails)
        logs = {"loss": float(np.mean(losses)), "tau": float(np.mean(chosen)), "eta": eta,
                "flow_loss": float(np.mean(flow_losses)), "model_loss": float(np.mean(losses)),
                "euler_substeps": float(np.mean(substeps)),
                "flow_fallbacks": float(sum(res.redone for res in results)),
                "flow_over_budget": float(over_budget),
                "flow_bound_max": max(res.bound_max for res in results)}
        evaluated = [c for res in results for c in res.candidates_evaluated]
        if evaluated:  # per (client batch, slice) call: what the flow and the VJPs cost
            logs["candidates_evaluated"] = float(np.mean(evaluated))
        if screened:  # package slots (per slice) the screen clipped or dropped this round
            logs["packages_clipped"] = float(sum(res.clipped for res in results))
            logs["packages_dropped"] = float(sum(res.dropped for res in results))
        return base.RoundOutput([tf.constant(w) for w in new], logs)


def samples_kept(packages, senders, valid, n_max):
    """``[K, S, n_max]`` float32: 1 where slot (i, s)'s package carries that sample of its
    sender (own data, slot 0, always whole); None when every package carries everything."""
    if all(p.samples is None for p in packages):
        return None
    keep = np.repeat(valid[:, :, None], n_max, axis=2).astype(np.float32)
    slot = {(int(i), int(j)): s for (i, s), j in np.ndenumerate(senders) if s > 0 and valid[i, s]}
    for p in packages:
        if p.samples is not None:
            row = keep[p.receiver, slot[p.receiver, p.sender]]
            row[:] = 0.0
            row[p.samples] = 1.0
    return keep


def tampered_slots(packages, senders, valid):
    """``[K, S]`` bool: slot (i, s) holds a package its Byzantine sender tampered with; None
    when no package was."""
    if all(p.tampering is None for p in packages):
        return None
    tampered = np.zeros(senders.shape, bool)
    slot = {(int(i), int(j)): s for (i, s), j in np.ndenumerate(senders) if s > 0 and valid[i, s]}
    for p in packages:
        if p.tampering is not None:
            tampered[p.receiver, slot[p.receiver, p.sender]] = True
    return tampered


def slice_orders(counts, n_max, m, rng):
    """Each client's samples, shuffled and dealt into ``m`` slices: int32 ``[m, K, per_slice]``.

    Real samples go first, shuffled, and are dealt round-robin, so slice j holds about n_i/m of
    client i's samples; index ``n_max`` means padding. None for ``m == 1`` (no batching).
    """
    if m == 1:
        return None
    k = len(counts)
    order = base.real_first_orders(counts, n_max, rng)
    per_slice = -(-n_max // m)
    order = np.concatenate([order, np.full((k, per_slice * m - n_max), n_max, np.int32)], 1)
    return np.stack([order[:, j::m] for j in range(m)])
