"""DisPFL: mask-aware averaging, mask evolution, sparse bytes and masks as checkpointed state,
each against a small case computed by hand."""

import math

import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import checkpoint, protocol
from ntkdfl_tf.algorithms import dispfl

# Three clients, one 2x2 variable. Client 0 hears 1 and 2, client 1 hears 0, client 2 nobody.
SENT = [np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]], np.float32)]
SENT_MASKS = [np.array([[[1, 1], [0, 1]], [[1, 0], [1, 1]], [[0, 1], [1, 0]]], bool)]
OWN_MASKS = [np.array([[[1, 1], [1, 0]], [[1, 1], [0, 1]], [[0, 1], [1, 1]]], bool)]
GRAPH = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
# By hand, coordinate by coordinate over the senders whose mask holds it (3 at (1, 0) of
# client 0 is outside its sent mask and never counts), then zero outside the own mask:
#   client 0 <- {0, 1, 2}: (0,0) (1+5)/2, (0,1) (2+10)/2, (1,0) (7+11)/2, (1,1) not own -> 0
#   client 1 <- {1, 0}:    (0,0) (1+5)/2, (0,1) 2/1, (1,0) not own -> 0, (1,1) (4+8)/2
#   client 2 <- {2}:       (0,0) not own, (0,1) 10, (1,0) 11, (1,1) own but nobody has it -> 0
EXPECTED = np.array([[[3, 6], [9, 0]], [[3, 2], [0, 6]], [[0, 10], [11, 0]]], np.float32)


def test_mask_aware_average_by_hand():
    channel = protocol.Channel().round(3, np.random.default_rng(0))
    delivery = channel.deliver(protocol.weights_messages(GRAPH, SENT, SENT_MASKS), own=SENT)
    assert delivery.unchanged
    got = dispfl.masked_average(SENT, SENT_MASKS, OWN_MASKS, delivery)
    np.testing.assert_allclose(got[0], EXPECTED, rtol=1e-6)
    # the path for decoded (changed) messages sums the same numbers
    changed = protocol.Delivery(delivery.messages, unchanged=False)
    np.testing.assert_allclose(dispfl.masked_average(SENT, SENT_MASKS, OWN_MASKS, changed)[0],
                               EXPECTED, rtol=1e-6)


def test_mask_evolution_by_hand():
    """4 active, fraction 0.5 -> 2 replaced: prune the two smallest |w| among the active
    ((0,1) |-0.1| and (1,0) |0.3|), regrow the two largest |g| among the then inactive
    ((1,1) 0.7 and the just-pruned (0,1) 0.4; (1,2) 0.2 and (1,0) 0.05 stay out)."""
    mask = np.array([[[1, 1, 1], [1, 0, 0]]], bool)
    weights = np.array([[[0.5, -0.1, 2.0], [0.3, 9.0, 9.0]]], np.float32)
    grads = np.array([[[5.0, 0.4, 5.0], [0.05, -0.7, 0.2]]], np.float32)
    new = dispfl.evolve_masks([mask], [weights], [grads], 0.5)[0]
    np.testing.assert_array_equal(new, [[[1, 1, 1], [0, 1, 0]]])
    # ceil(0.3 * 4) = 2 as well; fraction 0 changes nothing
    np.testing.assert_array_equal(dispfl.evolve_masks([mask], [weights], [grads], 0.3)[0], new)
    np.testing.assert_array_equal(dispfl.evolve_masks([mask], [weights], [grads], 0.0)[0], mask)


def test_evolution_preserves_each_clients_density():
    rng = np.random.default_rng(0)
    masks = [rng.random((5, 30, 7)) < 0.4, np.ones((5, 7), bool)]
    weights = [rng.normal(size=m.shape) * m for m in masks]
    grads = [rng.normal(size=m.shape) for m in masks]
    for fraction in (0.5, 0.2, 0.01):
        new = dispfl.evolve_masks(masks, weights, grads, fraction)
        for a, b in zip(masks, new):
            np.testing.assert_array_equal(a.reshape(5, -1).sum(1), b.reshape(5, -1).sum(1))
        assert (new[0] != masks[0]).any()


def test_cosine_drop_schedule():
    assert dispfl.drop_fraction(0.5, 0, 10) == pytest.approx(0.5)
    assert dispfl.drop_fraction(0.5, 5, 10) == pytest.approx(0.25)
    assert dispfl.drop_fraction(0.5, 10, 10) == pytest.approx(0.0)


def test_erk_densities_of_the_paper_mlp():
    """784-100-10: 1/raw score is largest for the biases, then the 100x10 kernel; both go
    dense and the first kernel takes the rest: (0.5 * 79510 - 1110) / 78400."""
    shapes = [(784, 100), (100,), (100, 10), (10,)]
    got = dispfl.erk_densities(shapes, 0.5)
    np.testing.assert_allclose(got, [(0.5 * 79510 - 1110) / 78400, 1, 1, 1], rtol=1e-12)
    sizes = np.array([math.prod(s) for s in shapes])
    assert float(np.dot(got, sizes)) == pytest.approx(0.5 * sizes.sum())
    np.testing.assert_allclose(dispfl.erk_densities(shapes, 1.0), 1.0)


def test_sparse_message_bytes_by_hand():
    """A 4x4 variable with 6 kept values: 24 bytes of values + a 2-byte bitmap (16 bits <
    24 bytes of indices); a 64-vector with 1 kept: 4 bytes + one 4-byte index (< 8-byte
    bitmap). Dense: every float32."""
    w = (np.ones((4, 4), np.float32), np.ones(64, np.float32))
    m = (np.eye(4, dtype=bool), np.zeros(64, bool))
    m[0][0, 1] = m[0][2, 3] = True
    m[1][5] = True
    assert int(m[0].sum()) == 6
    assert protocol.WeightsMessage(0, 1, w, mask=m).nbytes == (24 + 2) + (4 + 4)
    assert protocol.WeightsMessage(0, 1, w).nbytes == 4 * (16 + 64)


@pytest.fixture(scope="module")
def eight(tiny):
    return tiny


def _trainer(**kwargs):
    alg = nd.algorithms.DisPFL(**{"batch_size": 10, "local_epochs": 1, **kwargs})
    return nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)), alg,
                                   nd.topology.RandomGraph(3), seed=1)


def test_masked_weights_stay_zero_and_bytes_count_the_masks(eight):
    clients, _ = eight
    trainer = _trainer()
    trainer.fit(clients, rounds=1, verbose=0)
    masks = trainer.algorithm_state.masks
    sent_masks = trainer.algorithm.initial_state(clients.num_clients, trainer.fns,
                                                 nd.trainer.stream_rng(1, "masks")).masks
    per_client = [sum(4 * int(m[j].sum()) + min(math.ceil(m[j].size / 8), 4 * int(m[j].sum()))
                      for m in sent_masks) for j in range(clients.num_clients)]
    h = trainer.fit(clients, rounds=3, verbose=0).history
    for w, m in zip(trainer.client_weights, trainer.algorithm_state.masks):
        assert (w.numpy()[~m] == 0).all()
        assert (w.numpy()[m] != 0).mean() > 0.9  # trained, not wiped
    counts = [m.reshape(len(m), -1).sum(1) for m in trainer.algorithm_state.masks]
    for a, b in zip(counts, [m.reshape(len(m), -1).sum(1) for m in masks]):
        np.testing.assert_array_equal(a, b)  # density kept through evolution
    assert h["mask_changed_fraction"][0] > 0  # round 1 evolved the masks
    # round 0 sent the initial masks: each sender's bytes once per out-edge (3 per receiver)
    first = _trainer()
    bytes0 = first.fit(clients, rounds=1, verbose=0).history["bytes_sent"][0]
    graph = nd.topology.RandomGraph(3).draw(clients.num_clients,
                                            nd.trainer.stream_rng(1, "topology", 0))
    assert bytes0 == sum(per_client[j] * int(graph[:, j].sum())
                         for j in range(clients.num_clients))


def test_masks_are_checkpointed_and_resume_bit_for_bit(eight, tmp_path):
    clients, _ = eight
    straight = _trainer(anneal_rounds=3)
    straight.fit(clients, rounds=3, verbose=0)
    first = _trainer(anneal_rounds=3)
    first.fit(clients, rounds=2, verbose=0,
              callbacks=[nd.callbacks.RoundCheckpoint(str(tmp_path), verbose=0)])
    state = checkpoint.load(str(tmp_path / checkpoint.NAME))
    for a, b in zip(state["algorithm_state"]["masks"], first.algorithm_state.masks):
        np.testing.assert_array_equal(a, b)
    resumed = _trainer(anneal_rounds=3)
    resumed.fit(clients, rounds=3, verbose=0,
                callbacks=[nd.callbacks.RoundCheckpoint(str(tmp_path), verbose=0)])
    for a, b in zip(resumed.client_weights, straight.client_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(resumed.algorithm_state.masks, straight.algorithm_state.masks):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_before_the_masks_stream_still_matches():
    """Adding a stream leaves every earlier stream's draws as they were: the same run."""
    mine = {"seed": 1, "algorithm": "x", "num_clients": 2, "streams": {"init": 0, "masks": 8}}
    checkpoint.check_same_run(dict(mine, streams={"init": 0}), mine, "ckpt")
    with pytest.raises(nd.CheckpointError, match="streams"):
        checkpoint.check_same_run(dict(mine, streams={"init": 1}), mine, "ckpt")


def test_bad_dispfl_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        nd.algorithms.DisPFL(sparsity=1.0)
    with pytest.raises(ValueError, match="momentum"):
        nd.algorithms.DisPFL(momentum=0.9)


def test_local_distribution_accuracy_by_hand(eight):
    """``val_client_local_accuracy``: each client's per-class test accuracy weighted by its
    own training label shares, averaged over clients; recomputed here with Keras."""
    clients, (x_test, y_test) = eight
    trainer = _trainer()
    h = trainer.fit(clients, rounds=1, validation_data=(x_test, y_test), verbose=0).history
    model = trainer.aggregate()
    local = []
    for j in range(clients.num_clients):
        model.set_weights([w.numpy()[j] for w in trainer.client_weights])
        hit = np.argmax(model.predict(x_test, verbose=0), -1) == y_test
        labels = clients.y[j, :clients.counts[j]]
        share = np.bincount(labels, minlength=10) / len(labels)
        present = np.bincount(y_test, minlength=10) > 0
        share = share * present / (share * present).sum()
        acc = np.array([hit[y_test == c].mean() if present[c] else 0.0 for c in range(10)])
        local.append(float((share * acc).sum()))
    assert h["val_client_local_accuracy"][0] == pytest.approx(np.mean(local), abs=1e-6)
    assert h["val_client_mean_accuracy"][0] == pytest.approx(
        trainer.last_client_accuracy.mean(), abs=1e-12)


def test_clients_that_sit_out_keep_weights_and_masks_together(eight):
    """With dropout the trainer keeps an absent client's weights and its mask alike, so its
    weights stay zero outside its mask."""
    clients, _ = eight
    alg = nd.algorithms.DisPFL(batch_size=10, local_epochs=1)
    trainer = nd.DecentralizedTrainer(lambda: nd.models.mlp(hidden=(8,)), alg,
                                      nd.topology.RandomGraph(3), seed=1,
                                      faults=nd.Faults(dropout=0.4))
    h = trainer.fit(clients, rounds=3, verbose=0).history
    assert min(h["active_clients"]) < clients.num_clients
    for w, m in zip(trainer.client_weights, trainer.algorithm_state.masks):
        assert (w.numpy()[~m] == 0).all()
