"""Traced-NTK implementations against finite differences and an independent Keras Jacobian."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import kernels
from ntkdfl_tf.functional import ModelFunctions

KINDS = ("dense", "explicit", "matrix_free")
L = keras.layers


def _model(*layers, inputs=5):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((inputs,)), *layers])


MODELS = {
    "relu_2layer": lambda: _model(L.Dense(6, activation="relu"), L.Dense(3)),
    "tanh_3layer": lambda: _model(L.Dense(6, activation="tanh"), L.Dense(4, activation="tanh"),
                                  L.Dense(3)),
    "sigmoid_output": lambda: _model(L.Dense(6, activation="relu"),
                                     L.Dense(3, activation="sigmoid")),
    "hidden_no_bias": lambda: _model(L.Dense(6, activation="tanh", use_bias=False), L.Dense(3)),
    "output_no_bias": lambda: _model(L.Dense(6, activation="relu"), L.Dense(3, use_bias=False)),
}


def _client_weights(fns, batch, seed=1):
    """[B, ...] weights: the model's own, then perturbed copies (distinct per client)."""
    rng = np.random.default_rng(seed)
    return [tf.constant(np.stack([w + (b > 0) * 0.3 * rng.standard_normal(w.shape)
                                  for b in range(batch)]).astype(np.float32))
            for w in fns.initial_weights()]


def _reference_kernel(model, weights, feats):
    """H = (1/C) sum_c J_c J_c^T from per-logit gradients of the Keras model, in float64 NumPy."""
    out = []
    for b in range(feats.shape[0]):
        for v, w in zip(model.trainable_variables, weights):
            v.assign(w[b])
        with tf.GradientTape(persistent=True) as tape:
            logits = model(feats[b])
            entries = [[logits[i, c] for c in range(logits.shape[1])] for i in range(len(logits))]

        def flat_grad(e):
            grads = tape.gradient(e, model.trainable_variables)
            return np.concatenate([np.ravel(g) for g in grads])

        j = np.array([[flat_grad(e) for e in row] for row in entries], np.float64)  # [N, C, P]
        out.append(np.einsum("acp,bcp->ab", j, j) / j.shape[1])
    return np.stack(out)


@functools.lru_cache(maxsize=None)
def _case(name):
    """A model, its functions, two clients' weights, features, a mask and the reference H."""
    model = MODELS[name]()
    fns = ModelFunctions(model)
    weights = _client_weights(fns, batch=2)
    feats = tf.constant(np.random.default_rng(2).standard_normal((2, 6, 5)), tf.float32)
    mask = np.ones((2, 6), np.float32)
    mask[1, 4:] = 0.0
    expected = _reference_kernel(model, weights, feats) * mask[:, :, None] * mask[:, None, :]
    return fns, weights, feats, mask, expected


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_jacobian_matches_central_differences():
    """kernels.jacobian equals central finite differences of the logits for every weight."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="tanh"), L.Dense(2)])
    fns = ModelFunctions(model)
    weights = [tf.constant(w) for w in fns.initial_weights()]
    x = tf.constant(np.random.default_rng(0).standard_normal((5, 4)), tf.float32)
    jac = kernels.jacobian(fns, weights, x)
    eps = 1e-2

    def logits(ws):
        return fns.forward([w[None] for w in ws], x[None])[0].numpy().astype(np.float64)

    for v, (w, j) in enumerate(zip(weights, jac)):
        assert j.shape == (5, 2) + tuple(w.shape)
        fd = np.zeros(j.shape)
        base = w.numpy()
        for idx in np.ndindex(*base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            up = logits(weights[:v] + [tf.constant(plus)] + weights[v + 1:])
            down = logits(weights[:v] + [tf.constant(minus)] + weights[v + 1:])
            fd[(slice(None), slice(None)) + idx] = (up - down) / (2 * eps)
        _close(j, fd, rtol=2e-2)


@pytest.mark.parametrize("output", ["linear", "tanh"])
def test_dense_jacobian_equals_the_tape_jacobian(output):
    """The Dense stack's factored Jacobian equals per-sample GradientTape Jacobians (three
    layers, a linear and a non-linear output layer)."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="tanh"),
                              L.Dense(4, activation="relu", use_bias=False),
                              L.Dense(3, activation=output)])
    fns = ModelFunctions(model)
    assert fns.is_dense_stack
    weights = [tf.constant(w) for w in fns.initial_weights()]
    x = tf.constant(np.random.default_rng(1).standard_normal((7, 6)), tf.float32)
    for got, want in zip(kernels.jacobian(fns, weights, x),
                         kernels.explicit.tape_jacobian(fns, weights, x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernel_matches_reference(kind, name):
    """H(weights, feats, mask) equals (1/C) sum_c J_c J_c^T per client, masked, for each path."""
    fns, weights, feats, mask, expected = _case(name)
    assert fns.is_dense_stack
    h = kernels.make_kernel(fns, kind)(weights, feats, tf.constant(mask))
    assert h.shape == (2, 6, 6)
    _close(h, expected, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_samples_give_zero_rows_and_columns(kind):
    """Masked samples have exactly zero rows and columns; real samples are unaffected."""
    fns, weights, feats, _, _ = _case("tanh_3layer")
    mask = np.array([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0]], np.float32)
    kernel = kernels.make_kernel(fns, kind)
    h = kernel(weights, feats, tf.constant(mask)).numpy()
    full = kernel(weights, feats, tf.ones((2, 6))).numpy()
    pad = mask == 0
    assert np.all(h[pad] == 0) and np.all(np.transpose(h, (0, 2, 1))[pad] == 0)
    real = mask[:, :, None] * mask[:, None, :] > 0
    assert np.abs(full[pad]).min() > 0  # the zeros come from the mask, not the data
    _close(h[real], full[real], rtol=1e-6)


def test_dense_and_explicit_agree_on_image_mlp():
    """On nd.models.mlp with 28x28x1 images (standardised by fns.features) both kinds agree."""
    keras.utils.set_random_seed(0)
    fns = ModelFunctions(nd.models.mlp(hidden=(8,)))
    images = np.random.default_rng(4).integers(0, 256, (2, 5, 28, 28, 1)).astype(np.float32)
    feats = tf.stack([fns.features(x) for x in images])
    assert feats.shape == (2, 5, 784)
    weights = _client_weights(fns, batch=2)
    mask = tf.constant([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], tf.float32)
    dense = kernels.make_kernel(fns, "dense")(weights, feats, mask)
    explicit = kernels.make_kernel(fns, "explicit")(weights, feats, mask)
    _close(dense, explicit, rtol=1e-4)


def test_make_kernel_rejects_dense_for_cnn_and_unknown_kind():
    """'dense' needs a Dense stack (ValueError for a CNN); an unknown kind is named in the error."""
    fns = ModelFunctions(nd.models.cnn())
    assert not fns.is_dense_stack
    with pytest.raises(ValueError, match="explicit"):
        kernels.make_kernel(fns, "dense")
    assert isinstance(kernels.make_kernel(fns), kernels.ConvNTK)  # auto: the conv kernel
    with pytest.raises(ValueError, match="'nope'"):
        kernels.make_kernel(fns, "nope")


def test_explicit_chunked_equals_unchunked():
    """ExplicitNTK with chunk < N (uneven last chunk) equals one-chunk evaluation."""
    fns = ModelFunctions(MODELS["tanh_3layer"]())
    weights = _client_weights(fns, batch=2)
    feats = tf.constant(np.random.default_rng(5).standard_normal((2, 7, 5)), tf.float32)
    mask = tf.constant([[1] * 7, [1] * 5 + [0] * 2], tf.float32)
    chunked = kernels.ExplicitNTK(fns, chunk=3)(weights, feats, mask)
    whole = kernels.ExplicitNTK(fns, chunk=128)(weights, feats, mask)
    _close(chunked, whole, rtol=1e-5)
    np.testing.assert_allclose(chunked, np.transpose(chunked, (0, 2, 1)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_reused_across_sizes(kind):
    """One kernel object serves neighbourhoods of different sizes (N changes between rounds)."""
    fns, weights, feats, _, expected = _case("tanh_3layer")
    kernel = kernels.make_kernel(fns, kind)
    for n in (6, 4, 5):
        h = kernel(weights, feats[:, :n], tf.ones((2, n)))
        _close(h[0], expected[0, :n, :n], rtol=1e-4)


def test_matrix_free_operator_equals_dense_kernel_products_inside_a_loop():
    """apply(v) inside a traced while-loop (as the flow calls it) equals H v with the dense H."""
    fns, weights, feats, mask, _ = _case("tanh_3layer")
    v0 = tf.constant(np.random.default_rng(6).standard_normal((2, 6, 3)), tf.float32)
    h = kernels.make_kernel(fns, "dense")(weights, feats, tf.constant(mask))

    @tf.function
    def three_products(v):
        apply = kernels.MatrixFreeNTK(fns).operator(weights, feats, tf.constant(mask))
        return tf.while_loop(lambda i, _: i < 3, lambda i, u: (i + 1, apply(u) / 10.0),
                             (0, v))[1]

    expected = v0
    for _ in range(3):
        expected = tf.matmul(h, expected) / 10.0
    _close(three_products(v0), expected, rtol=1e-4)


@pytest.mark.parametrize("kind", ("explicit", "auto"))
def test_cnn_explicit_kernel_matches_direct_jacobian_product(kind):
    """nd.models.cnn through make_kernel (explicit; auto, the conv kernel) equals H = (1/C) sum_c
    J_c J_c^T formed from per-sample, per-logit GradientTape gradients of the Keras model itself,
    for two clients with distinct weights, a padded sample and a chunk smaller than N."""
    keras.utils.set_random_seed(0)
    model = nd.models.cnn()
    fns = ModelFunctions(model)
    assert not fns.is_dense_stack and fns.num_params == 179_926
    rng = np.random.default_rng(7)
    # client 0: the initial weights; client 1: each tensor perturbed by 20% of its own scale
    weights = [tf.constant(np.stack([w, w + 0.2 * (np.std(w) + 0.01) * rng.standard_normal(
        w.shape)]).astype(np.float32)) for w in fns.initial_weights()]
    images = rng.integers(0, 256, (2, 4, 28, 28, 1)).astype(np.float32)  # raw pixels
    feats = tf.stack([fns.features(x) for x in images])
    mask = np.ones((2, 4), np.float32)
    mask[1, 3] = 0.0
    h = kernels.make_kernel(fns, kind, chunk=3)(weights, feats, tf.constant(mask)).numpy()
    expected = _reference_kernel(model, weights, feats) * mask[:, :, None] * mask[:, None, :]
    assert h.shape == (2, 4, 4)
    assert np.abs(expected[1] - expected[0]).max() > 0.1 * np.abs(expected).max()  # distinct
    # float32 contraction over P = 179,926 parameters: measured 1.4e-5 of max |H| (H ~ 8.5e3)
    _close(h, expected, rtol=2e-5)
