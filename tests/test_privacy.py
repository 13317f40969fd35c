"""What a Jacobian package reveals: exact inputs and labels from the plain package, less after
lossy codecs. Real Fashion-MNIST images, the paper's MLP at its initial weights."""

import numpy as np
import pytest
import tensorflow as tf

import ntkdfl_tf as nd
from ntkdfl_tf import functional, privacy
from ntkdfl_tf.protocol import codecs


@pytest.fixture(scope="module")
def package_and_images(fashion):
    (x, y), _ = fashion
    images, labels = x[:8], y[:8].astype(np.int32)
    fns = functional.ModelFunctions(nd.models.mlp())
    return privacy.jacobian_package(fns, fns.initial_weights(), images, labels), images, fns


def test_the_plain_package_gives_every_input_and_label_exactly(package_and_images):
    package, images, fns = package_and_images
    got = privacy.reconstruct(package, fns)
    assert got.recovered.all()
    error = np.abs(got.inputs / 255.0 - images / 255.0).max()  # [0, 1] pixel units
    assert error < 1e-4, error
    np.testing.assert_array_equal(got.labels, package.labels)


def test_lossy_codecs_reveal_less_the_coarser_they_are(package_and_images):
    package, images, fns = package_and_images
    rng = np.random.default_rng(0)
    quality = {}
    for spec in ("quantize:bits=8", "quantize:bits=4", "topk:fraction=0.1", "topk:fraction=0.01"):
        codec = codecs.parse(spec)
        noisy = package.materialise([codecs.encode_values(codec, j, rng)
                                     for j in package.jacobians], package.logits, package.labels)
        got = privacy.reconstruct(noisy, fns)
        quality[spec] = np.median(privacy.psnr(images / 255.0, np.clip(got.inputs / 255.0, 0, 1)))
    assert quality["quantize:bits=8"] > quality["quantize:bits=4"]
    assert quality["topk:fraction=0.1"] > quality["topk:fraction=0.01"]
    assert np.isfinite(list(quality.values())).all()


def test_a_model_without_a_dense_first_layer_is_refused(package_and_images):
    package, _, _ = package_and_images
    with pytest.raises(ValueError, match="gradient matching"):
        privacy.reconstruct(package, functional.ModelFunctions(nd.models.cnn()))


STEPS = 50  # ~1 s of optimisation per step on two busy cores


@pytest.fixture(scope="module")
def cnn_package(fashion):
    """Four real images' package from the CNN at its initial weights (seeded)."""
    (x, y), _ = fashion
    images, labels = x[:4], y[:4].astype(np.int32)
    tf.keras.utils.set_random_seed(0)
    fns = functional.ModelFunctions(nd.models.cnn())
    weights = fns.initial_weights()
    return (privacy.jacobian_package(fns, weights, images, labels), images, fns, weights,
            x[:1000].mean())


def test_gradient_matching_recovers_cnn_inputs(cnn_package):
    package, images, fns, weights, pixel_mean = cnn_package
    start = privacy.match_gradients(package, fns, weights, steps=0, seed=0)
    got = privacy.match_gradients(package, fns, weights, steps=STEPS, seed=0)
    quality = {name: np.median(privacy.psnr(images / 255.0, rec / 255.0)) for name, rec in (
        ("start", start.inputs), ("matched", got.inputs),
        ("mean image", np.full(images.shape, pixel_mean)))}
    assert quality["matched"] > quality["start"] + 6, quality
    assert quality["matched"] > quality["mean image"] + 4, quality
    assert np.median(got.distance) < np.median(start.distance) / 10, (start.distance, got.distance)
    assert got.recovered.all() and got.inputs.min() >= 0 and got.inputs.max() <= 255
    np.testing.assert_array_equal(got.labels, package.labels)


def exact_gaussian_epsilon(sigma, delta):
    """The exact ε of one Gaussian release of sensitivity 1 (Balle & Wang 2018, Theorem 8):
    the root of Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ) = δ, found by bisection."""
    from scipy.special import log_ndtr, ndtr

    def delta_of(eps):
        return ndtr(0.5 / sigma - eps * sigma) - np.exp(eps + log_ndtr(-0.5 / sigma - eps * sigma))

    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
@pytest.mark.parametrize("classic_epsilon", [0.1, 0.5, 0.9])
def test_one_release_lies_between_the_exact_and_the_classic_bound(classic_epsilon, delta):
    # The classic bound: sigma >= sqrt(2 ln(1.25/delta)) / eps gives (eps, delta)-DP for eps < 1.
    sigma = np.sqrt(2 * np.log(1.25 / delta)) / classic_epsilon
    rdp = privacy.gaussian_epsilon(sigma, 1, delta)
    exact = exact_gaussian_epsilon(sigma, delta)
    assert exact <= rdp <= classic_epsilon, (exact, rdp, classic_epsilon)
    assert rdp < 1.5 * exact  # a sound bound, and not a vacuous one


@pytest.mark.parametrize("sigma,compositions", [(2.0, 10), (5.0, 100), (30.0, 5000)])
def test_k_releases_compose_like_one_release_with_less_noise(sigma, compositions):
    # Gaussian RDP is a/(2 sigma^2): k releases of sigma are one release of sigma/sqrt(k).
    delta = 1e-6
    composed = privacy.gaussian_epsilon(sigma, compositions, delta)
    single = privacy.gaussian_epsilon(sigma / np.sqrt(compositions), 1, delta)
    assert composed == pytest.approx(single, rel=1e-6)
    # and no bound may beat the exact epsilon of that equivalent single release
    assert composed >= exact_gaussian_epsilon(sigma / np.sqrt(compositions), delta)


def test_epsilon_falls_with_noise_and_grows_with_releases_and_smaller_delta():
    noises = [0.7, 1.0, 2.0, 4.0, 16.0]
    by_noise = [privacy.gaussian_epsilon(s, 10, 1e-5) for s in noises]
    assert np.all(np.diff(by_noise) < 0), by_noise
    by_count = [privacy.gaussian_epsilon(4.0, k, 1e-5) for k in (1, 2, 10, 100, 1000)]
    assert np.all(np.diff(by_count) > 0), by_count
    by_delta = [privacy.gaussian_epsilon(4.0, 10, d) for d in (1e-3, 1e-5, 1e-7)]
    assert np.all(np.diff(by_delta) > 0), by_delta


@pytest.mark.parametrize("epsilon,compositions,delta",
                         [(0.01, 1, 1e-9), (0.5, 1, 1e-5), (1.0, 100, 1e-5), (8.0, 1000, 1e-6),
                          (100.0, 3, 1e-2)])
def test_noise_for_inverts_epsilon(epsilon, compositions, delta):
    sigma = privacy.gaussian_noise_for(epsilon, compositions, delta)
    got = privacy.gaussian_epsilon(sigma, compositions, delta)
    assert got <= epsilon * (1 + 1e-9)  # within budget
    assert got == pytest.approx(epsilon, rel=0.01)
    assert privacy.gaussian_epsilon(sigma * 0.99, compositions, delta) > epsilon  # the smallest


@pytest.mark.parametrize("args,match", [
    ((0.0, 1, 1e-5), "noise_multiplier.*0.0"), ((-1.0, 1, 1e-5), "noise_multiplier.*-1.0"),
    ((1.0, 0, 1e-5), "compositions.*0"), ((1.0, 2.5, 1e-5), "compositions.*2.5"),
    ((1.0, 1, 0.0), r"delta.*\(0, 1\).*0.0"), ((1.0, 1, 1.0), "delta.*1.0"),
    ((float("nan"), 1, 1e-5), "noise_multiplier.*nan")])
def test_accounting_arguments_are_checked(args, match):
    with pytest.raises(ValueError, match=match):
        privacy.gaussian_epsilon(*args)
    with pytest.raises(ValueError, match=match.replace("noise_multiplier", "epsilon")):
        privacy.gaussian_noise_for(*args)


def test_a_missing_accountant_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails
    with pytest.raises(ImportError, match=r"ntkdfl_tf\[privacy\]"):
        privacy.gaussian_epsilon(1.0, 1, 1e-5)


def test_gradient_matching_converges_to_the_exact_mlp_inputs(package_and_images):
    package, images, fns = package_and_images
    weights = fns.initial_weights()  # the module fixture's package was taken at these
    got = privacy.match_gradients(_first(package, 4), fns, weights, steps=150, seed=1)
    quality = privacy.psnr(images[:4] / 255.0, got.inputs / 255.0)
    assert quality.min() > 40, quality  # the exact answer is at inf; noise starts near 6 dB


def _first(package, n):
    """A package of the first ``n`` samples of ``package``."""
    jac = [j[:n] for j in package.jacobians]
    lazy = nd.protocol.JacobianPackage(package.sender, package.receiver, nd.protocol.package_specs(
        n, package.logits.shape[1], [j.shape[2:] for j in jac]))
    return lazy.materialise(jac, package.logits[:n], package.labels[:n])


def test_gradient_matching_needs_the_arrays_and_fitting_weights(package_and_images):
    package, _, fns = package_and_images
    lazy = nd.protocol.JacobianPackage(0, 1, package.specs)
    with pytest.raises(ValueError, match="materialise"):
        privacy.match_gradients(lazy, fns, fns.initial_weights())
    with pytest.raises(ValueError, match="weights of shapes"):
        privacy.match_gradients(package, fns, fns.initial_weights()[:-1])
    with pytest.raises(ValueError, match="distance"):
        privacy.match_gradients(package, fns, fns.initial_weights(), distance="l1")
    narrow = functional.ModelFunctions(nd.models.mlp(hidden=(50,)))
    with pytest.raises(ValueError, match="Jacobians .* do not fit"):
        privacy.match_gradients(package, narrow, narrow.initial_weights())
