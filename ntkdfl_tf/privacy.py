"""What a neighbour learns from a Jacobian package.

For a model whose first trainable layer is Dense, z = x W1 + b1, the per-sample Jacobian blocks
are d f_c / d W1[i, j] = x_i * d f_c / d b1[j]: every column of the W1 block is the input scaled
by one bias entry. So the receiver recovers each input exactly (Phong et al. 2018; Geiping et
al., NeurIPS 2020), and the package carries the label besides. ``reconstruct`` does what a
receiver would: a least-squares ratio of the two blocks over every class and unit, then the
model's own preprocessing inverted, so the result is in the model's raw input units.

``psnr`` measures how much of an image survives a lossy codec.
"""

import typing

import keras
import numpy as np


class Reconstruction(typing.NamedTuple):
    """What one package gives away.

    Attributes:
        inputs: ``[n, *input_shape]`` the recovered raw inputs (the units the model takes).
        labels: ``[n]`` the labels the package carries.
        recovered: ``[n]`` bool: the bias block was non-zero, so the ratio is defined.
    """

    inputs: np.ndarray
    labels: np.ndarray
    recovered: np.ndarray


def reconstruct(package, fns):
    """The inputs and labels a receiver recovers from a materialised ``JacobianPackage``.

    Args:
        package: a materialised package (``JacobianPackage.materialise``), as the receiver
            decoded it (after any codec).
        fns: the model's ``ModelFunctions`` (the receiver knows the architecture).

    Raises:
        ValueError: a lazy package, or a model whose first trainable layer is not a Dense
            layer with a bias after invertible preprocessing (then recovery needs optimisation,
            as for a Conv2D first layer).
    """
    if package.lazy:
        raise ValueError("reconstruct needs the package's arrays: materialise it first.")
    if not fns.is_dense_stack or fns.dense_specs[0].bias < 0:
        raise ValueError("reconstruct inverts a first Dense layer with a bias; this model's first "
                         "trainable layer is not one (recovery would need gradient matching).")
    first = fns.dense_specs[0]
    kernel = np.asarray(package.jacobians[first.kernel], np.float64)  # [n, C, d, h]
    bias = np.asarray(package.jacobians[first.bias], np.float64)  # [n, C, h]
    weight = np.sum(bias ** 2, axis=(1, 2))  # [n]
    features = np.einsum("ncdh,nch->nd", kernel, bias) / np.maximum(weight, 1e-300)[:, None]
    return Reconstruction(invert_preprocessing(fns, features), np.asarray(package.labels),
                          weight > 0)


def invert_preprocessing(fns, features):
    """Raw inputs from first-layer features, undoing the model's weightless prefix.

    Supports ``Rescaling`` (affine) and ``Flatten``/``Reshape`` layers.
    """
    x = np.asarray(features, np.float64)
    shape = tuple(fns.model.input_shape[1:])
    for layer in reversed(fns.prefix_layers):
        if isinstance(layer, keras.layers.Rescaling):
            x = (x - float(np.asarray(layer.offset))) / float(np.asarray(layer.scale))
        elif isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
            continue  # the shape is restored at the end
        else:
            raise ValueError(f"cannot invert the preprocessing layer {layer.name!r} "
                             f"({type(layer).__name__}).")
    return x.reshape((len(x),) + shape)


def psnr(original, recovered, peak=1.0):
    """Peak signal-to-noise ratio per image in dB (inf for an exact copy)."""
    original, recovered = (np.asarray(a, np.float64).reshape(len(a), -1)
                           for a in (original, recovered))
    mse = np.mean((original - recovered) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak ** 2 / mse)
