"""Messages, the channel, and rounds in protocol terms: sizes by hand count, delivery, loss,
lazy against explicit Jacobian packages."""

import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import functional, protocol
from ntkdfl_tf.algorithms import base


def _pairs(num_clients=5, n=(6, 4, 5, 3, 6), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 255, (n[k], 28, 28, 1)).astype(np.uint8),
             rng.integers(0, 10, n[k])) for k in range(num_clients)]


def small_mlp():
    return nd.models.mlp(hidden=(8,))


# -- messages ----------------------------------------------------------------------------------
def test_message_sizes_are_hand_counts():
    """The MLP 784-100-10 of NTK-DFL.md: 79,510 parameters; a package of 200 samples carries
    200 x 10 x 79,510 Jacobian floats, 200 x 10 logits and 200 int32 labels."""
    fns = functional.ModelFunctions(nd.models.mlp())
    weights = [np.zeros(s, np.float32) for s in fns.shapes]
    assert protocol.WeightsMessage(0, 1, tuple(weights)).nbytes == 79_510 * 4
    package = protocol.JacobianPackage(3, 1, protocol.package_specs(200, 10, fns.shapes))
    assert package.lazy
    assert package.nbytes == 200 * 10 * 79_510 * 4 + 200 * 10 * 4 + 200 * 4
    assert package.num_samples == 200


def test_a_materialised_package_has_the_lazy_size_and_checks_its_arrays():
    fns = functional.ModelFunctions(small_mlp())
    lazy = protocol.JacobianPackage(2, 0, protocol.package_specs(3, 10, fns.shapes))
    x = tf.random.uniform([3, 28, 28, 1]) * 255
    weights = [tf.constant(w) for w in fns.initial_weights()]
    jac = nd.kernels.jacobian(fns, weights, fns.features(x))
    logits = fns.forward([w[None] for w in weights], fns.features(x))[0]
    full = lazy.materialise([j.numpy() for j in jac], logits.numpy(), np.array([1, 2, 3], np.int32))
    assert not full.lazy and full.nbytes == lazy.nbytes
    assert full.nbytes == sum(a.nbytes for a in (*full.jacobians, full.logits, full.labels))
    with pytest.raises(ValueError, match="describes"):
        lazy.materialise([j.numpy() for j in jac], logits.numpy(), np.array([1, 2, 3]))  # int64


# -- the channel -------------------------------------------------------------------------------
def test_default_channel_delivers_every_message_unchanged_and_counts_its_bytes():
    weights = [np.arange(12, dtype=np.float32).reshape(4, 3)]
    route = nd.topology.Ring().draw(4)
    sent = protocol.weights_messages(route, weights)
    channel = protocol.Channel().round(4, np.random.default_rng(0))
    delivery = channel.deliver(sent)
    assert delivery.unchanged and all(a is b for a, b in zip(delivery.messages, sent))
    assert channel.bytes_delivered == 8 * 3 * 4  # 8 directed edges of a 4-ring, 3 floats each
    np.testing.assert_array_equal(protocol.heard_from(delivery.messages, 4), route)
    for m in sent:  # each message carries its sender's row
        np.testing.assert_array_equal(m.weights[0], weights[0][m.sender])


def test_lost_links_lose_every_message_over_them():
    rng = np.random.default_rng(3)
    channel = protocol.Channel(message_loss=0.5).round(6, rng)
    working = np.random.default_rng(3).random((6, 6)) >= 0.5  # the draw the channel makes
    everyone = ~np.eye(6, dtype=bool)
    weights = [np.ones((6, 2), np.float32)]
    delivered = channel.deliver(protocol.weights_messages(everyone, weights)).messages
    np.testing.assert_array_equal(protocol.heard_from(delivered, 6), everyone & working)
    again = channel.deliver(protocol.weights_messages(everyone, weights)).messages
    assert [(m.sender, m.receiver) for m in again] == [(m.sender, m.receiver) for m in delivered]
    assert channel.bytes_delivered == 2 * len(delivered) * 2 * 4


@pytest.mark.parametrize("loss", [-0.1, 1.0, "x"])
def test_bad_message_loss_is_refused(loss):
    with pytest.raises(ValueError, match="message_loss"):
        protocol.Channel(message_loss=loss)


def test_averaging_changed_messages_sums_what_arrived():
    """The receiver's average of delivered arrays (the path codecs and adversaries will take)
    equals the mixing product when the arrays are the senders' own rows."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(5, 3, 2)).astype(np.float32), rng.normal(size=(5, 2))
               .astype(np.float32)]
    route = nd.topology.RandomGraph(2).draw(5, rng)
    sent = protocol.weights_messages(route, weights)
    tensors = [tf.constant(w) for w in weights]
    fast = base.average_received(tensors, protocol.Delivery(sent, True))
    summed = base.average_received(tensors, protocol.Delivery(sent, False))
    for a, b, w in zip(fast, summed, weights):
        ref = np.stack([(w[i] + w[route[i]].sum(0)) / (route[i].sum() + 1) for i in range(5)])
        np.testing.assert_allclose(a.numpy(), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.numpy(), ref, rtol=1e-5, atol=1e-6)
    replaced = [protocol.WeightsMessage(m.sender, m.receiver, tuple(np.zeros_like(a)
                                                                    for a in m.weights))
                for m in sent]
    zeroed = base.average_received(tensors, protocol.Delivery(replaced, False))[0].numpy()
    np.testing.assert_allclose(zeroed, weights[0] / (route.sum(1) + 1)[:, None, None], rtol=1e-6)


# -- rounds as messages ------------------------------------------------------------------------
def _fit(algorithm, pairs, rounds=1, channel=None, topology=None):
    trainer = nd.DecentralizedTrainer(small_mlp, algorithm, topology or nd.topology.Ring(),
                                      seed=0, channel=channel)
    history = trainer.fit(pairs, rounds=rounds, verbose=0)
    return trainer, history.history


@pytest.mark.parametrize("per_round_averaging", [True, False])
def test_ntkdfl_bytes_sent_is_the_hand_count_of_its_messages(per_round_averaging):
    pairs = _pairs()
    counts = np.array([len(y) for _, y in pairs])
    trainer, h = _fit(nd.algorithms.NTKDFL(taus=(2, 4), per_round_averaging=per_round_averaging),
                      pairs)
    p, c = trainer.fns.num_params, 10
    edges = 2 * 5  # a 5-ring: every client sends to both neighbours
    weights = edges * p * 4 * (2 if per_round_averaging else 1)  # weights, then w_bar back
    packages = sum(2 * n * (c * p + c) * 4 + 2 * n * 4 for n in counts)  # each to 2 neighbours
    assert h["bytes_sent"] == [float(weights + packages)]


def test_dfedavg_bytes_sent_is_the_hand_count_of_its_messages():
    trainer, h = _fit(nd.algorithms.get("dfedavg", local_epochs=1), _pairs(), rounds=2)
    assert h["bytes_sent"] == [2 * 5 * trainer.fns.num_params * 4.0] * 2


def test_a_lossy_channel_changes_what_clients_compute_and_send():
    pairs = _pairs()
    algorithm = nd.algorithms.NTKDFL(taus=(2, 4))
    clean, hc = _fit(algorithm, pairs, rounds=2)
    lossy, hl = _fit(algorithm, pairs, rounds=2, channel=protocol.Channel(message_loss=0.5))
    assert all(b < a for a, b in zip(hc["bytes_sent"], hl["bytes_sent"]))
    assert not np.allclose(clean.client_weights[0].numpy(), lossy.client_weights[0].numpy())


@pytest.mark.parametrize("options", [
    dict(), dict(loss="mse"), dict(jacobian_batches=2, client_batch=2),
    dict(per_round_averaging=False, flow="euler_bound")],
    ids=["cross_entropy", "mse", "batched", "ablation_bound"])
def test_explicit_packages_give_the_lazy_update(options):
    """Packages formed as arrays (J, logits, labels) and the lazy path (J never formed) give the
    same round: same chosen tau, same weights up to float32 rounding."""
    pairs = _pairs()
    lazy, hl = _fit(nd.algorithms.NTKDFL(taus=(3, 8, 20), **options), pairs, rounds=2)
    explicit, he = _fit(nd.algorithms.NTKDFL(taus=(3, 8, 20), packages="explicit", **options),
                        pairs, rounds=2)
    assert hl["tau"] == he["tau"] and hl["bytes_sent"] == he["bytes_sent"]
    for a, b, w0 in zip(lazy.client_weights, explicit.client_weights, lazy.initial_weights):
        moved = np.abs(a.numpy() - w0[None]).max()
        assert moved > 1e-4  # the round did something
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4 * max(moved, 1.0), rtol=1e-3)


def test_explicit_packages_past_the_memory_bound_run_in_sub_groups(monkeypatch):
    """With room for one receiver's packages at a time, a call of 3 runs as 3 sub-groups (seen
    in the calls) and gives the whole group's taus and weights up to float32 rounding."""
    from ntkdfl_tf.algorithms import ntkdfl_worker

    pairs = _pairs()
    algorithm = nd.algorithms.NTKDFL(taus=(3, 8, 20), packages="explicit", client_batch=3,
                                     jacobian_batches=2)
    whole, hw = _fit(algorithm, pairs, rounds=2)
    passes = []
    real_run = ntkdfl_worker.NTKDFLWorker._run
    monkeypatch.setattr(ntkdfl_worker, "PACKAGE_MEMORY_BYTES", 1)
    monkeypatch.setattr(ntkdfl_worker.NTKDFLWorker, "_run", lambda self, context, call: (
        passes.append(len(call.members)), real_run(self, context, call))[1])
    split, hs = _fit(algorithm, pairs, rounds=2)
    assert set(passes) == {1} and len(passes) == 2 * 6  # 5 clients in groups of 3: 6 passes
    assert hw["tau"] == hs["tau"] and hw["bytes_sent"] == hs["bytes_sent"]
    for a, b in zip(whole.client_weights, split.client_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


class _Recorder:
    """An executor that records NTK-DFL's calls and returns each member's averaged weights."""

    def __init__(self):
        self.calls = []

    def map(self, context, calls, progress=None):
        from ntkdfl_tf.algorithms.ntkdfl import EvolveResult

        self.calls += calls
        b = len(calls[0].members)
        return [EvolveResult(c.weights, np.zeros(b), np.ones(b), [1.0], np.zeros(b), 0)
                for c in calls]


def test_a_lost_request_costs_the_package_but_not_the_average():
    """Links 1->0 and 1->2 broken. Weights: 0 and 2 never hear 1 (so never ask it); 1 hears
    both and averages with them, but its requests travel the broken links, so it receives no
    package. 0 and 2 ask each other and each receives the other's package."""
    k = 3
    fns = functional.ModelFunctions(small_mlp())
    weights = [tf.constant(np.random.default_rng(0).normal(size=(k,) + s).astype(np.float32))
               for s in fns.shapes]
    working = np.ones((k, k), bool)  # [receiver, sender]
    working[0, 1] = working[2, 1] = False
    round_input = base.RoundInput(0, weights, ~np.eye(k, dtype=bool), np.array([4, 4, 4]), 4,
                                  np.random.default_rng(0), fns)
    channel, recorder = protocol.RoundChannel(working), _Recorder()
    out = nd.algorithms.NTKDFL(taus=(2,)).run_round(round_input, channel, recorder)
    own = [w.numpy() for w in weights]
    for i, heard in {0: [2], 1: [0, 2], 2: [0]}.items():
        for v, w in enumerate(own):
            np.testing.assert_allclose(out.weights[v].numpy()[i], w[[i] + heard].mean(0),
                                       rtol=1e-6, atol=1e-7)
    packages_from = {int(c.members[b]): sorted(set(c.senders[b][c.valid[b] > 0].tolist())
                                               - {int(c.members[b])})
                     for c in recorder.calls for b in range(len(c.members))}
    assert packages_from == {0: [2], 1: [], 2: [0]}
    p = fns.num_params
    package = 4 * (10 * p + 10) * 4 + 4 * 4  # 4 samples: Jacobians, logits, int32 labels
    # weights over 4 of 6 links, requests 0->2 and 2->0, their two packages
    assert channel.bytes_delivered == 4 * p * 4 + 2 * p * 4 + 2 * package
