"""NTK-DFL round semantics: averaging, ablation, isolated clients, seeds."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf.algorithms import base


def _fit(clients, test, seed=0, topology=None, **kwargs):
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(20, 50), **kwargs),
                                      topology or nd.topology.RandomGraph(2), seed=seed)
    history = trainer.fit(clients, rounds=2, validation_data=test, verbose=0)
    return trainer, history


def test_same_seed_same_run_different_seed_different_run(tiny):
    clients, test = tiny
    a, ha = _fit(clients, test, seed=1)
    b, hb = _fit(clients, test, seed=1)
    c, _ = _fit(clients, test, seed=2)
    for key in ha.history:
        if key != "round_seconds":
            assert ha.history[key] == hb.history[key], key
    for x, y in zip(a.client_weights, b.client_weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.allclose(a.client_weights[0].numpy(), c.client_weights[0].numpy())


def test_ablation_trains_and_differs(tiny):
    clients, test = tiny
    runs = {name: _fit(clients, test, **kw)[0] for name, kw in {
        "sync": {}, "no_averaging": {"per_round_averaging": False}}.items()}
    w = {k: t.client_weights[0].numpy() for k, t in runs.items()}
    assert not np.allclose(w["sync"], w["no_averaging"])
    for t in runs.values():
        assert np.isfinite(t.last_client_accuracy).all()


def test_client_batch_does_not_change_results(tiny):
    clients, test = tiny
    a, _ = _fit(clients, test, client_batch=1)
    b, _ = _fit(clients, test, client_batch=3)
    for x, y in zip(a.client_weights, b.client_weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5)


def test_jit_compile_matches_eager(tiny):
    """XLA-compiled evolution gives the eager result (same client batches, so same Euler step)."""
    clients, test = tiny
    a, _ = _fit(clients, test, jacobian_batches=2, client_batch=4)
    b, _ = _fit(clients, test, jacobian_batches=2, client_batch=4, jit_compile=True)
    for x, y in zip(a.client_weights, b.client_weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=2e-5)


class _TraceCounts(keras.callbacks.Callback):
    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.counts = trainer, []

    def on_epoch_end(self, epoch, logs=None):
        self.counts.append(self.trainer.tracing_counts())


@pytest.mark.parametrize("algorithm", [
    nd.algorithms.NTKDFL(taus=(20, 50)),
    nd.algorithms.NTKDFL(taus=(20, 50), jacobian_batches=3, client_batch=3, jit_compile=True),
    nd.algorithms.NTKDFL(taus=(20, 50, 80, 110), jacobian_batches=3, client_batch=3,
                         jit_compile=True, tau_search="early_stop"),
    nd.algorithms.get("dfedavg", local_epochs=1)],
    ids=["ntk_dfl", "ntk_dfl_m3_jit", "ntk_dfl_early_stop_m3_jit", "dfedavg"])
def test_no_retracing_after_the_first_round(tiny, algorithm):
    """New graphs each round (different neighbourhoods, eta) reuse the first round's traces."""
    clients, test = tiny
    trainer = nd.DecentralizedTrainer(nd.models.mlp, algorithm, nd.topology.RandomGraph(3))
    counter = _TraceCounts(trainer)
    trainer.fit(clients, rounds=3, validation_data=test, callbacks=[counter], verbose=0)
    first, last = counter.counts[0], counter.counts[-1]
    assert sum(first.values()) >= 2  # the algorithm's and the evaluation's functions are seen
    assert last == first


def test_matrix_free_kernel_trains_like_the_dense_one(tiny):
    """The flow through v -> H v (never forming H) reproduces the stored-kernel run."""
    clients, test = tiny
    a, _ = _fit(clients, test, kernel="dense")
    b, _ = _fit(clients, test, kernel="matrix_free")
    for x, y in zip(a.client_weights, b.client_weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=2e-5)


def test_isolated_clients_average_with_themselves(tiny):
    """With no edges each client evolves alone: the same as a one-client run on its data."""
    clients, test = tiny
    trainer, history = _fit(clients, test, topology=nd.topology.ErdosRenyi(0.0))
    assert history.history["bytes_sent"] == [0.0, 0.0]
    n = int(clients.counts[2])
    alone = nd.data.ClientData.from_arrays([(clients.x[2, :n], clients.y[2, :n])])
    single, _ = _fit(alone, test, topology=nd.topology.ErdosRenyi(0.0))
    for many, one in zip(trainer.client_weights, single.client_weights):
        np.testing.assert_allclose(many.numpy()[2], one.numpy()[0], rtol=1e-5, atol=1e-6)


def test_a_clients_round_depends_only_on_its_neighbourhood(tiny):
    """Round 1 of client i in the whole network equals client 0 of a fully connected run on
    exactly i's closed neighbourhood: nothing in the update depends on the number of clients."""
    from ntkdfl_tf.trainer import stream_rng

    clients, test = tiny
    whole = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(20, 50)),
                                    nd.topology.RandomGraph(3), seed=4)
    whole.fit(clients, rounds=1, validation_data=test, verbose=0)
    graph = whole.topology.draw(len(clients.counts), stream_rng(4, "topology", 0))
    s = clients.x.shape[1]
    flat_x = clients.x.reshape((-1,) + clients.x.shape[2:])
    for i in (0, 5):
        members = [i] + list(np.flatnonzero(graph[i]))
        assert len(members) == 4
        sub = nd.data.ClientData.from_indices(
            flat_x, clients.y.reshape(-1),
            [np.arange(k * s, k * s + clients.counts[k]) for k in members])
        alone = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(taus=(20, 50)),
                                        nd.topology.FullyConnected(), seed=4)
        alone.fit(sub, rounds=1, validation_data=test, verbose=0)
        for many, few, start in zip(whole.client_weights, alone.client_weights,
                                    whole.initial_weights):
            update = few.numpy()[0] - np.asarray(start)
            np.testing.assert_allclose(many.numpy()[i] - np.asarray(start), update,
                                       atol=1e-5 * np.abs(update).max())


def test_fully_connected_clients_stay_identical(tiny):
    """Everyone averages to the same weights and evolves on all data: identical clients."""
    clients, test = tiny
    trainer, _ = _fit(clients, test, topology=nd.topology.FullyConnected())
    for w in trainer.client_weights:
        w = w.numpy()
        np.testing.assert_allclose(w, np.broadcast_to(w[:1], w.shape), rtol=1e-4, atol=1e-5)


def test_divergence_is_reported_with_round_and_client(tiny):
    clients, test = tiny
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(learning_rate=1e30,
                                                                          taus=(5,)),
                                      nd.topology.RandomGraph(2), seed=0)
    with pytest.raises(nd.DivergenceError, match=r"round 1.*client"):
        trainer.fit(clients, rounds=1, verbose=0)


def test_flow_budget_leaves_the_clients_it_cannot_afford_unevolved(tiny):
    """Isolated clients at the initial weights: a client whose kernel asks more Euler sub-steps
    per grid step than ``flow_budget`` (counted from an explicit eigendecomposition of J J^T)
    keeps its weights; every other client evolves exactly as without a budget."""
    clients, test = tiny
    eta = 0.1  # asks 12-22 sub-steps per grid step here

    def run(budget):
        trainer = nd.DecentralizedTrainer(
            nd.models.mlp,
            nd.algorithms.NTKDFL(learning_rate=eta, taus=(20, 50), flow_budget=budget),
            nd.topology.ErdosRenyi(0.0), seed=0)
        history = trainer.fit(clients, rounds=1, validation_data=test, verbose=0)
        return trainer, history.history

    free, h_free = run(None)
    fns, start = free.fns, [tf.constant(w) for w in free.initial_weights]
    asks = []
    for k in range(len(clients.counts)):
        x = fns.features(clients.x[k, :int(clients.counts[k])])
        jac = np.concatenate([j.numpy().reshape(len(x), fns.num_classes, -1).astype(np.float64)
                              for j in nd.kernels.jacobian(fns, start, x)], -1)
        h = np.einsum("icp,jcp->ij", jac, jac) / fns.num_classes  # the output-traced kernel
        asks.append(np.ceil(1.1 * np.linalg.eigvalsh(h)[-1] / len(x) * eta / 2))
    asks = np.array(asks)
    budget = int(np.median(asks))
    within, over = asks <= budget, asks >= budget + 2  # power iteration may round the rest down
    assert within.any() and over.any()
    bounded, h_bounded = run(budget)
    assert over.sum() <= h_bounded["flow_over_budget"][0] <= len(asks) - within.sum()
    assert h_free["flow_over_budget"] == [0.0]
    assert h_bounded["flow_bound_max"][0] == pytest.approx(asks.max(), abs=1)
    for b, f, w0 in zip(bounded.client_weights, free.client_weights, free.initial_weights):
        w0 = np.asarray(w0)
        np.testing.assert_array_equal(b.numpy()[over], np.broadcast_to(w0, b.numpy()[over].shape))
        np.testing.assert_allclose(b.numpy()[within], f.numpy()[within], rtol=1e-5, atol=1e-6)
        assert not np.allclose(f.numpy()[over], w0)
    with pytest.warns(RuntimeWarning, match=r"round 1: every client.*flow_budget=1 "):
        stuck, _ = run(1)
    for w, w0 in zip(stuck.client_weights, free.initial_weights):
        np.testing.assert_array_equal(w.numpy(), np.broadcast_to(w0, w.numpy().shape))


def test_cnn_trains_through_the_explicit_kernel(tiny):
    """A non-Dense model goes through GradientTape Jacobians end to end, with evaluation."""
    clients, test = tiny
    two = nd.data.ClientData.from_arrays([(clients.x[k, :6], clients.y[k, :6]) for k in range(3)])
    trainer = nd.DecentralizedTrainer(nd.models.cnn,
                                      nd.algorithms.NTKDFL(taus=(5, 10), jacobian_chunk=4),
                                      nd.topology.Ring(), seed=0)
    history = trainer.fit(two, rounds=1, validation_data=(test[0][:50], test[1][:50]), verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert len(trainer.last_client_accuracy) == 3


def test_neighbour_average_is_mixing_product():
    adj = nd.topology.Ring().draw(5)
    mixing = nd.topology.mixing_matrix(adj)
    w = [tf.random.normal([5, 3, 2], seed=0)]
    out = base.neighbour_average(mixing, w)[0].numpy()
    ref = np.stack([(w[0].numpy()[[(i - 1) % 5, i, (i + 1) % 5]]).mean(0) for i in range(5)])
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_slices_partition_every_clients_samples(tiny):
    """Jacobian batching: each real sample lands in exactly one slice, slices are balanced."""
    from ntkdfl_tf.algorithms.ntkdfl import slice_orders
    from ntkdfl_tf.algorithms.ntkdfl_worker import slices_from_orders
    clients, _ = tiny
    trainer = nd.DecentralizedTrainer(nd.models.mlp, nd.algorithms.NTKDFL(), nd.topology.Ring())
    tensors = trainer._client_tensors(clients)
    orders = slice_orders(tensors.counts, int(tensors.mask.shape[1]), 4, np.random.default_rng(0))
    parts = slices_from_orders(tensors, orders)
    counts = np.stack([p.counts for p in parts])  # [m, K]
    np.testing.assert_array_equal(counts.sum(0), clients.counts)
    assert (counts.max(0) - counts.min(0)).max() <= 1
    for k in range(clients.num_clients):  # same multiset of feature rows
        rows = np.concatenate([p.features.numpy()[k][p.mask.numpy()[k] > 0] for p in parts])
        own = tensors.features.numpy()[k][: clients.counts[k]]
        np.testing.assert_array_equal(np.sort(rows.sum(1)), np.sort(own.sum(1)))


def test_jacobian_batching_trains_and_differs(tiny):
    clients, test = tiny
    plain, h1 = _fit(clients, test)
    batched, h3 = _fit(clients, test, jacobian_batches=3)
    assert not np.allclose(plain.client_weights[0].numpy(), batched.client_weights[0].numpy())
    assert np.isfinite(h3.history["loss"]).all()
    assert h3.history["val_accuracy"][-1] > 0.3


def test_linearisation_logs_flow_and_model_loss_and_weight_spread(tiny):
    """flow_loss (the kernel flow's prediction) tracks model_loss (the real network) for a small
    step and parts from it for a large one; client_weight_spread matches a direct computation."""
    clients, test = tiny
    gaps = {}
    for eta in (1e-4, 0.05):
        trainer, history = _fit(clients, test, learning_rate=eta)
        h = history.history
        for key in ("flow_loss", "model_loss", "client_weight_spread"):
            assert np.isfinite(h[key]).all() and len(h[key]) == 2, key
        gaps[eta] = abs(h["flow_loss"][-1] - h["model_loss"][-1]) / h["model_loss"][-1]
        w = [v.numpy() for v in trainer.client_weights]
        spread = sum(((v - v.mean(0)) ** 2).sum() for v in w) / len(w[0])
        np.testing.assert_allclose(h["client_weight_spread"][-1], spread, rtol=1e-4)
    # measured: 1.3% at eta = 1e-4 (the top modes still move: lambda_max(H/N) ~ 500) and 76% at
    # 0.05, where tau * eta reaches 2.5 and the linearisation no longer holds
    assert gaps[1e-4] < 0.05
    assert gaps[0.05] > 10 * gaps[1e-4]


def test_adaptive_substeps_train_like_the_bound_with_fewer_steps(tiny):
    clients, test = tiny
    adaptive, ha = _fit(clients, test, jacobian_batches=2, flow="euler_adaptive")
    bound, hb = _fit(clients, test, jacobian_batches=2, flow="euler_bound")
    a, b = ha.history, hb.history
    assert sum(a["euler_substeps"]) < sum(b["euler_substeps"])
    assert a["flow_fallbacks"] == [0.0, 0.0]
    # two first-order Euler approximations of one flow (measured on this data: 1 against 2
    # sub-steps, the same taus, losses within 3%, weights apart by 10% of the two rounds' move)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=0.05)
    assert a["tau"] == b["tau"]
    for wa, wb, w0 in zip(adaptive.client_weights, bound.client_weights,
                          adaptive.fns.initial_weights()):
        step = np.linalg.norm(wb.numpy() - w0[None])
        assert np.linalg.norm(wa.numpy() - wb.numpy()) < 0.2 * step
    assert abs(a["val_accuracy"][-1] - b["val_accuracy"][-1]) < 0.03


@pytest.mark.parametrize("flow, bound", [("dopri5", 1e-3), ("rkc", 2e-2)])
def test_accurate_flows_train_like_the_exact_flow(tiny, flow, bound):
    """flow="dopri5" (rtol 1e-4) or "rkc" (rtol 1e-3) against "exact" (rtol 1e-6), two rounds
    in a client batch: the same taus, and weights apart by a small share of the rounds' move
    (dopri5: 0.1%; rkc: the fidelity budget, 1% of an update, for each of the two rounds;
    measured 1.2%); no fallbacks (Euler only)."""
    clients, test = tiny
    default, hd = _fit(clients, test, jacobian_batches=2, client_batch=4, flow=flow)
    exact, he = _fit(clients, test, jacobian_batches=2, client_batch=4, flow="exact")
    assert hd.history["tau"] == he.history["tau"]
    assert hd.history["flow_fallbacks"] == [0.0, 0.0]
    if flow == "dopri5":  # (rkc's steps count products with H, not steps)
        assert 0 < hd.history["euler_substeps"][0] <= he.history["euler_substeps"][0]
    for wd, we, w0 in zip(default.client_weights, exact.client_weights,
                          default.fns.initial_weights()):
        step = np.linalg.norm(we.numpy() - w0[None])
        assert np.linalg.norm(wd.numpy() - we.numpy()) < bound * step


def test_adaptive_step_falls_back_to_the_bound_when_the_flow_loss_rises(tiny, monkeypatch):
    """A flow that reports a rising loss is redone with the bound step: with every adaptive
    flow made to report one, each slice is redone and the run equals flow='euler_bound'."""
    clients, test = tiny
    real = nd.kernels.adaptive_euler_flow

    def always_rising(*args, bound_step=False, **kwargs):
        r, f, steps, _ = real(*args, bound_step=bound_step, **kwargs)
        return r, f, steps, tf.convert_to_tensor(bound_step)  # monotone only on the bound

    monkeypatch.setattr(nd.kernels, "adaptive_euler_flow", always_rising)
    redone, hr = _fit(clients, test, jacobian_batches=2, flow="euler_adaptive")
    monkeypatch.undo()
    bound, hb = _fit(clients, test, jacobian_batches=2, flow="euler_bound")
    assert hr.history["flow_fallbacks"] == [16.0, 16.0]  # 8 clients one by one, 2 slices each
    assert hr.history["euler_substeps"] == hb.history["euler_substeps"]
    for wr, wb in zip(redone.client_weights, bound.client_weights):
        np.testing.assert_allclose(wr.numpy(), wb.numpy(), rtol=1e-4, atol=1e-5)


def test_a_subset_of_clients_gathers_the_same_neighbourhoods_as_all_of_them():
    """What a Ray actor holding some clients' data computes from equals the full gather."""
    from ntkdfl_tf.algorithms import ntkdfl, ntkdfl_worker

    rng = np.random.default_rng(0)
    k, n_max, d, c = 6, 5, 3, 4
    counts = np.array([5, 3, 4, 5, 2, 1])
    mask = (np.arange(n_max)[None] < counts[:, None]).astype(np.float32)
    labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, (k, n_max))] * mask[..., None]
    full = base.ClientTensors(tf.constant(rng.normal(size=(k, n_max, d)), tf.float32),
                              tf.constant(labels), tf.constant(mask), counts)
    ids = np.array([4, 1, 3])  # any order: an actor holds its block, then its neighbours
    held = base.ClientTensors(*(tf.gather(t, ids) for t in (full.features, full.labels,
                                                            full.mask)), counts[ids], ids)
    orders = ntkdfl.slice_orders(counts, n_max, 2, rng)  # a deal of all six clients
    index = np.array([[3, 1, 4], [4, 4, 3]])  # neighbourhoods within the held clients
    valid = np.array([[1, 1, 1], [1, 0, 1]], np.float32)
    for whole, part in zip(ntkdfl_worker.slices_from_orders(full, orders),
                           ntkdfl_worker.slices_from_orders(held, orders)):
        for a, b in zip(ntkdfl_worker.gather_neighbourhood(whole, index, valid),
                        ntkdfl_worker.gather_neighbourhood(part, index, valid)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(KeyError, match=r"\[2\]"):
        held.rows([1, 2])


@pytest.mark.parametrize("kwargs", [
    {}, dict(jacobian_batches=2, client_batch=4, jit_compile=True),
    dict(flow="euler_adaptive", jacobian_batches=2), dict(flow="euler_bound"), dict(loss="mse"),
    dict(packages="explicit"), dict(learning_rate=0.1, flow_budget=16, client_batch=4),
    dict(flow="rkc", client_batch=4, jit_compile=True)],
    ids=["dopri5", "dopri5_m2_batch4_jit", "euler_adaptive", "euler_bound", "mse", "explicit",
         "flow_budget", "rkc_batch4_jit"])
def test_early_stop_equals_the_full_search_when_it_cannot_stop(tiny, kwargs):
    """Two candidates can never rise twice in a row: tau_search="early_stop" integrates and
    evaluates them one after the other and gives the full search's run bit for bit (explicit
    packages: the same taus, the rest to float32 rounding, as the loop body is optimised
    apart from the graph around it; measured 6e-8 in the weights after two rounds)."""
    clients, test = tiny
    full, hf = _fit(clients, test, **kwargs)
    early, he = _fit(clients, test, tau_search="early_stop", **kwargs)
    if "flow_budget" in kwargs:  # some clients are left unevolved, some evolve
        assert 0 < hf.history["flow_over_budget"][0] < clients.num_clients
    else:
        assert he.history["candidates_evaluated"] == [2.0, 2.0]
    exact = kwargs.get("packages") != "explicit"
    for key in hf.history:
        if key == "tau" or exact and key != "round_seconds":
            assert he.history[key] == hf.history[key], key
        elif key != "round_seconds":
            np.testing.assert_allclose(he.history[key], hf.history[key], rtol=1e-6, err_msg=key)
    for a, b in zip(full.client_weights, early.client_weights):
        if exact:
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        else:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)


def _first_stop(losses):
    """The early stop rule on one client's candidate losses ``[T]``: (candidates evaluated,
    index of the first lowest loss among them)."""
    evaluated, rises = len(losses), 0
    for t in range(1, len(losses)):
        rises = rises + 1 if losses[t] > losses[t - 1] else 0
        if rises == 2:
            evaluated = t + 1
            break
    return evaluated, int(np.argmin(losses[:evaluated]))


@pytest.mark.parametrize("client_batch", [1, 4])
def test_early_stop_picks_the_full_grids_tau_on_unimodal_losses(tiny, monkeypatch, client_batch):
    """Real neighbourhoods at the initial weights, the default tau grid, eta where the
    candidates' real loss has its minimum inside the grid for some clients. The full search's
    per-candidate losses are unimodal for most clients (checked): there early stop picks the
    same tau and the same weights, bit for bit, after fewer candidates where the minimum is
    inside the grid. Every client (unimodal or not) evaluates exactly as far as the rule says
    on the full losses and picks their argmin there; a batch of 4 runs until its last member
    has stopped."""
    from ntkdfl_tf.algorithms.ntkdfl import NTKDFL

    clients, test = tiny
    k, calls = clients.num_clients, []
    combine = NTKDFL.combine

    def recording(self, round_input, groups, results, eta, screened=False):
        calls.append((groups, results))
        return combine(self, round_input, groups, results, eta, screened)

    monkeypatch.setattr(NTKDFL, "combine", recording)
    unimodal_stops, unimodal = 0, 0
    for eta in (0.03, 0.1):
        runs = {}
        for search in ("full", "early_stop"):
            calls.clear()
            trainer = nd.DecentralizedTrainer(
                nd.models.mlp, NTKDFL(learning_rate=eta, tau_search=search,
                                      client_batch=client_batch, jit_compile=client_batch > 1),
                nd.topology.RandomGraph(2), seed=0)
            history = trainer.fit(clients, rounds=1, verbose=0)
            (groups, results), = calls
            losses = base.scatter_groups(groups, [r.candidate_losses[0].T for r in results], k)
            tau = base.scatter_groups(groups, [r.tau for r in results], k)
            runs[search] = (trainer, history.history, groups, results, losses, tau)
        full, early = runs["full"], runs["early_stop"]
        taus = np.asarray(full[0].algorithm.taus)
        assert full[1]["candidates_evaluated"] == [float(len(taus))]
        expected = [_first_stop(row) for row in full[4]]
        evaluated = np.array([e for e, _ in expected])
        np.testing.assert_array_equal(early[5], taus[[i for _, i in expected]])
        for g, res in zip(early[2], early[3]):  # a call runs until its last member stops
            assert res.candidates_evaluated == [evaluated[g.indices].max()]
        # what early stop evaluated is the full search's, NaN where it had stopped
        seen = np.arange(len(taus))[None] < evaluated[:, None]
        np.testing.assert_array_equal(early[4][seen], full[4][seen])
        assert np.isnan(early[4][~seen]).all()
        steps = np.diff(full[4], axis=1)
        is_unimodal = (steps != 0).all(1) & ~((steps[:, :-1] > 0) & (steps[:, 1:] < 0)).any(1)
        np.testing.assert_array_equal(early[5][is_unimodal],
                                      full[5][is_unimodal])  # the full grid's argmin
        for a, b in zip(full[0].client_weights, early[0].client_weights):
            np.testing.assert_array_equal(a.numpy()[is_unimodal], b.numpy()[is_unimodal])
        unimodal += is_unimodal.sum()
        unimodal_stops += (is_unimodal & (evaluated < len(taus))).sum()
        if client_batch == 1:
            assert early[1]["candidates_evaluated"][0] == evaluated.mean()
    # measured: all 16 client-etas unimodal, 4 of them with their minimum inside the grid
    # stopping after 3-6 of the 7 candidates
    assert unimodal >= 12 and unimodal_stops >= 3


@pytest.mark.parametrize("tau_search", ["full", "early_stop"])
@pytest.mark.parametrize("jacobian_batches", [1, 2])
def test_candidates_through_the_input_gram_match_the_taped_vjp(tau_search, jacobian_batches):
    """A Dense stack's candidates evaluated through the input gram X X^T (what the worker does
    for lazy packages) against the tape's VJP and a forward pass at every candidate's weights:
    a three-layer MLP, padded rows, Jacobians at other weights than the slice starts from
    (m = 2) and per-row Jacobian scales (a Byzantine sender's or the screen's)."""
    b, n, c = 3, 40, 10
    keras.utils.set_random_seed(0)
    fns = nd.functional.ModelFunctions(nd.models.mlp(hidden=(16, 12)))
    rng = np.random.default_rng(0)
    lin = [tf.constant(np.repeat(v[None], b, 0) + 0.05 * rng.standard_normal((b,) + v.shape),
                       tf.float32) for v in fns.initial_weights()]
    start = [v + tf.constant(0.05 * rng.standard_normal(v.shape), tf.float32) for v in lin]
    if jacobian_batches == 1:  # without batching the slice starts where J is taken
        start = lin
    images = rng.integers(0, 256, (b * n, 28, 28, 1)).astype(np.float32)
    feats = tf.reshape(fns.features(images), (b, n, -1))
    mask = np.ones((b, n), np.float32)
    mask[2, 30:] = 0.0
    labels = tf.one_hot(rng.integers(0, c, (b, n)), c) * mask[..., None]
    mask = tf.constant(mask)
    worker = nd.algorithms.NTKDFL(taus=(5, 10, 20, 40, 80), learning_rate=0.003,
                                  tau_search=tau_search,
                                  jacobian_batches=jacobian_batches).make_worker(fns)
    assert worker.dense_candidates
    gram = nd.kernels.dense.input_gram(feats)
    h = worker.kernel(lin, feats, mask)
    np.testing.assert_allclose(worker.kernel(lin, feats, mask, input_gram=gram), h, rtol=1e-6)
    args = (lin, start, feats, labels, mask, h, tf.constant(0.003),
            tf.constant(rng.uniform(0.5, 1.5, (b, n)), tf.float32), tf.zeros(labels.shape),
            tf.constant(False), None)
    taped, through_gram = worker._evolve(*args), worker._evolve(*args, gram)
    np.testing.assert_array_equal(through_gram.tau_index, taped.tau_index)
    assert len(set(taped.tau_index.numpy())) > 1  # the clients chose different candidates
    np.testing.assert_allclose(through_gram.candidate_losses, taped.candidate_losses, rtol=1e-5)
    for got, want in zip(through_gram.weights, taped.weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moved = [np.abs(w - s).max() for w, s in zip(taped.weights, start)]
    assert min(moved) > 1e-4  # every variable took a visible step
