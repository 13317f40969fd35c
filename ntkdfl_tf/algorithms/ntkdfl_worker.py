"""NTK-DFL's per-client work: kernel, flow, candidate updates and tau, for groups of receivers.

One ``NTKDFLWorker`` per process or Ray actor owns the compiled evolution, the kernel and the
data of the clients bound to it; ``run(EvolveContext, EvolveCall) -> EvolveResult``.
"""

import dataclasses
import threading
import typing

import numpy as np
import tensorflow as tf

from ntkdfl_tf import kernels, protocol
from ntkdfl_tf.algorithms import base, package_screen
from ntkdfl_tf.algorithms.ntkdfl import ADAPTIVE_FLOWS, EvolveResult

# Largest size of the Jacobian packages one worker call stacks per slice (explicit packages:
# B receivers x their neighbourhood's rows x C x P floats). A call whose members' packages
# would pass it runs its members in sub-groups that fit: 25 receivers of the MLP at m = 6
# would stack 16 GB.
PACKAGE_MEMORY_BYTES = 2 * 2**30


class SliceResult(typing.NamedTuple):
    """One slice's evolution for a group of clients (tensors, ``[B]`` per client)."""

    weights: list
    loss: tf.Tensor
    tau_index: tf.Tensor
    substeps: tf.Tensor
    flow_loss: tf.Tensor
    monotone: tf.Tensor  # euler_adaptive: every flow loss finite and non-increasing (else: redo
    # with the bound); error-controlled flows: every client reached the last tau (integrated to)
    bound: tf.Tensor  # [B] Euler sub-steps per grid step the kernel asks (kernels.client_substeps)
    over_budget: tf.Tensor  # [B] bool: ``bound`` above ``flow_budget``: the weights were kept
    evaluated: tf.Tensor  # int32: candidates the call integrated to and evaluated
    candidate_losses: tf.Tensor  # [T, B] real loss of each candidate, NaN if not evaluated


class NTKDFLWorker(base.Worker):
    """Evolves groups of clients from their averaged weights and received packages."""

    def __init__(self, algorithm, fns):
        super().__init__(algorithm, fns)
        self.loss = kernels.losses.get(algorithm.loss)
        self.kernel = kernels.make_kernel(fns, algorithm.kernel, chunk=algorithm.jacobian_chunk)
        self.matrix_free = hasattr(self.kernel, "operator")
        # with the closed-form Dense kernel the candidates go through its input gram
        # (kernels.dense.candidate_logits) where the receiver evaluates its packages itself
        self.dense_candidates = isinstance(self.kernel, kernels.DenseNTK)
        # not under XLA for the MSE closed form: XLA's CPU eigh is a Jacobi solver, orders of
        # magnitude slower than LAPACK's (docs/performance.md, the MSE closed form)
        self.jit_compile = algorithm.jit_compile and not self.loss.closed_form
        self._evolve = tf.function(self._evolve_slice, reduce_retracing=True,
                                   jit_compile=self.jit_compile)
        self._jacobians = tf.function(lambda w, x: kernels.jacobian(fns, w, x),
                                      reduce_retracing=True)  # traced only if packages are formed
        self._clients, self._slices = None, (None, None)
        self._slices_lock = threading.Lock()

    def bind(self, clients):
        self._clients, self._slices = clients, (None, None)

    def _round_slices(self, round_index, orders):
        """This round's Jacobian-batching slices of the client data (built once per round),
        each with the sample positions it takes from every held client."""
        with self._slices_lock:  # calls may run on several threads (LocalExecutor)
            if self._slices[0] != round_index:
                parts = slices_from_orders(self._clients, orders)
                n_max = int(self._clients.mask.shape[1])
                if orders is None:
                    positions = [np.broadcast_to(np.arange(n_max),
                                                 (self._clients.num_clients, n_max))]
                else:
                    positions = list(orders if self._clients.ids is None else
                                     orders[:, self._clients.ids])
                self._slices = (round_index, list(zip(parts, positions)))
            return self._slices[1]

    def forms_packages(self, context, call):
        """Whether this call materialises the Jacobian packages (explicit packages, a lossy
        codec, or a ``jacobian_noise`` attack on one of its slots) instead of keeping them
        lazy."""
        codec, attack = context.codec, context.attack
        tampered = attack is not None and call.tampered is not None and call.tampered.any()
        return (self.algorithm.packages == "explicit" or
                (codec is not None and codec.changes_values) or
                (tampered and attack.name == "jacobian_noise"))

    def members_per_call(self, context, call):
        """How many of the call's members one pass evolves together: all of them, or for
        materialised packages as many as fit in ``PACKAGE_MEMORY_BYTES``."""
        if not self.forms_packages(context, call):
            return len(call.members)
        rows = call.senders.shape[1] * -(-int(self._clients.mask.shape[1])
                                          // self.algorithm.jacobian_batches)
        member_bytes = rows * self.fns.num_classes * self.fns.num_params * 4
        return max(1, min(len(call.members), PACKAGE_MEMORY_BYTES // member_bytes))

    def run(self, context, call):
        """Evolves ``call.members``, slice after slice; returns an ``EvolveResult``.

        Members whose materialised packages would not fit in ``PACKAGE_MEMORY_BYTES`` together
        run in consecutive sub-groups (each with its own codec and attack randomness, seeded by
        its first member), and their results are joined.
        """
        size = self.members_per_call(context, call)
        if size >= len(call.members):
            return self._run(context, call)
        parts = [slice(s, s + size) for s in range(0, len(call.members), size)]
        return join_results([self._run(context, sub_call(call, p)) for p in parts])

    def _run(self, context, call):
        algorithm = self.algorithm
        weights = [tf.constant(a) for a in call.weights]
        current, losses, taus, substeps, flow_losses, redone = weights, [], [], [], [], 0
        evaluated, candidate_losses = [], []
        clipped = dropped = over_budget = 0
        bound_max = 0.0
        eta = tf.constant(context.eta, tf.float32)
        redo_rising = algorithm.flow == "euler_adaptive"  # the only flow without a guarantee
        codec = context.codec
        attack = context.attack if call.tampered is not None and call.tampered.any() else None
        explicit = self.forms_packages(context, call)
        if (attack is not None or context.screen is not None) and self.matrix_free:
            raise ValueError("Byzantine packages and the package screen need H formed; use "
                             "kernel='dense' or 'auto', not 'matrix_free'.")
        rng = np.random.default_rng([context.seed, int(call.members[0])])
        adversary_rng = np.random.default_rng([context.adversary_seed, int(call.members[0])])
        lossy = codec is not None and codec.changes_values
        sketch = protocol.codecs.make_sketch(codec, self.fns.num_params, context.seed) \
            if lossy else None
        slots = call.senders.shape[1]
        for part, positions in self._round_slices(context.round_index, context.slice_orders):
            keep = None
            if call.keep is not None:  # the samples each package carries, in this slice
                padded = np.concatenate([call.keep, np.zeros_like(call.keep[..., :1])], -1)
                rows = positions[part.rows(call.senders)]  # [B, S, per_slice]
                keep = np.take_along_axis(padded, rows, axis=-1)
            feats, labels, mask = gather_neighbourhood(part, call.senders, call.valid, keep)
            received = gram = None
            row_scale = np.ones(mask.shape, np.float32)
            logit_offset = np.zeros(labels.shape, np.float32)
            if explicit:
                packages = self.receive(call, weights, feats, labels, mask)
                if attack is not None:
                    packages = self.tamper(call, attack, packages, feats.shape[:2],
                                           adversary_rng, context.screen)
                    if attack.name == "logit_shift":  # what re-evaluating senders send
                        rows = np.repeat(call.tampered, mask.shape[1] // slots, 1)
                        logit_offset = (-attack.params["shift"] * rows[..., None] *
                                        labels.numpy()).astype(np.float32)
                if lossy:
                    packages = [(b, rows, encode_package(codec, p, rng, sketch))
                                for b, rows, p in packages]
                received = stack_packages(packages, feats.shape[:2], sketch)
                h = explicit_kernel(received)
            else:  # Jacobians at the averaged weights; a matrix-free kernel acts in the flow
                if self.dense_candidates and attack is None and context.screen is None:
                    h = None  # formed inside the compiled call (_evolve_slice), with the gram
                elif self.dense_candidates:  # the input gram serves the kernel and candidates
                    gram = kernels.dense.input_gram(feats)
                    h = self.kernel(weights, feats, mask, input_gram=gram)
                else:
                    h = tf.zeros([]) if self.matrix_free else self.kernel(weights, feats, mask)
                if attack is not None:  # what the tampered packages would have given
                    h, labels, row_scale, logit_offset = lazy_attack(
                        attack, call.tampered, h, labels, mask, context.screen)
            if context.screen is not None:
                sent = (received.logits if received is not None else
                        self.fns.forward(weights, feats) + logit_offset)
                decision, h, mask, labels = apply_screen(context.screen, h, sent, labels, mask,
                                                         slots, received, self.fns.num_classes)
                if received is None:
                    row_scale = row_scale * decision.row_scale
                else:
                    received = scale_rows(received, decision.row_scale)
                clipped += int(decision.clipped.sum())
                dropped += int(decision.dropped.sum())
            args = (weights, current, feats, labels, mask, h, eta, tf.constant(row_scale),
                    tf.constant(logit_offset))
            result = self._evolve(*args, tf.constant(False), received, gram)
            if redo_rising and not bool(result.monotone):  # the adaptive step was too long: redo
                result = self._evolve(*args, tf.constant(True), received, gram)
                redone += 1
            current = result.weights
            losses.append(result.loss.numpy())
            flow_losses.append(result.flow_loss.numpy())
            over = result.over_budget.numpy()
            taus.append(np.where(over, 0, np.asarray(algorithm.taus)[result.tau_index.numpy()]))
            substeps.append(float(result.substeps))
            evaluated.append(int(result.evaluated))
            candidate_losses.append(result.candidate_losses.numpy())
            over_budget += int(over.sum())
            bound_max = max(bound_max, float(tf.reduce_max(result.bound)))
        return EvolveResult([v.numpy() for v in current], np.mean(losses, 0), np.mean(taus, 0),
                            substeps, np.mean(flow_losses, 0), redone, clipped, dropped,
                            over_budget, bound_max, evaluated, candidate_losses)

    def tamper(self, call, attack, packages, layout, rng, screen):
        """``receive``'s packages with the tampered slots' arrays as their Byzantine senders
        replace them (``protocol.byzantine.tamper_package``)."""
        slots = call.senders.shape[1]
        n = layout[1] // slots
        factor = None
        if attack.name == "adaptive":  # sized against the receiver's honest kernel
            mask = np.zeros(layout, np.float32)
            for b, rows, _ in packages:
                mask[b, rows] = 1.0
            factor = adaptive_factor_for(attack, explicit_kernel(stack_packages(packages, layout)),
                                         tf.constant(mask), slots, screen)
        out = []
        for b, rows, package in packages:
            s = int(rows[0]) // n
            if call.tampered[b, s]:
                jac, logits, labels = protocol.byzantine.tamper_package(
                    attack, list(package.jacobians), package.logits, package.labels,
                    self.fns.num_classes, rng, None if factor is None else float(factor[b, s]))
                package = dataclasses.replace(package, jacobians=tuple(jac), logits=logits,
                                              labels=labels)
            out.append((b, rows, package))
        return out

    def receive(self, call, weights, feats, labels, mask):
        """One slice's Jacobian packages, materialised as their senders would form them.

        Each member's package from each sender (its own samples included, in slot 0) holds
        the Jacobians, logits and labels of the sender's real samples in this slice at the
        member's averaged weights, computed ``jacobian_chunk`` samples at a time.

        Returns:
            ``[(member_position, rows, JacobianPackage)]`` for every real slot: the package and
            the rows of the slice's neighbourhood layout its samples occupy.
        """
        slots = call.senders.shape[1]
        n = feats.shape[1] // slots
        real = mask.numpy() > 0
        ids = tf.argmax(labels, -1, output_type=tf.int32).numpy()
        logits = self.fns.forward(weights, feats).numpy()
        chunk = self.algorithm.jacobian_chunk
        packages = []
        for b in range(len(call.members)):  # each receiver's own linearisation point
            w = [v[b] for v in weights]
            rows = np.flatnonzero(real[b])  # every real sample of the neighbourhood, once
            if not len(rows):  # a slice may hold no sample of this neighbourhood
                continue
            parts = [self._jacobians(w, tf.gather(feats[b], rows[i:i + chunk]))
                     for i in range(0, len(rows), chunk)]
            jac = [np.concatenate([p[v].numpy() for p in parts]) for v in range(len(w))]
            for s in np.flatnonzero(call.valid[b]):  # cut into one package per sender
                take = (rows >= s * n) & (rows < (s + 1) * n)
                if not take.any():  # a subsampled package may hold none of this slice
                    continue
                specs = protocol.package_specs(int(take.sum()), self.fns.num_classes,
                                               self.fns.shapes)
                package = protocol.JacobianPackage(int(call.senders[b, s]), int(call.members[b]),
                                                   specs)
                packages.append((b, rows[take], package.materialise(
                    [j[take] for j in jac], logits[b, rows[take]], ids[b, rows[take]])))
        return packages

    def _evolve_slice(self, linearised, weights, feats, labels, mask, h, eta, row_scale,
                      logit_offset, bound_step, received, gram=None):
        """Flow, candidate updates and tau choice; Jacobians at ``linearised``, start ``weights``.

        ``row_scale`` ``[B, N]`` multiplies each row's Jacobian in the update (``h`` already
        carries it) and ``logit_offset`` is added to the logits the flow starts from: how lazy
        packages carry a Byzantine sender's tampering and the screen's clipping (ones and
        zeros otherwise). ``bound_step`` (bool tensor) makes ``flow="euler_adaptive"`` take
        the bound's Euler step (its redo). ``received``: explicit packages (then J, the
        starting logits and the labels come from them) or None. ``gram``: for a Dense stack
        with lazy packages, the input gram X X^T of ``feats`` (``kernels.dense.input_gram``):
        each candidate is then carried as its VJP's cotangent, its logits come from the gram
        (``kernels.dense.candidate_logits``) and only the chosen one's weights are formed;
        None: every candidate's weights from a VJP and a forward pass. ``h`` None (a Dense
        stack's lazy packages, nothing tampered or screened): H and the gram are formed here,
        in the same compiled call, which saves a call and lets XLA share H's forward pass with
        the linearised one. The flow's check is
        ``SliceResult.monotone``. With ``tau_search="early_stop"`` the flow and the candidates
        go together, candidate by candidate, until every client has stopped
        (``_early_stop_search``).
        """
        algorithm, fns, loss = self.algorithm, self.fns, self.loss
        n = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)  # a slice may hold no sample of a client
        if h is None:
            gram = kernels.dense.input_gram(feats)
            h = self.kernel.in_graph(linearised, feats, mask, input_gram=gram)
        if self.matrix_free:
            h = self.kernel.operator(linearised, feats, mask)
        bound = kernels.client_substeps(h, n, eta, mask=mask)
        over = tf.zeros(tf.shape(n), tf.bool)
        if algorithm.flow_budget is not None and not loss.closed_form:
            # a compute bound: a slice whose kernel is too stiff to integrate within the budget
            # (an inflated kernel is a cheap Byzantine lever) is not evolved; its flow is
            # emptied so that it does not set the batch's Euler step either
            over = bound > algorithm.flow_budget
            h = _without(h, over)
        taped = received is None and gram is None
        if gram is not None:  # lazy packages of a Dense stack: the VJP from the pass's factors
            lin = kernels.dense.linearised_pass(fns, linearised, feats)
            # without batching the slice starts where J is taken: the same pre-activation
            first_z = (lin.first_z if algorithm.jacobian_batches == 1 else
                       kernels.dense.first_pre_activation(fns, weights, feats))
            f_lin = lin.logits
        elif taped:  # lazy packages: evaluated here from the senders' samples
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(linearised)
                f_lin = fns.forward(linearised, feats)
        else:
            f_lin = received.logits
            labels = tf.one_hot(received.labels, fns.num_classes) * mask[..., None]
        # with batching the slice starts from the current weights; the senders re-evaluate
        # (explicit packages' logits carry any tampering already)
        if algorithm.jacobian_batches > 1:
            f0 = (fns.forward(weights, feats) if gram is None else
                  fns.dense_forward(weights, feats, first_pre_activation=first_z)[0]
                  ) + logit_offset
        else:
            f0 = f_lin + logit_offset if received is None else f_lin

        # A candidate is held as a handle (a list of [B, ...] tensors) from which ``weights_of``
        # forms its weights: the weights themselves, or with ``gram`` the VJP's cotangent.
        def candidate(r_sum):  # the candidate's handle and its real loss
            cotangent = r_sum * (eta / n)[:, None, None]
            if gram is not None:
                cotangent = cotangent * row_scale[..., None]
                signals = kernels.dense.vjp_signals(fns, linearised, lin, cotangent)
                logits = kernels.dense.candidate_logits(fns, weights, first_z, gram, lin,
                                                        signals)
                return [cotangent], loss.mean(logits, labels, mask)
            if taped:  # one VJP, one forward
                grads = tape.gradient(f_lin, linearised,
                                      output_gradients=cotangent * row_scale[..., None])
            else:
                rows = tf.einsum("brn,bnc->brc", received.placement, cotangent)
                flat = tf.einsum("brcp,brc->bp", received.jacobians, rows)
                if received.bucket.shape[0]:  # projected Jacobians: S^T back to parameters
                    flat = tf.gather(flat, received.bucket, axis=1) * received.sign
                grads = unflatten(flat, linearised)
            cand = [w - g for w, g in zip(weights, grads)]
            return cand, loss.mean(fns.forward(cand, feats), labels, mask)

        def weights_of(handle):
            if gram is None:
                return handle
            signals = kernels.dense.vjp_signals(fns, linearised, lin, handle[0])
            return kernels.dense.apply_signals(fns, weights, lin, signals)

        start = list(weights) if gram is None else [tf.zeros_like(f0)]

        if algorithm.tau_search == "early_stop":
            flow = self._flow(h, f0, labels, mask, n, eta, bound_step, segments=True)
            chosen, chosen_loss, best, flow_loss, cand_losses, evaluated, substeps, monotone = \
                _early_stop_search(flow, candidate, len(algorithm.taus), start, over,
                                   lambda f: loss.mean(f, labels, mask))
            new = weights_of(chosen)
        else:
            r_sums, f_taus, substeps, monotone = self._flow(h, f0, labels, mask, n, eta,
                                                            bound_step)
            candidates, cand_losses, flow_losses = [], [], []
            for t in range(len(algorithm.taus)):  # a handful of candidates
                cand, cand_loss = candidate(r_sums[t])
                candidates.append(cand)
                cand_losses.append(cand_loss)
                # what the linearisation predicted
                flow_losses.append(loss.mean(f_taus[t], labels, mask))
            cand_losses = tf.stack(cand_losses)  # [T, B]
            safe = tf.where(tf.math.is_finite(cand_losses), cand_losses, np.inf)
            best = tf.argmin(safe, axis=0, output_type=tf.int32)  # [B]
            new = weights_of([tf.gather(tf.stack([c[v] for c in candidates], axis=1), best,
                                        batch_dims=1) for v in range(len(start))])
            flow_loss = tf.gather(tf.transpose(tf.stack(flow_losses)), best, batch_dims=1)
            chosen_loss = tf.gather(tf.transpose(cand_losses), best, batch_dims=1)
            evaluated = tf.constant(len(algorithm.taus), tf.int32)
        if taped:
            del tape
        if algorithm.flow_budget is not None:  # over budget: the slice leaves the weights as is
            kept = tf.cond(tf.reduce_any(over),
                           lambda: loss.mean(fns.forward(weights, feats), labels, mask),
                           lambda: chosen_loss)
            new = [tf.where(tf.reshape(over, [-1] + [1] * (len(w.shape) - 1)), w, c)
                   for w, c in zip(weights, new)]
            chosen_loss, flow_loss = tf.where(over, kept, chosen_loss), tf.where(over, kept,
                                                                                 flow_loss)
        return SliceResult(new, chosen_loss, best, substeps, flow_loss, monotone, bound, over,
                           evaluated, cand_losses)

    def _flow(self, h, f0, labels, mask, n, eta, bound_step, segments=False):
        """The flow to the largest tau: ``(R [T, B, N, C], f_taus, substeps, check)``, or with
        ``segments`` the same flow as ``kernels.FlowSegments`` (for the early stop)."""
        algorithm, loss = self.algorithm, self.loss
        taus = tf.constant(algorithm.taus, tf.int32)
        if loss.closed_form:
            r_sums, f_taus = kernels.mse_closed_form(h, f0, labels, mask, n, eta, taus)
            if not segments:
                return r_sums, f_taus, tf.constant(0.0), tf.constant(True)
            # exact at any tau: computed at once, read candidate by candidate
            return kernels.FlowSegments(
                tf.constant(0), lambda state, t: state,
                lambda state, t: (tf.gather(r_sums, t), tf.gather(f_taus, t)),
                lambda state, t: tf.constant(0.0), lambda state, t: tf.constant(True))
        if algorithm.flow in ADAPTIVE_FLOWS:
            spec = ADAPTIVE_FLOWS[algorithm.flow]
            run = spec.segments if segments else spec.whole
            return run(h, f0, labels, mask, n, eta, taus, loss, rtol=spec.rtol, atol=spec.atol)
        if algorithm.flow == "euler_bound":
            steps = kernels.euler_substeps(h, n, eta, mask=mask)
            if segments:
                return kernels.euler_segments(h, f0, labels, mask, n, eta, taus, steps, loss)
            r_sums, f_taus = kernels.euler_flow(h, f0, labels, mask, n, eta, taus, steps, loss)
            return r_sums, f_taus, tf.cast(steps, tf.float32), tf.constant(True)
        run = kernels.adaptive_euler_segments if segments else kernels.adaptive_euler_flow
        return run(h, f0, labels, mask, n, eta, algorithm.taus, loss, bound_step=bound_step)


def _early_stop_search(flow, candidate, count, start, stopped, flow_loss_of):
    """``tau_search="early_stop"``: candidate after candidate, until every client has stopped.

    Each iteration integrates ``flow`` on to the next candidate and evaluates it
    (``candidate``). A client stops once its loss has risen at two consecutive candidates;
    until then it keeps the first lowest finite loss (``tf.argmin``'s choice in the full
    search), afterwards it ignores the batch's further candidates.

    Args:
        flow: ``kernels.FlowSegments``.
        candidate: ``R [B, N, C] -> (handle, real loss [B])``, the handle a list of
            ``[B, ...]`` tensors from which the caller forms the candidate's weights.
        count: number of candidates T.
        start: the handle of the slice's starting weights (the result of a client that never
            evaluates).
        stopped: [B] bool, clients that need no candidate (over ``flow_budget``).
        flow_loss_of: ``f [B, N, C] -> [B]`` the loss the flow predicts.

    Returns:
        ``(handle, loss, tau_index, flow_loss, candidate_losses [T, B] (NaN where not
        evaluated), evaluated (int32: the call's candidates), substeps, check)``.
    """
    batch = tf.shape(stopped)[0]
    inf = tf.fill([batch], np.inf)

    def per_client(x, like):  # [B] -> broadcastable against a [B, ...] variable
        return tf.reshape(x, [-1] + [1] * (len(like.shape) - 1))

    def search(t, state, best, best_safe, best_loss, best_flow, best_index, losses, previous,
               rises, stopped):
        state = flow.advance(state, t)
        r_sum, f_tau = flow.read(state, t)
        cand, cand_loss = candidate(r_sum)
        safe = tf.where(tf.math.is_finite(cand_loss), cand_loss, np.inf)
        take = ~stopped & ((t == 0) | (safe < best_safe))  # strict: the first of equal losses
        best = [tf.where(per_client(take, b), c, b) for b, c in zip(best, cand)]
        best_safe = tf.where(take, safe, best_safe)
        best_loss = tf.where(take, cand_loss, best_loss)
        best_flow = tf.where(take, flow_loss_of(f_tau), best_flow)
        best_index = tf.where(take, t, best_index)
        losses = tf.where((tf.range(count) == t)[:, None] & ~stopped[None], cand_loss[None],
                          losses)
        rises = tf.where(safe > previous, rises + 1, 0)
        stopped = stopped | (rises >= 2)
        return (t + 1, state, best, best_safe, best_loss, best_flow, best_index, losses, safe,
                rises, stopped)

    initial = (tf.constant(0), flow.start, list(start), inf, inf, inf,
             tf.zeros([batch], tf.int32), tf.fill([count, batch], np.nan), inf,
             tf.zeros([batch], tf.int32), stopped)
    out = tf.while_loop(lambda t, *rest: (t < count) & ~tf.reduce_all(rest[-1]), search,
                        initial)
    t, state, best, _, best_loss, best_flow, best_index, losses = out[:8]
    last = tf.maximum(t - 1, 0)
    # read at static candidate indices: the same rounding as the full search's last candidate
    steps = tf.gather(tf.stack([flow.steps(state, i) for i in range(count)]), last)
    return best, best_loss, best_index, best_flow, losses, t, steps, flow.check(state, last)


def sub_call(call, part):
    """The ``EvolveCall`` of the members ``part`` (a slice) of ``call``."""
    def take(a):
        return None if a is None else a[part]

    return call._replace(members=call.members[part], weights=[w[part] for w in call.weights],
                         senders=call.senders[part], valid=call.valid[part],
                         keep=take(call.keep), tampered=take(call.tampered))


def join_results(results):
    """The ``EvolveResult`` of consecutive member sub-groups as one call's: per-member fields
    concatenated, per-slice means weighted by the sub-groups' sizes, counts summed."""
    sizes = np.array([len(r.loss) for r in results], np.float64)

    def per_slice_mean(field):
        return list(np.average(np.array([getattr(r, field) for r in results], np.float64),
                               axis=0, weights=sizes))

    def joined(field):
        return np.concatenate([getattr(r, field) for r in results])

    def total(field):
        return sum(getattr(r, field) for r in results)

    return EvolveResult(
        weights=[np.concatenate([r.weights[v] for r in results])
                 for v in range(len(results[0].weights))],
        loss=joined("loss"), tau=joined("tau"), substeps=per_slice_mean("substeps"),
        flow_loss=joined("flow_loss"), redone=total("redone"), clipped=total("clipped"),
        dropped=total("dropped"), over_budget=total("over_budget"),
        bound_max=max(r.bound_max for r in results),
        candidates_evaluated=per_slice_mean("candidates_evaluated"),
        candidate_losses=[np.concatenate(losses, axis=1)
                          for losses in zip(*(r.candidate_losses for r in results))])


def _without(h, drop):
    """The kernel ``h`` (tensor or operator) with the clients ``drop`` [B] bool emptied."""
    if callable(h):
        return lambda v: tf.where(drop[:, None, None], tf.zeros_like(v), h(v))
    return tf.where(drop[:, None, None], tf.zeros_like(h), h)


class ReceivedPackages(tf.experimental.ExtensionType):
    """One slice's delivered packages stacked per receiver.

    The Jacobians hold only the R delivered samples (a subsampled slice is mostly padding);
    ``placement`` puts row r at its position in the slice's N-row layout.
    """

    jacobians: tf.Tensor  # [B, R, C, P] (k after ``project``), zero at padding
    placement: tf.Tensor  # [B, R, N] float32, one-hot rows (zero at padding)
    logits: tf.Tensor  # [B, N, C]
    labels: tf.Tensor  # [B, N] int32 class ids
    bucket: tf.Tensor  # int32 [P] of the ``project`` sketch, or [0] without one
    sign: tf.Tensor  # float32 [P], or [0]


def encode_package(codec, package, rng, sketch=None):
    """The package as its receiver decodes it (``codecs.encode_package_values``); the
    receiver's own package is only projected (it is not sent). After ``project`` the package
    holds one ``[n, C, k]`` array instead of its specs' Jacobians."""
    decoded = protocol.codecs.encode_package_values(
        codec, package.jacobians, package.logits, rng, sketch,
        sent=package.sender != package.receiver)
    return dataclasses.replace(package, jacobians=tuple(decoded.jacobians),
                               logits=decoded.logits)


def stack_packages(packages, layout, sketch=None):
    """``receive``'s packages -> ``ReceivedPackages`` for the layout (B, N) (rows without a
    delivered sample stay zero), with the round's ``project`` sketch if any."""
    first = packages[0][2]
    c, p = first.logits.shape[1], sum(int(np.prod(j.shape[2:])) for j in first.jacobians)
    filled = np.zeros(layout[0], int)
    for b, rows, _ in packages:
        filled[b] += len(rows)
    rows_held = -(-max(filled.max(), 1) // 8) * 8  # few distinct shapes: few retraces
    jac = np.zeros((layout[0], rows_held, c, p), np.float32)
    placement = np.zeros((layout[0], jac.shape[1], layout[1]), np.float32)
    logits = np.zeros(tuple(layout) + (c,), np.float32)
    labels = np.zeros(tuple(layout), np.int32)
    filled[:] = 0
    for b, rows, package in packages:
        at = np.arange(filled[b], filled[b] + len(rows))
        filled[b] += len(rows)
        jac[b, at] = np.concatenate([j.reshape(len(rows), c, -1) for j in package.jacobians], -1)
        placement[b, at, rows] = 1.0
        logits[b, rows], labels[b, rows] = package.logits, package.labels
    bucket, sign = ((np.zeros(0, np.int32), np.zeros(0, np.float32)) if sketch is None else
                    (sketch.bucket, sketch.sign))
    return ReceivedPackages(tf.constant(jac), tf.constant(placement), tf.constant(logits),
                            tf.constant(labels), tf.constant(bucket), tf.constant(sign))


def lazy_attack(attack, tampered, h, labels, mask, screen):
    """A package attack on lazy packages: the kernel, labels, Jacobian row scale and logit
    offset the tampered packages would have given (``protocol.byzantine.lazy_tampering``)."""
    slots = tampered.shape[1]
    n = mask.shape[1] // slots
    rows = np.repeat(tampered, n, 1) & (mask.numpy() > 0)
    factor = None
    if attack.name == "adaptive":  # sized against the receiver's honest kernel
        factor = np.repeat(adaptive_factor_for(attack, h, mask, slots, screen), n, 1)
    t = protocol.byzantine.lazy_tampering(attack, rows, labels.numpy(), factor)
    h = h * (t.row_scale[:, :, None] * t.row_scale[:, None, :])
    return h, tf.constant(t.labels), t.row_scale, t.logit_offset


def apply_screen(screen, h, sent_logits, labels, mask, slots, received, num_classes):
    """The package screen's decision and the kernel, mask and labels after it (dropped rows
    zeroed, clipped rows scaled in H; the caller scales them in the update)."""
    sent_labels = labels if received is None else \
        tf.one_hot(received.labels, num_classes) * mask[..., None]
    decision = package_screen.screen(np.asarray(h), np.asarray(sent_logits),
                                     np.asarray(sent_labels), np.asarray(mask), slots, screen)
    both = decision.row_scale * decision.row_keep
    h = h * (both[:, :, None] * both[:, None, :])
    return (decision, h, mask * decision.row_keep, labels * decision.row_keep[..., None])


def scale_rows(received, row_scale):
    """``ReceivedPackages`` with each row's Jacobian multiplied by ``row_scale`` ``[B, N]``."""
    per_row = tf.einsum("brn,bn->br", received.placement, tf.constant(row_scale, tf.float32))
    return ReceivedPackages(received.jacobians * per_row[:, :, None, None], received.placement,
                            received.logits, received.labels, received.bucket, received.sign)


def adaptive_factor_for(attack, h, mask, slots, screen):
    """The ``adaptive`` attack's Jacobian scale per slot ``[B, S]`` against ``screen``."""
    clip = None if screen is None else dict(package_screen.SCREEN_PARAMS, **screen)["clip_ratio"]
    return package_screen.adaptive_factor(np.asarray(h), np.asarray(mask), slots, clip,
                                          attack.params["margin"], attack.params["max_factor"])


def explicit_kernel(received):
    """Each receiver's H ``[B, N, N]`` from its ``ReceivedPackages``, zero at padding."""
    h = kernels.explicit.traced_kernel(received.jacobians, received.jacobians)  # [B, R, R]
    return tf.einsum("brn,brs,bsm->bnm", received.placement, h, received.placement)


def unflatten(flat, like):
    """``[B, P]`` -> tensors shaped like ``like`` (a list of ``[B, *shape]``)."""
    sizes = [int(np.prod(v.shape[1:])) for v in like]
    return [tf.reshape(part, tf.shape(v)) for part, v in zip(tf.split(flat, sizes, axis=1), like)]


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


def gather_neighbourhood(clients, index, valid, keep=None):
    """Stacks each client's closed-neighbourhood data: ``[B, S * n_max, ...]`` and masks.

    ``keep`` (``[B, S, n_max]``, optional) masks out samples a package did not carry.
    """
    index = tf.convert_to_tensor(clients.rows(index))
    batch, slots = index.shape
    n_max = clients.features.shape[1]

    def stack(t):
        g = tf.gather(t, index)  # [B, S, n_max, ...]
        return tf.reshape(g, [batch, slots * n_max] + list(t.shape[2:]))

    # in NumPy: eager tf.repeat is a dozen small ops, a visible share of a short slice
    slot_mask = np.repeat(np.asarray(valid, np.float32), n_max, axis=1)
    if keep is not None:
        slot_mask = slot_mask * np.reshape(keep, [batch, slots * n_max])
    mask = stack(clients.mask) * slot_mask
    return stack(clients.features), stack(clients.labels) * mask[..., None], mask
