"""NTK-DFL (arXiv 2410.01922): neighbour averaging, then weight evolution along the kernel flow."""

import numpy as np
import tensorflow as tf

from ntkdfl_tf import kernels, topology
from ntkdfl_tf.algorithms import base
from ntkdfl_tf.errors import DivergenceError

LOSSES = ("cross_entropy", "mse")
ORDERS = ("synchronous", "sequential")
SUBSTEP_RULES = ("adaptive", "bound")


class NTKDFL(base.Algorithm):
    """NTK-DFL, one communication round per ``run_round``.

    Each client i averages weights over its closed neighbourhood (w_bar), gathers every
    neighbour's Jacobians and logits at w_bar, builds the output-traced NTK H, integrates the
    function-space flow on the grid t_s = s * eta, and for every candidate tau forms the update
    -(eta/N) J^T R_tau as one vector-Jacobian product. The candidate whose real (non-linear)
    model has the lowest loss on the neighbourhood data becomes client i's model.

    Args:
        learning_rate: grid step eta; a float or a callable ``round -> float``.
        taus: increasing candidate evolution times, in grid steps.
        loss: ``"cross_entropy"`` (Euler flow, step from lambda_max) or ``"mse"`` (closed form
            through the eigenbasis of H).
        kernel: traced-NTK implementation, see ``ntkdfl_tf.kernels`` (``"auto"`` by default).
        per_round_averaging: False for the ablation without neighbour averaging.
        order: ``"synchronous"`` (every client averages, then every client evolves: what a real
            deployment does) or ``"sequential"`` (the reference's older in-place order).
        client_batch: clients evolved together in one TensorFlow call. 1 by default: on CPU,
            TensorFlow's batched (N x N)(N x C) products make the unbatched flow slower per
            client (N = 1194: 0.52 s per client alone, 0.61 s in XLA-compiled batches of 4).
            With ``jacobian_batches`` > 1 (N ~ 200 per slice) batches of 30-60 under
            ``jit_compile`` are fastest. A batch shares one Euler step size, the finest any of
            its clients needs. Batches are contiguous runs of client indices, the same every
            round (a remote executor keeps each run's data on one actor).
        jacobian_chunk: samples per Jacobian chunk for ``kernel="explicit"`` (bounds memory).
        jacobian_batches: the reference's Jacobian batching ``m``. Each round every client's
            samples are shuffled and dealt into m slices; slice k of a neighbourhood is slice k
            of every member. The weights then evolve slice after slice, each slice with its own
            kernel, flow and tau, the Jacobians (kernel and VJP) taken at the round's averaged
            weights and the outputs at the current weights. Kernel and flow cost fall ~m-fold.
        jit_compile: compile the flow, candidate updates and tau choice with XLA (fuses the
            Euler step's element-wise work; 2-3x faster for batched clients on CPU).
        substep_rule: how many Euler sub-steps per grid step the cross-entropy flow takes.
            ``"adaptive"`` (default): from the flow's own stiffness lambda_max((1/N) H S(f)),
            re-estimated every 25 grid steps (``kernels.adaptive_euler_flow``); if the flow
            loss ever rises (the step was too long after all), the slice is redone with the
            bound. ``"bound"``: always the bound lambda_max(H/N)/2, safe for any f
            (``kernels.euler_substeps``); 2-3x more steps in later rounds.
    """

    name = "ntk_dfl"

    def __init__(self, learning_rate=0.01, taus=(100, 200, 300, 400, 500, 600, 800),
                 loss="cross_entropy", kernel="auto", per_round_averaging=True,
                 order="synchronous", client_batch=1, jacobian_chunk=128, jacobian_batches=1,
                 jit_compile=False, substep_rule="adaptive"):
        taus = tuple(int(t) for t in np.atleast_1d(taus))
        if not taus or taus[0] < 1 or any(b <= a for a, b in zip(taus, taus[1:])):
            raise ValueError(f"taus must be positive and strictly increasing, got {taus}; "
                             "e.g. taus=(100, 200, 300, 400, 500, 600, 800).")
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
        if substep_rule not in SUBSTEP_RULES:
            raise ValueError(f"Unknown substep_rule {substep_rule!r}; choose one of "
                             f"{', '.join(SUBSTEP_RULES)}.")
        if order not in ORDERS:
            raise ValueError(f"Unknown order {order!r}; choose one of {', '.join(ORDERS)}.")
        if kernel != "auto" and kernel not in kernels.KERNELS:
            raise ValueError(f"Unknown kernel {kernel!r}; choose auto or one of "
                             f"{', '.join(kernels.KERNELS)}.")
        if kernel == "matrix_free" and loss == "mse":
            raise ValueError("loss='mse' solves the flow through the eigenbasis of H, which "
                             "kernel='matrix_free' never forms; use kernel='dense' for MSE.")
        if not isinstance(client_batch, (int, np.integer)) or client_batch < 1:
            raise ValueError(f"client_batch must be a positive integer, got {client_batch!r}.")
        if not isinstance(jacobian_chunk, (int, np.integer)) or jacobian_chunk < 1:
            raise ValueError(f"jacobian_chunk must be a positive integer, got {jacobian_chunk!r}.")
        if not isinstance(jacobian_batches, (int, np.integer)) or jacobian_batches < 1:
            raise ValueError(f"jacobian_batches must be a positive integer, got "
                             f"{jacobian_batches!r}.")
        if not callable(learning_rate):
            base.learning_rate_at(learning_rate, 0)  # validates now rather than at round 0
        self.jacobian_batches = int(jacobian_batches)
        self.jit_compile = bool(jit_compile)
        self.learning_rate = learning_rate
        self.taus = taus
        self.loss = loss
        self.kernel = kernel
        self.per_round_averaging = per_round_averaging
        self.order = order
        self.client_batch = client_batch
        self.jacobian_chunk = jacobian_chunk
        self.substep_rule = substep_rule
        self._built_for = None

    # -- set-up -----------------------------------------------------------------------------
    def init(self, fns, weights, clients):
        if self._built_for is not fns:
            self._kernel = kernels.make_kernel(fns, self.kernel, chunk=self.jacobian_chunk)
            self._fns = fns
            self._evolve = tf.function(self._evolve_group, reduce_retracing=True,
                                       jit_compile=self.jit_compile)
            self._matrix_free = hasattr(self._kernel, "operator")
            self._built_for = fns
        self._clients, self._slices = clients, (None, None)
        return {}

    def call_clients(self, method, call):
        """A group reads its clients' closed neighbourhoods (``call[1]`` is ``index``)."""
        if method != "evolve_group":
            raise ValueError(f"NTK-DFL has no per-group method {method!r}.")
        index = np.asarray(call[1])
        return np.unique(index[:, 0]), np.unique(index)

    # -- one round --------------------------------------------------------------------------
    def run_round(self, state, weights, adjacency, round_index, fns, clients, rng, executor):
        num_clients = clients.num_clients
        eta = base.learning_rate_at(self.learning_rate, round_index)
        index, valid = topology.neighbourhoods(adjacency)
        mixing = (topology.mixing_matrix(adjacency) if self.per_round_averaging
                  else np.eye(num_clients, dtype=np.float32))
        size = 1 if self.order == "sequential" else min(self.client_batch, num_clients)
        losses, chosen = np.zeros(num_clients), np.zeros(num_clients)
        flow_losses = np.zeros(num_clients)
        orders = slice_orders(clients.counts, int(clients.mask.shape[1]), self.jacobian_batches,
                              rng)
        shared = (round_index, orders)
        if self.order == "sequential":  # in place: later clients see earlier clients' updates
            new_weights, losses, chosen, substeps, flow_losses, fallbacks = self._sequential(
                weights, mixing, index, valid, shared, eta)
        else:
            averaged = [w.numpy() for w in base.neighbour_average(mixing, weights)]
            # contiguous groups, the same every round: a remote executor serves each block of
            # clients from the actor that holds their data
            groups = base.client_groups(num_clients, size)
            calls = [([a[idx] for a in averaged], index[idx], valid[idx], eta)
                     for idx, _ in groups]
            results = executor.map("evolve_group", calls, shared)
            new_weights = [np.empty_like(a) for a in averaged]
            substeps, fallbacks = [], 0
            for (idx, real), (new, loss, tau, steps, flow, redone) in zip(groups, results):
                for out, v in zip(new_weights, new):
                    out[idx[:real]] = v[:real]
                losses[idx[:real]], chosen[idx[:real]] = loss[:real], tau[:real]
                flow_losses[idx[:real]] = flow[:real]
                substeps.extend(steps)
                fallbacks += redone
            new_weights = [tf.constant(w) for w in new_weights]
        if not np.isfinite(losses).all():
            bad = np.flatnonzero(~np.isfinite(losses))
            raise DivergenceError(
                f"NTK-DFL diverged in round {round_index + 1}: no candidate tau gave a finite "
                f"loss for client(s) {bad[:10].tolist()} (NaN/inf in kernel or flow); lower "
                f"learning_rate (now {eta}) or the taus.", round=round_index + 1,
                clients=bad.tolist())
        # flow_loss: the loss the linearised flow predicted at the chosen tau; model_loss: the
        # updated network's actual loss on the same data (the two part where linearisation fails)
        logs = {"loss": float(np.mean(losses)), "tau": float(np.mean(chosen)), "eta": eta,
                "flow_loss": float(np.mean(flow_losses)), "model_loss": float(np.mean(losses)),
                "euler_substeps": float(np.mean(substeps)), "flow_fallbacks": float(fallbacks),
                "bytes_sent": self.bytes_sent(adjacency, clients.counts, fns)}
        return new_weights, state, logs

    def _sequential(self, weights, mixing, index, valid, shared, eta):
        """Clients one after another, each averaging its neighbours' latest weights."""
        num_clients = int(index.shape[0])
        slices = self._round_slices(*shared)
        current = [tf.Variable(w) for w in weights]
        losses, chosen, substeps = np.zeros(num_clients), np.zeros(num_clients), []
        flow_losses, fallbacks = np.zeros(num_clients), 0
        for i in range(num_clients):
            w = base.neighbour_average(mixing[i:i + 1], current)
            new, loss, tau, steps, flow, redone = self.evolve(w, index[i:i + 1], valid[i:i + 1],
                                                              slices, eta)
            losses[i], chosen[i], flow_losses[i] = loss[0], tau[0], flow[0]
            substeps.extend(steps)
            fallbacks += redone
            for c, v in zip(current, new):
                c.scatter_nd_update([[i]], v)
        return ([tf.convert_to_tensor(c) for c in current], losses, chosen, substeps,
                flow_losses, fallbacks)

    # -- per-group work (pure: NumPy in, NumPy out; runs wherever the executor puts it) --------
    def _round_slices(self, round_index, orders):
        """This round's Jacobian-batching slices of the client data (built once per round)."""
        if self._slices[0] != round_index:
            self._slices = (round_index, slices_from_orders(self._clients, orders))
        return self._slices[1]

    def evolve_group(self, round_index, orders, weights, index, valid, eta):
        """``evolve`` for one group, from NumPy averaged weights; returns NumPy results."""
        new, loss, tau, steps, flow_loss, redone = self.evolve(
            [tf.constant(a) for a in weights], index, valid,
            self._round_slices(round_index, orders), eta)
        return [v.numpy() for v in new], loss, tau, steps, flow_loss, redone

    def evolve(self, weights, index, valid, slices, eta):
        """Evolves a group of clients from their (averaged) weights.

        Args:
            weights: list of ``[B, *shape]`` tensors: each client's w_bar.
            index, valid: ``[B, S]`` neighbourhood slots (``topology.neighbourhoods``).
            slices: list of ClientTensors (one without Jacobian batching, see
                ``slices_from_orders``).
            eta: grid step.

        Returns:
            ``(new_weights, loss, tau, substeps, flow_loss, redone)``: the evolved weights, the
            chosen candidates' neighbourhood loss and tau (NumPy ``[B]``, means over slices),
            the Euler sub-steps per grid step of each slice's flow (list; 0 for the MSE closed
            form), the loss the flow itself predicted at the chosen tau (NumPy ``[B]``), and
            how many slices were redone with the bound step (``substep_rule``).
        """
        current, losses, taus, substeps, flow_losses, redone = weights, [], [], [], [], 0
        eta = tf.constant(eta, tf.float32)
        for part in slices:
            feats, labels, mask = gather_neighbourhood(part, index, valid)
            # Jacobians at the averaged weights; a matrix-free kernel is applied in the flow
            h = tf.zeros([]) if self._matrix_free else self._kernel(weights, feats, mask)
            args = (weights, current, feats, labels, mask, h, eta)
            bound = self.substep_rule == "bound"
            *result, monotone = self._evolve(*args, tf.constant(bound))
            if not bound and not bool(monotone):  # the adaptive step was too long: redo safely
                *result, _ = self._evolve(*args, tf.constant(True))
                redone += 1
            current, loss, tau_index, steps, flow_loss = result
            losses.append(loss.numpy())
            flow_losses.append(flow_loss.numpy())
            taus.append(np.asarray(self.taus)[tau_index.numpy()])
            substeps.append(float(steps))
        return (current, np.mean(losses, 0), np.mean(taus, 0), substeps, np.mean(flow_losses, 0),
                redone)

    def _evolve_group(self, linearised, weights, feats, labels, mask, h, eta, bound_step):
        """Flow, candidate updates and tau choice; Jacobians at ``linearised``, start ``weights``.

        ``bound_step`` (bool tensor) picks the Euler step: the bound for any f, or the adaptive
        one. The last output says whether every flow loss was finite and non-increasing.
        """
        fns = self._fns
        n = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)  # a slice may hold no sample of a client
        taus = tf.constant(self.taus, tf.int32)
        if self._matrix_free:
            h = self._kernel.operator(linearised, feats, mask)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(linearised)
            f_lin = fns.forward(linearised, feats)
        f0 = f_lin if self.jacobian_batches == 1 else fns.forward(weights, feats)
        if self.loss == "mse":
            r_sums, f_taus = kernels.mse_closed_form(h, f0, labels, mask, n, eta, taus)
            substeps, monotone = tf.constant(0.0), tf.constant(True)
        elif self.substep_rule == "bound":
            steps = kernels.euler_substeps(h, n, eta, mask=mask)
            r_sums, f_taus = kernels.euler_flow(h, f0, labels, mask, n, eta, taus, steps)
            substeps = tf.cast(steps, tf.float32)
            monotone = tf.constant(True)
        else:
            r_sums, f_taus, substeps, monotone = kernels.adaptive_euler_flow(
                h, f0, labels, mask, n, eta, self.taus, bound_step=bound_step)

        def loss_of(logits):
            if self.loss == "mse":
                c = tf.cast(tf.shape(labels)[-1], tf.float32)
                err = tf.reduce_sum(tf.square(logits - labels), -1) * mask / (2 * c)
                return tf.reduce_sum(err, -1) / n
            return base.masked_cross_entropy(logits, labels, mask)

        candidates, cand_losses, flow_losses = [], [], []
        for t in range(len(self.taus)):  # a handful of candidates; each one VJP, one forward
            cotangent = r_sums[t] * (eta / n)[:, None, None]
            grads = tape.gradient(f_lin, linearised, output_gradients=cotangent)
            cand = [w - g for w, g in zip(weights, grads)]
            candidates.append(cand)
            cand_losses.append(loss_of(fns.forward(cand, feats)))
            flow_losses.append(loss_of(f_taus[t]))  # what the linearisation predicted
        del tape
        cand_losses = tf.stack(cand_losses)  # [T, B]
        safe = tf.where(tf.math.is_finite(cand_losses), cand_losses, np.inf)
        best = tf.argmin(safe, axis=0, output_type=tf.int32)  # [B]
        new = [tf.gather(tf.stack([c[v] for c in candidates], axis=1), best, batch_dims=1)
               for v in range(len(weights))]
        flow_loss = tf.gather(tf.transpose(tf.stack(flow_losses)), best, batch_dims=1)
        return (new, tf.gather(tf.transpose(cand_losses), best, batch_dims=1), best,
                substeps, flow_loss, monotone)

    def bytes_sent(self, adjacency, counts, fns):
        """What the protocol transmits in one round, in bytes (float32).

        Over every edge j -> i: j's weights (for i's average; not in the ablation), i's averaged
        weights back to j, and j's Jacobians (n_j x C x P), logits (n_j x C) and labels (n_j) at
        them. With Jacobian batching, the outputs at i's intermediate weights are counted as
        already included (the same n_j x C logits, re-evaluated slice by slice).
        """
        p, c = fns.num_params, fns.num_classes
        senders = adjacency.sum(axis=0)  # times each client sends its data's Jacobians
        edges = adjacency.sum()
        weight_floats = edges * p * (2 if self.per_round_averaging else 1)
        jac_floats = float(np.sum(senders * counts)) * (c * p + c + 1)
        return float((weight_floats + jac_floats) * base.FLOAT_BYTES)


def slice_orders(counts, n_max, m, rng):
    """Each client's samples, shuffled and dealt into ``m`` slices: int32 ``[m, K, per_slice]``.

    Real samples go first, shuffled, and are dealt round-robin, so slice j holds about n_i/m of
    client i's samples; index ``n_max`` means padding. None for ``m == 1`` (no batching).
    """
    if m == 1:
        return None
    k = len(counts)
    keys = rng.random((k, n_max)) + (np.arange(n_max)[None] >= np.asarray(counts)[:, None])
    order = np.argsort(keys, axis=1).astype(np.int32)
    per_slice = -(-n_max // m)
    order = np.concatenate([order, np.full((k, per_slice * m - n_max), n_max, np.int32)], 1)
    return np.stack([order[:, j::m] for j in range(m)])


def slices_from_orders(clients, orders):
    """The slices (ClientTensors each) that ``slice_orders`` describes; ``[clients]`` for None."""
    if orders is None:
        return [clients]
    if clients.ids is not None:  # orders deal every client; these tensors hold some
        orders = orders[:, clients.ids]
    feats, labels, mask = (base.append_zero_row(t) for t in
                           (clients.features, clients.labels, clients.mask))
    parts = []
    for idx in orders:
        idx = tf.constant(idx, tf.int32)
        part_mask = tf.gather(mask, idx, batch_dims=1)
        parts.append(base.ClientTensors(tf.gather(feats, idx, batch_dims=1),
                                        tf.gather(labels, idx, batch_dims=1), part_mask,
                                        part_mask.numpy().sum(1).astype(np.int64),
                                        clients.ids))
    return parts


def gather_neighbourhood(clients, index, valid):
    """Stacks each client's closed-neighbourhood data: ``[B, S * n_max, ...]`` and masks."""
    index = tf.convert_to_tensor(clients.rows(index))
    batch, slots = index.shape
    n_max = clients.features.shape[1]

    def stack(t):
        g = tf.gather(t, index)  # [B, S, n_max, ...]
        return tf.reshape(g, [batch, slots * n_max] + list(t.shape[2:]))

    slot_mask = tf.repeat(tf.convert_to_tensor(valid, tf.float32), n_max, axis=1)
    mask = stack(clients.mask) * slot_mask
    return stack(clients.features), stack(clients.labels) * mask[..., None], mask
