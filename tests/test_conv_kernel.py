"""The structured Conv2D / Dense kernel (``kind="conv"``) against the explicit kernel and an
independent J·Jᵀ, and which kernel ``kind="auto"`` picks."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import kernels
from ntkdfl_tf.functional import ModelFunctions
from ntkdfl_tf.kernels.conv import form

L = keras.layers


def _small_cnn(*layers, input_shape=(9, 9, 2)):
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input(input_shape), *layers])


# Each one exercises something the CNN of nd.models does not: SAME padding, strides, dilation,
# average pooling, a Dense layer acting per position, a conv without bias, a non-linear output
# and a conv evaluated by position pairs (small output map).
MODELS = {
    "same_padding_strided": lambda: _small_cnn(
        L.Rescaling(0.5, offset=-0.1),
        L.Conv2D(4, 3, padding="same", activation="tanh"),
        L.Conv2D(5, 3, strides=2, activation="relu", use_bias=False),
        L.AveragePooling2D(2),
        L.Dense(6, activation="tanh"),  # acts at each of the 2 x 2 positions
        L.Flatten(), L.Dense(3)),
    "dilated_sigmoid_output": lambda: _small_cnn(
        L.Conv2D(3, 2, dilation_rate=2, activation="relu"), L.MaxPooling2D(),
        L.Flatten(), L.Dense(4, activation="sigmoid")),
    "position_pairs": lambda: _small_cnn(
        L.Conv2D(8, 3, activation="relu"), L.MaxPooling2D(padding="same"),  # 4 x 4 x 8
        L.Conv2D(16, 3, activation="tanh"),  # L = 4, k = 73, 16 outputs: position-pair form
        L.GlobalAveragePooling2D(), L.Dense(3)),
}


def _client_weights(fns, batch=2, seed=1):
    """[B, ...] weights: the model's own, then copies perturbed by 20% of each tensor's scale."""
    rng = np.random.default_rng(seed)
    return [tf.constant(np.stack([w + (b > 0) * 0.2 * (np.std(w) + 0.01) * rng.standard_normal(
        w.shape) for b in range(batch)]).astype(np.float32)) for w in fns.initial_weights()]


def _reference_kernel(model, weights, feats):
    """(1/C) sum_c J_c J_c^T in float64, J from one ``GradientTape.jacobian`` of the Keras
    model's logits [n, C] with respect to its variables (per client)."""
    out = []
    for b in range(feats.shape[0]):
        for v, w in zip(model.trainable_variables, weights):
            v.assign(w[b])
        with tf.GradientTape(persistent=True) as tape:  # eager, no pfor: per-entry gradients
            logits = model(feats[b])
        n, c = logits.shape
        jac = tape.jacobian(logits, model.trainable_variables, experimental_use_pfor=False)
        j = np.concatenate([np.reshape(t.numpy(), (n, c, -1)) for t in jac],
                           axis=-1).astype(np.float64)  # [n, C, P]
        out.append(np.einsum("acp,bcp->ab", j, j) / c)
    return np.stack(out)


def _assert_close(actual, expected, tol=1e-5):
    """Largest deviation at most ``tol`` of max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    deviation = np.abs(actual - expected).max() / np.abs(expected).max()
    assert deviation <= tol, deviation


@functools.lru_cache(maxsize=None)
def _case(name):
    model = MODELS[name]()
    fns = ModelFunctions(model)
    weights = _client_weights(fns)
    feats = tf.constant(np.random.default_rng(2).standard_normal((2, 7, 9, 9, 2)), tf.float32)
    mask = np.ones((2, 7), np.float32)
    mask[1, 5:] = 0.0
    expected = _reference_kernel(model, weights, feats) * mask[:, :, None] * mask[:, None, :]
    return fns, weights, feats, mask, expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_conv_kernel_matches_reference_and_explicit(name):
    """Two clients with distinct weights, two padded samples, chunks of 3 (uneven last one)."""
    fns, weights, feats, mask, expected = _case(name)
    conv = kernels.make_kernel(fns, "conv", chunk=3)(weights, feats, tf.constant(mask))
    explicit = kernels.make_kernel(fns, "explicit")(weights, feats, tf.constant(mask))
    assert np.abs(expected[1] - expected[0]).max() > 0.05 * np.abs(expected).max()  # distinct
    _assert_close(conv, expected)
    _assert_close(conv, explicit)


def test_position_pair_and_gradient_forms_are_both_exercised():
    """The rule picks position pairs for the small late conv and for Dense layers (L = 1), the
    per-sample gradient for the CNN's convolutions."""
    assert form(4, 73, 3 * 16) == "positions"
    assert form(1, 1601, 10 * 100) == "positions"
    assert form(26 * 26, 10, 10 * 32) == "gradient" and form(11 * 11, 289, 10 * 64) == "gradient"


def test_factors_recomputed_past_the_budget_give_the_same_kernel():
    """factor_budget_mb=0 (column chunks recomputed per row chunk) equals stored factors."""
    fns, weights, feats, mask, expected = _case("same_padding_strided")
    recomputed = kernels.ConvNTK(fns, chunk=2, factor_budget_mb=0)(weights, feats, mask)
    _assert_close(recomputed, expected)
    np.testing.assert_allclose(recomputed, np.transpose(recomputed, (0, 2, 1)), rtol=1e-6,
                               atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("chunk, tile", [(3, 3), (2, 5), (3, 512)])
def test_stored_factors_regrouped_into_tiles_give_the_same_kernel(chunk, tile):
    """Chunks of 2-3 samples regrouped into gram tiles of 3, 5 (uneven against both the chunks
    and N = 7) or all 7 rows equal the reference."""
    fns, weights, feats, mask, expected = _case("position_pairs")
    kernel = kernels.ConvNTK(fns, chunk=chunk, tile=tile)
    _assert_close(kernel(weights, feats, tf.constant(mask)), expected)


def test_padded_samples_give_zero_rows_and_columns():
    fns, weights, feats, _, _ = _case("position_pairs")
    mask = np.array([[1, 1, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]], np.float32)
    kernel = kernels.make_kernel(fns, "conv", chunk=4)
    h = kernel(weights, feats, tf.constant(mask)).numpy()
    full = kernel(weights, feats, tf.ones((2, 7))).numpy()
    pad = mask == 0
    assert np.all(h[pad] == 0) and np.all(np.transpose(h, (0, 2, 1))[pad] == 0)
    assert np.abs(full[pad]).min() > 0  # the zeros come from the mask, not the data
    real = mask[:, :, None] * mask[:, None, :] > 0
    np.testing.assert_allclose(h[real], full[real], rtol=1e-6)


def test_cnn_on_fashion_mnist_matches_reference_and_explicit(fashion):
    """nd.models.cnn on real images (raw pixels, standardised inside the model): two clients,
    one padded sample, through auto (which picks the conv kernel), against both references."""
    (x, _), _ = fashion
    keras.utils.set_random_seed(0)
    model = nd.models.cnn()
    fns = ModelFunctions(model)
    weights = _client_weights(fns, seed=7)
    feats = tf.stack([fns.features(x[:5]), fns.features(x[5:10])])
    mask = np.ones((2, 5), np.float32)
    mask[1, 4] = 0.0
    kernel = kernels.make_kernel(fns, chunk=2)
    assert isinstance(kernel, kernels.ConvNTK)
    h = kernel(weights, feats, tf.constant(mask))
    expected = _reference_kernel(model, weights, feats) * mask[:, :, None] * mask[:, None, :]
    _assert_close(h, expected, tol=1e-6)  # measured 1.6e-7
    # the explicit kernel's own float32 contraction over C * P = 1.8M values is the coarser one:
    # 1.0e-5 of max |H| from the float64 reference here (tests/test_kernels.py allows 2e-5)
    _assert_close(h, kernels.make_kernel(fns, "explicit", chunk=4)(weights, feats, mask), 2e-5)


def test_conv_kernel_on_a_dense_stack_equals_the_dense_kernel():
    """On an MLP (whose weightless prefix fns.features already applied) 'conv' equals 'dense'."""
    keras.utils.set_random_seed(0)
    fns = ModelFunctions(nd.models.mlp(hidden=(8, 6)))
    weights = _client_weights(fns)
    images = np.random.default_rng(4).integers(0, 256, (2, 5, 28, 28, 1)).astype(np.float32)
    feats = tf.stack([fns.features(x) for x in images])
    mask = tf.constant([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], tf.float32)
    _assert_close(kernels.make_kernel(fns, "conv", chunk=2)(weights, feats, mask),
                  kernels.make_kernel(fns, "dense")(weights, feats, mask))


class _Scale(L.Layer):
    """A weightless custom layer: the kernel cannot know what its call does."""

    def call(self, x):
        return 2.0 * x


def _functional(skip):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = L.Conv2D(3, 3, activation="relu")(inputs)
    h = L.Conv2D(3, 1, activation="relu")(h)
    if skip:
        h = L.Add()([h, L.Conv2D(3, 3)(inputs)])
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(h)))


@pytest.mark.parametrize("build, expected", [
    (nd.models.cnn, kernels.ConvNTK),
    (nd.models.mlp, kernels.DenseNTK),
    (lambda: _functional(skip=False), kernels.ConvNTK),
    (lambda: _functional(skip=True), kernels.ExplicitNTK),
    (lambda: _small_cnn(L.Conv2D(4, 3), L.BatchNormalization(), L.Flatten(), L.Dense(3)),
     kernels.ExplicitNTK),
    (lambda: _small_cnn(L.Conv2D(4, 3), _Scale(), L.Flatten(), L.Dense(3)), kernels.ExplicitNTK),
    # Dropout's seed state is a non-trainable variable
    (lambda: _small_cnn(L.Conv2D(4, 3), L.Flatten(), L.Dropout(0.5), L.Dense(3)),
     kernels.ExplicitNTK),
    (lambda: _small_cnn(L.DepthwiseConv2D(3), L.Flatten(), L.Dense(3)), kernels.ExplicitNTK),
    (lambda: _small_cnn(L.Conv2D(4, 3, groups=2), L.Flatten(), L.Dense(3)), kernels.ExplicitNTK),
])
def test_auto_picks_conv_only_for_supported_stacks(build, expected):
    assert type(kernels.make_kernel(ModelFunctions(build()))) is expected


def test_conv_kind_rejects_an_unsupported_model(one_line_error):
    fns = ModelFunctions(_small_cnn(L.Conv2D(4, 3), L.BatchNormalization(), L.Flatten(),
                                    L.Dense(3)))
    one_line_error(kernels.make_kernel, fns, "conv", names=("kernel='conv'", "explicit"))
