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
    weights = [tf.constant(w) for w in fns.initial_weights()]
    feats = fns.features(images)
    jac = [j.numpy() for j in nd.kernels.jacobian(fns, weights, feats)]
    logits = fns.forward([w[None] for w in weights], feats)[0].numpy()
    lazy = nd.protocol.JacobianPackage(0, 1, nd.protocol.package_specs(8, 10, fns.shapes))
    return lazy.materialise(jac, logits, labels), images, fns


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
