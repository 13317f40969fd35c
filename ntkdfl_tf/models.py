"""Model factories. Preprocessing lives inside the model, so a saved model takes raw images."""

import functools

import keras
import numpy as np

from ntkdfl_tf.data import STATS


def _standardise(dataset, input_shape, pixel_stats):
    mean, std = STATS[dataset] if pixel_stats is None else pixel_stats
    # One affine layer: (x/255 - mean)/std, applied to images as tfds gives them (uint8 -> float).
    return [keras.Input(shape=input_shape),
            keras.layers.Rescaling(scale=1.0 / (255.0 * std), offset=-mean / std)]


def mlp(dataset="fashion_mnist", hidden=(100,), num_classes=10, input_shape=(28, 28, 1),
        pixel_stats=None):
    """MLP 784-100-10 with ReLU, He-normal (fan-in) weights and zero biases (the paper's model).

    Args:
        dataset: whose pixel mean/std the built-in standardisation uses (a bundled one).
        hidden: widths of the hidden ReLU layers.
        num_classes: number of output logits.
        input_shape: shape of one raw input image.
        pixel_stats: ``(mean, std)`` of the inputs divided by 255, replacing ``dataset``'s
            (``for_data`` computes them).

    Returns:
        An uncompiled ``keras.Sequential`` producing logits.
    """
    layers = _standardise(dataset, input_shape, pixel_stats) + [keras.layers.Flatten()]
    layers += [keras.layers.Dense(h, activation="relu", kernel_initializer="he_normal")
               for h in hidden]
    layers += [keras.layers.Dense(num_classes, kernel_initializer="he_normal")]
    return keras.Sequential(layers, name="mlp")


def cnn(dataset="fashion_mnist", num_classes=10, input_shape=(28, 28, 1), pixel_stats=None):
    """The reference's small CNN: conv32 3x3 - pool - conv64 3x3 - pool - dense 100 - dense C.

    Args: as ``mlp`` (images need at least 10 x 10 pixels).
    """
    layers = _standardise(dataset, input_shape, pixel_stats) + [
        keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer="he_normal"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu", kernel_initializer="he_normal"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(100, activation="relu", kernel_initializer="he_normal"),
        keras.layers.Dense(num_classes, kernel_initializer="he_normal"),
    ]
    return keras.Sequential(layers, name="cnn")


MODELS = {"mlp": mlp, "cnn": cnn}


def for_data(x, y, model="mlp", **kwargs):
    """A ``model_fn`` for ``DecentralizedTrainer`` shaped by the training data.

    The input shape is ``x``'s per-sample shape, the class count ``max(y) + 1`` and the
    built-in standardisation uses ``x``'s own mean and std, so any ``nd.data.load`` or
    ``nd.data.from_arrays`` dataset fits. The function holds only these numbers, not the data.

    Args:
        x, y: training inputs (n, ...) and int class ids (n,).
        model: ``"mlp"`` or ``"cnn"``.
        **kwargs: passed on to the factory, e.g. ``hidden=(200,)``.

    Returns:
        A function with no arguments returning a fresh ``keras.Model``.

    Raises:
        ValueError: unknown ``model``.
    """
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}.")
    x = np.asarray(x)
    std = float(x.std(dtype=np.float64)) / 255.0
    stats = (float(x.mean(dtype=np.float64)) / 255.0, std if std > 0 else 1.0)
    return functools.partial(MODELS[model], num_classes=int(np.max(y)) + 1,
                             input_shape=tuple(int(d) for d in x.shape[1:]), pixel_stats=stats,
                             **kwargs)
