"""Codecs on the channel: parsing, encoded sizes by hand count, what the receiver decodes, and
that a lossy codec changes what the receiver computes while a lossless one does not."""

import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import functional
from ntkdfl_tf.protocol import codecs

MLP_SHAPES = [(784, 100), (100,), (100, 10), (10,)]  # NTK-DFL.md's 784-100-10: 79,510 params


def _layout(input_bytes=None):
    return codecs.package_layout(functional.ModelFunctions(nd.models.mlp()), input_bytes)


# -- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("identity", 79_510 * 4),
    # per tensor: one byte per value and an 8-byte header (minimum, scale)
    ("quantize:bits=8", (78_400 + 8) + (100 + 8) + (1_000 + 8) + (10 + 8)),
    ("quantize:bits=4", (39_200 + 8) + (50 + 8) + (500 + 8) + (5 + 8)),
    # k = ceil(0.1 * size) values and int32 indices per tensor
    ("topk:fraction=0.1", 8 * (7_840 + 10 + 100 + 1)),
    ("topk:fraction=0.1+quantize:bits=8", (7_840 + 8 + 4 * 7_840) + (10 + 8 + 40)
     + (100 + 8 + 400) + (1 + 8 + 4)),
])
def test_weight_message_sizes_are_hand_counts(spec, expected):
    codec = codecs.parse(spec)
    weights = tuple(np.ones(s, np.float32) for s in MLP_SHAPES)
    assert nd.protocol.WeightsMessage(0, 1, weights, codec).nbytes == expected


@pytest.mark.parametrize("spec, expected", [
    # 200 samples: Jacobians 200 x 10 x 79,510 floats, logits 200 x 10, int32 labels
    ("identity", 200 * 10 * 79_510 * 4 + 200 * 10 * 4 + 200 * 4),
    # per sample: layer 1 input (the uint8 image, 784 bytes) and signal (10 x 100); the linear
    # output layer's input (100) and no signal (the identity)
    ("factored", 200 * 784 + 200 * (1_000 + 100) * 4 + 200 * 10 * 4 + 200 * 4),
    ("subsample:fraction=0.25", 50 * 10 * 79_510 * 4 + 50 * 10 * 4 + 50 * 4),
    ("subsample:fraction=0.25+factored", 50 * 784 + 50 * (1_000 + 100) * 4 + 50 * 10 * 4
     + 50 * 4),
    # 200 uint8 images of 28 x 28 and their int32 labels; the receiver evaluates the rest
    ("inputs", 200 * 784 + 200 * 4),
    ("subsample:fraction=0.25+inputs", 50 * 784 + 50 * 4),
    ("quantize:bits=8", sum(200 * 10 * 78_400 // 78_400 * s + 8 for s in (78_400, 100, 1_000, 10))
     + 200 * 10 * 4 + 200 * 4),
    ("topk:fraction=0.01", sum(8 * -(-200 * 10 * s // 100) for s in (78_400, 100, 1_000, 10))
     + 200 * 10 * 4 + 200 * 4),
    # k = ceil(0.01 * 79,510) = 796 values per sample and class, and the sketch's 8-byte seed
    ("project:fraction=0.01", 200 * 10 * 796 * 4 + 8 + 200 * 10 * 4 + 200 * 4),
    ("project:fraction=0.01+quantize:bits=8", 200 * 10 * 796 + 8 + 8 + 200 * 10 * 4 + 200 * 4),
    ("dp:clip=1,noise=1", 200 * 10 * 79_510 * 4 + 200 * 10 * 4 + 200 * 4),  # noise: same size
])
def test_package_sizes_are_hand_counts(spec, expected):
    fns = functional.ModelFunctions(nd.models.mlp())
    package = nd.protocol.JacobianPackage(3, 1, nd.protocol.package_specs(200, 10, fns.shapes),
                                          codec=codecs.parse(spec), layout=_layout(784))
    assert package.nbytes == expected


def test_factored_is_about_four_hundred_times_smaller():
    dense = codecs.parse("identity").package_nbytes(200, 10, _layout())
    factored = codecs.parse("factored").package_nbytes(200, 10, _layout())
    assert 400 < dense / factored < 450


# -- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ("zip", "Unknown codec stage 'zip'"),
    ("quantize", "needs bits"),
    ("quantize:bits=eight", "not a number"),
    ("quantize:bits=0", "bits must lie in 1..16"),
    ("topk:fraction=1.5", "fraction must lie in"),
    ("topk:ratio=0.1", "takes fraction"),
    ("quantize:bits=8+topk:fraction=0.1", "in the order subsample \\+ inputs \\+ factored"),
    ("topk:fraction=0.1+topk:fraction=0.2", "at most once"),
    ("inputs+quantize:bits=8", "combines with subsample only"),
    ("inputs+factored", "combines with subsample only"),
    ("dp:clip=1", "needs noise"),
    ("dp:clip=0,noise=1", "clip > 0"),
    ("factored+quantize:bits=8", "use them without 'factored'"),
    ("factored+project:fraction=0.1", "use them without 'factored'"),
])
def test_bad_codec_strings_give_one_clear_error(spec, match):
    with pytest.raises(codecs.CodecError, match=match):
        nd.protocol.Channel(codec=spec)


def test_weight_codecs_refuse_package_stages():
    with pytest.raises(ValueError, match="Jacobian packages only"):
        nd.protocol.Channel(weight_codec="subsample:fraction=0.5")
    with pytest.raises(ValueError, match="Jacobian packages only"):
        nd.protocol.Channel(weight_codec="dp:clip=1,noise=1")


# -- what the receiver decodes -----------------------------------------------------------------
def test_topk_keeps_exactly_the_largest_entries():
    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    out = codecs.encode_values(codecs.parse("topk:fraction=0.1"), x, np.random.default_rng(0))
    kept = np.flatnonzero(out.reshape(-1))
    assert len(kept) == 20
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(x.reshape(-1)))[:20]))
    np.testing.assert_array_equal(out.reshape(-1)[kept], x.reshape(-1)[kept])


@pytest.mark.parametrize("bits", [2, 8])
def test_quantize_rounds_to_the_nearest_of_two_to_the_bits_levels(bits):
    x = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    out = codecs.encode_values(codecs.parse(f"quantize:bits={bits}"), x, None)
    scale = (x.max() - x.min()) / (2 ** bits - 1)
    assert np.abs(out - x).max() <= scale / 2 * (1 + 1e-5)
    assert len(np.unique(out)) <= 2 ** bits


def test_stochastic_quantize_is_unbiased():
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    codec = codecs.parse("quantize:bits=1,stochastic=1")
    rng = np.random.default_rng(0)
    mean = np.mean([codecs.encode_values(codec, x, rng) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, x, atol=0.05)


def test_dense_jacobian_blocks_are_the_outer_products_the_factored_encoding_sends():
    """J of layer l = (its input) x (its backpropagated signal per class): the factors are
    exact. Checked against GradientTape Jacobians of the MLP at random weights."""
    fns = functional.ModelFunctions(nd.models.mlp(hidden=(16,)))
    rng = np.random.default_rng(0)
    weights = [tf.constant(rng.normal(size=s).astype(np.float32) * 0.3) for s in fns.shapes]
    x = fns.features(tf.constant(rng.integers(0, 255, (5, 28, 28, 1)), tf.float32))
    w1, b1, w2, _ = (w.numpy() for w in weights)
    jac = [j.numpy() for j in nd.kernels.jacobian(fns, weights, x)]
    a1 = x.numpy()
    z1 = a1 @ w1 + b1
    h = np.maximum(z1, 0)
    signal = (z1 > 0)[:, None, :] * w2.T[None]  # d f_c / d z1: [n, C, 16]
    np.testing.assert_allclose(jac[0], a1[:, None, :, None] * signal[:, :, None, :], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(jac[1], signal, rtol=1e-5, atol=1e-6)
    eye = np.eye(10, dtype=np.float32)
    np.testing.assert_allclose(jac[2], h[:, None, :, None] * eye[None, :, None, :], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(jac[3], np.broadcast_to(eye, (5, 10, 10)), atol=1e-6)
    layout = codecs.package_layout(fns)
    assert layout.factored_tensors(5, 10) == ([5 * 784, 5 * 10 * 16, 5 * 16], 0)
    assert codecs.package_layout(fns, 784).factored_tensors(5, 10) == ([5 * 10 * 16, 5 * 16],
                                                                       5 * 784)


def test_the_sketch_is_a_count_sketch_and_unbiased():
    """project: A = J S^T with S built by hand from the buckets and signs; every bucket is
    used; over many seeds A_a . A_b averages to J_a . J_b (E[S^T S] = I)."""
    codec = codecs.parse("project:fraction=0.1")
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(3, 2, 50)).astype(np.float32)
    sketch = codecs.make_sketch(codec, 50, seed=7)
    s = np.zeros((5, 50), np.float32)
    s[sketch.bucket, np.arange(50)] = sketch.sign
    np.testing.assert_allclose(sketch.project(flat), flat @ s.T, rtol=1e-5, atol=1e-5)
    assert sorted(np.bincount(sketch.bucket)) == [10] * 5
    exact = np.einsum("cp,cp->", flat[0], flat[1])
    estimates = [np.einsum("ck,ck->", *codecs.make_sketch(codec, 50, seed).project(flat[:2]))
                 for seed in range(4000)]
    spread = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 4 * spread
    assert codecs.make_sketch(codecs.parse("quantize:bits=8"), 50, 0) is None


def test_dp_clips_each_sample_and_adds_noise_of_the_stated_scale():
    rng = np.random.default_rng(0)
    jac = [rng.normal(size=(6, 3, 40)).astype(np.float32) * 5, rng.normal(size=(6, 3, 4))]
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    clipped, out_logits = codecs.encode_package_values(
        codecs.parse("dp:clip=2,noise=0"), jac, logits, rng)
    norms = np.sqrt(sum(np.sum(a.reshape(6, -1) ** 2, 1) for a in (*clipped, out_logits)))
    np.testing.assert_allclose(norms, 2.0, rtol=1e-5)  # every sample was larger than the clip
    ratio = clipped[0] / jac[0]
    np.testing.assert_allclose(ratio, ratio[:, :1, :1] * np.ones_like(ratio), rtol=1e-4)
    noisy, noisy_logits = codecs.encode_package_values(codecs.parse("dp:clip=2,noise=0.5"), jac,
                                                       logits, np.random.default_rng(1))
    assert abs(np.std(noisy[0] - clipped[0]) - 1.0) < 0.05  # noise * clip = 1
    assert 0.5 < np.std(noisy_logits - out_logits) < 1.5  # 18 draws of the same scale
    own, own_logits = codecs.encode_package_values(codecs.parse("dp:clip=2,noise=0.5"), jac,
                                                   logits, rng, sent=False)
    np.testing.assert_array_equal(own[1], np.asarray(jac[1], np.float32))  # never sent
    np.testing.assert_array_equal(own_logits, logits)


# -- every codec through training --------------------------------------------------------------
def _pairs():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 255, (10, 28, 28, 1)).astype(np.uint8), rng.integers(0, 10, 10))
            for _ in range(5)]


def _fit(codec="identity", weight_codec="identity", algorithm=None, rounds=2):
    trainer = nd.DecentralizedTrainer(
        lambda: nd.models.mlp(hidden=(8,)), algorithm or nd.algorithms.NTKDFL(taus=(3, 8, 20)),
        nd.topology.Ring(), seed=0,
        channel=nd.protocol.Channel(codec=codec, weight_codec=weight_codec))
    history = trainer.fit(_pairs(), rounds=rounds, verbose=0)
    return trainer, history.history


CODECS = ["identity", "factored", "inputs", "subsample:fraction=0.5",
          "subsample:fraction=0.5+factored", "subsample:fraction=0.5+inputs",
          "topk:fraction=0.1", "quantize:bits=4", "quantize:bits=8,stochastic=1",
          "subsample:fraction=0.5+topk:fraction=0.1+quantize:bits=8",
          "project:fraction=0.05", "dp:clip=1,noise=0.01",
          "subsample:fraction=0.5+project:fraction=0.1+dp:clip=1,noise=0.01+quantize:bits=8"]


@pytest.mark.parametrize("spec", CODECS)
def test_every_codec_trains_sends_fewer_bytes_and_changes_weights_only_if_lossy(spec):
    reference, h_ref = _fit()
    trainer, h = _fit(spec)
    assert np.isfinite(h["loss"]).all()
    codec = codecs.parse(spec)
    same = all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(reference.client_weights, trainer.client_weights))
    assert same == codec.lossless, f"{spec}: lossless={codec.lossless} but same={same}"
    if any(s.name != "dp" for s in codec.stages):  # dp alone adds noise, not compression
        assert all(b < a for a, b in zip(h_ref["bytes_sent"], h["bytes_sent"]))
    layout = codecs.package_layout(trainer.fns, input_bytes=784)  # uint8 28 x 28 images
    p = trainer.fns.num_params
    package = codec.package_nbytes(10, 10, layout)
    assert h["bytes_sent"] == [2 * 5 * (2 * p * 4 + package)] * 2  # a 5-ring, both directions


def test_quantized_weights_change_the_average_by_at_most_the_quantisation_error():
    dfedavg = nd.algorithms.get("dfedavg", local_epochs=1)
    plain, hp = _fit(algorithm=dfedavg, rounds=1)
    coarse, hq = _fit(weight_codec="quantize:bits=8", algorithm=dfedavg, rounds=1)
    p = plain.fns.num_params
    sizes = [int(np.prod(s)) for s in plain.fns.shapes]
    assert hq["bytes_sent"] == [2 * 5 * sum(n + 8 for n in sizes)]
    assert hp["bytes_sent"] == [2 * 5 * p * 4.0]
    for a, b in zip(plain.client_weights, coarse.client_weights):
        a, b = a.numpy(), b.numpy()
        assert not np.array_equal(a, b)
        # a neighbour's rows enter a three-way average: error <= (2/3) * (range / 255) / 2
        span = a.max() - a.min()
        assert np.abs(a - b).max() <= span / 255 + 1e-6


def test_subsample_builds_the_kernel_on_the_received_samples_only():
    """With one sample kept per neighbour package, clients evolve on their own data plus one
    sample from each neighbour: the logged loss differs and bytes match the hand count."""
    trainer, h = _fit("subsample:fraction=0.05", rounds=1)
    p = trainer.fns.num_params
    one_sample = 10 * p * 4 + 10 * 4 + 4
    assert h["bytes_sent"] == [2 * 5 * (2 * p * 4 + one_sample)]
    from ntkdfl_tf.algorithms.ntkdfl import samples_kept
    fns = trainer.fns
    layout = codecs.package_layout(fns)
    packages = [nd.protocol.JacobianPackage(j, i, nd.protocol.package_specs(10, 10, fns.shapes),
                                            codec=codecs.parse("subsample:fraction=0.05"),
                                            layout=layout, samples=np.array([3]))
                for i, j in ((0, 1), (1, 0))]
    senders, valid = nd.topology.neighbourhoods(np.array([[0, 1], [1, 0]], bool))
    keep = samples_kept(packages, senders, valid, 10)
    np.testing.assert_array_equal(keep[:, 0].sum(-1), [10, 10])  # own data whole
    np.testing.assert_array_equal(keep[:, 1], np.eye(10)[[3, 3]])  # one received sample


def test_a_full_width_projection_is_a_signed_permutation_and_changes_nothing():
    """project:fraction=1 makes S a signed permutation (S^T S = I), so the projected kernel
    and the update S^T A^T R equal the plain explicit ones: an independent check of the
    receiver's projected path. A narrow projection changes the result."""
    algorithm = nd.algorithms.NTKDFL(taus=(3, 8, 20), packages="explicit")
    plain, _ = _fit(algorithm=algorithm)
    full, _ = _fit("project:fraction=1", algorithm=algorithm)
    narrow, _ = _fit("project:fraction=0.05", algorithm=algorithm)
    for a, b, c in zip(plain.client_weights, full.client_weights, narrow.client_weights):
        scale = np.abs(a.numpy()).max()
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4 * scale)
    assert any(not np.allclose(a.numpy(), c.numpy(), atol=1e-3)
               for a, c in zip(plain.client_weights, narrow.client_weights))


@pytest.mark.parametrize("spec", ["subsample:fraction=0.1+quantize:bits=8",
                                  "subsample:fraction=0.1+project:fraction=0.1"])
def test_lossy_codecs_with_subsampling_and_jacobian_batching(spec):
    """With one sample per package and three slices, most slices hold nothing of a sender:
    the receiver skips those packages and still trains."""
    algorithm = nd.algorithms.NTKDFL(taus=(3, 8, 20), jacobian_batches=3)
    _, h = _fit(spec, algorithm=algorithm)
    assert np.isfinite(h["loss"]).all()
