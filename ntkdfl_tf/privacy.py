"""What a neighbour learns from a Jacobian package.

For a model whose first trainable layer is Dense, z = x W1 + b1, the per-sample Jacobian blocks
are d f_c / d W1[i, j] = x_i * d f_c / d b1[j]: every column of the W1 block is the input scaled
by one bias entry. So the receiver recovers each input exactly (Phong et al. 2018; Geiping et
al., NeurIPS 2020), and the package carries the label besides. ``reconstruct`` does what a
receiver would: a least-squares ratio of the two blocks over every class and unit, then the
model's own preprocessing inverted, so the result is in the model's raw input units.

Any other first layer (a Conv2D) needs optimisation: ``match_gradients`` searches for inputs
whose per-sample Jacobians at the package's weights match the package's (after Geiping et al.,
"Inverting Gradients", 2020: a Jacobian distance plus total variation, by Adam), all samples at
once.

``psnr`` measures how much of an image survives a lossy codec.

``gaussian_epsilon`` and ``gaussian_noise_for`` account for the Gaussian mechanism (noise of
standard deviation ``noise_multiplier`` x the L2 clip norm added to each release) with the
Rényi-DP accountant of Google's ``dp-accounting`` package (``pip install "ntkdfl_tf[privacy]"``).
"""

import math
import typing

import keras
import numpy as np
import tensorflow as tf

from ntkdfl_tf import protocol
from ntkdfl_tf.kernels import explicit


class Reconstruction(typing.NamedTuple):
    """What one package gives away.

    Attributes:
        inputs: ``[n, *input_shape]`` the recovered raw inputs (the units the model takes).
        labels: ``[n]`` the labels the package carries.
        recovered: ``[n]`` bool: the bias block was non-zero, so the ratio is defined
            (``reconstruct``), or the search ended at a finite distance (``match_gradients``).
        distance: ``[n]`` the final Jacobian distance of each guess (``match_gradients``; the
            receiver's own measure of success, it has no original to compare with), else None.
    """

    inputs: np.ndarray
    labels: np.ndarray
    recovered: np.ndarray
    distance: typing.Optional[np.ndarray] = None


def jacobian_package(fns, weights, images, labels, sender=0, receiver=1):
    """The materialised package a client holding ``images`` sends to a receiver whose averaged
    weights are ``weights`` (one client's list, no client axis): Jacobians, logits, labels."""
    weights = [tf.constant(w, tf.float32) for w in weights]
    feats = fns.features(images)
    jac = [j.numpy() for j in explicit.jacobian(fns, weights, feats)]
    logits = fns.forward([w[None] for w in weights], feats)[0].numpy()
    specs = protocol.package_specs(len(images), fns.num_classes, fns.shapes)
    return protocol.JacobianPackage(sender, receiver, specs).materialise(
        jac, logits, np.asarray(labels, np.int32))


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
                         "trainable layer is not one: recover its inputs by gradient matching "
                         "(privacy.match_gradients).")
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


def match_gradients(package, fns, weights, steps=300, learning_rate=0.3, distance="l2",
                    total_variation=1e-2, logit_weight=0.0, input_range=(0.0, 255.0), init=None,
                    seed=0):
    """Inputs whose per-sample Jacobians match a package's, found by gradient descent.

    What a receiver can do for any architecture: it knows the weights at which the package was
    evaluated (its own averaged weights), the model, and the package's Jacobians, logits and
    labels. Starting from noise, Adam (cosine-decayed step) moves dummy inputs so that each
    one's per-sample Jacobian ``[C, P]`` at ``weights`` approaches the package's, with a total
    variation prior on images (as Geiping et al., NeurIPS 2020) and optionally a logit match. All
    samples move at once in one traced step; the search runs in ``[0, 1]`` units of
    ``input_range`` and is projected onto that box after every step. Each step forms the
    guesses' Jacobians and differentiates through them: memory grows as n x C x P (8 CNN
    samples: ~60 MB a copy), so split a large package.

    Args:
        package: a materialised ``JacobianPackage`` (``JacobianPackage.materialise``), as the
            receiver decoded it (after any codec).
        fns: the model's ``ModelFunctions``.
        weights: the weights the package was evaluated at, a list aligned with
            ``fns.shapes`` (one client, no client axis).
        steps: optimiser steps; 0 returns the starting guess with its distance.
        learning_rate: Adam's initial step in ``[0, 1]`` input units.
        distance: ``"l2"``, the squared difference of the flattened Jacobians relative to
            the package's squared norm, or ``"cosine"``, one minus their cosine similarity
            (Geiping et al.'s choice, blind to scale; on the CNN's exact package the L2
            distance recovers more, and on the MLP it converges to the exact inputs).
        total_variation: weight of the mean absolute difference between neighbouring pixels
            (in ``[0, 1]`` units; images ``[H, W, channels]`` only, else give 0).
        logit_weight: weight of the logits' squared difference relative to the package's.
        input_range: ``(low, high)`` of a raw input, the box the search stays in (0..255 for
            the models of ``ntkdfl_tf.models``, whose preprocessing is inside the model).
        init: the starting raw inputs ``[n, *input_shape]``; None: uniform noise in the box.
        seed: seed of the starting noise.

    Returns:
        A ``Reconstruction``: the final guesses in raw input units, the package's labels,
        and each guess's final Jacobian ``distance``.

    Raises:
        ValueError: a lazy package, weights or Jacobians of other shapes than the model's, an
            unknown ``distance``, a negative weight or step count, an empty ``input_range``, or
            total variation asked for inputs that are not images.
    """
    if package.lazy:
        raise ValueError("match_gradients needs the package's arrays: materialise it first.")
    shapes = [tuple(np.shape(w)) for w in weights]
    if shapes != [tuple(s) for s in fns.shapes]:
        raise ValueError(f"weights of shapes {shapes} do not fit the model's {fns.shapes}.")
    n = package.num_samples
    jac_shapes = [tuple(j.shape) for j in package.jacobians]
    expected = [(n, fns.num_classes) + tuple(s) for s in fns.shapes]
    if jac_shapes != expected:
        raise ValueError(f"the package's Jacobians {jac_shapes} do not fit the model's "
                         f"{expected}.")
    if distance not in ("cosine", "l2"):
        raise ValueError(f"distance must be 'cosine' or 'l2', not {distance!r}.")
    for name, value in (("steps", steps), ("total_variation", total_variation),
                        ("logit_weight", logit_weight), ("learning_rate", learning_rate)):
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative, got {value}.")
    low, high = (float(v) for v in input_range)
    if not high > low:
        raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}.")
    input_shape = tuple(fns.model.input_shape[1:])
    if total_variation and len(input_shape) != 3:
        raise ValueError(f"total variation needs image inputs [H, W, channels], not "
                         f"{input_shape}: give total_variation=0.")
    if init is None:
        start = np.random.default_rng(seed).uniform(size=(n,) + input_shape)
    else:
        start = (np.asarray(init, np.float64) - low) / (high - low)
        if start.shape != (n,) + input_shape:
            raise ValueError(f"init has shape {start.shape}, not {(n,) + input_shape}.")

    weights = [tf.constant(w, tf.float32) for w in weights]
    target = tf.concat([tf.reshape(tf.constant(j, tf.float32), [n, -1])
                        for j in package.jacobians], axis=-1)  # [n, C * P]
    target_sq = tf.reduce_sum(target ** 2, axis=-1)
    target_logits = tf.constant(package.logits, tf.float32)
    logits_sq = tf.maximum(tf.reduce_sum(target_logits ** 2, axis=-1), 1e-12)
    guess = tf.Variable(np.clip(start, 0, 1), dtype=tf.float32)

    def objective():
        """Per-sample Jacobian distance [n] and the scalar loss."""
        feats = fns.features(low + (high - low) * guess)
        jac = explicit.jacobian(fns, weights, feats)
        flat = tf.concat([tf.reshape(j, [n, -1]) for j in jac], axis=-1)
        if distance == "cosine":
            dot = tf.reduce_sum(flat * target, axis=-1)
            norms = tf.sqrt(tf.reduce_sum(flat ** 2, axis=-1) * target_sq)
            per_sample = 1.0 - dot / tf.maximum(norms, 1e-30)
        else:
            per_sample = (tf.reduce_sum((flat - target) ** 2, axis=-1)
                          / tf.maximum(target_sq, 1e-30))
        loss = tf.reduce_mean(per_sample)
        if total_variation:
            loss += total_variation * (
                tf.reduce_mean(tf.abs(guess[:, 1:] - guess[:, :-1]))
                + tf.reduce_mean(tf.abs(guess[:, :, 1:] - guess[:, :, :-1])))
        if logit_weight:
            logits = fns.forward([w[None] for w in weights], feats)[0]
            loss += logit_weight * tf.reduce_mean(
                tf.reduce_sum((logits - target_logits) ** 2, axis=-1) / logits_sq)
        return per_sample, loss

    if steps:
        schedule = keras.optimizers.schedules.CosineDecay(float(learning_rate), int(steps))
        optimizer = keras.optimizers.Adam(schedule)
        optimizer.build([guess])

        @tf.function
        def search():
            for _ in tf.range(int(steps)):  # one traced loop, no Python round trip per step
                with tf.GradientTape() as tape:
                    _, loss = objective()
                optimizer.apply_gradients([(tape.gradient(loss, guess), guess)])
                guess.assign(tf.clip_by_value(guess, 0.0, 1.0))

        search()
    final = tf.function(objective)()[0].numpy()
    inputs = low + (high - low) * guess.numpy().astype(np.float64)
    return Reconstruction(inputs, np.asarray(package.labels), np.isfinite(final), final)


def psnr(original, recovered, peak=1.0):
    """Peak signal-to-noise ratio per image in dB (inf for an exact copy)."""
    original, recovered = (np.asarray(a, np.float64).reshape(len(a), -1)
                           for a in (original, recovered))
    mse = np.mean((original - recovered) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak ** 2 / mse)


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as err:
        raise ImportError("privacy accounting needs Google's dp-accounting package: "
                          'pip install "ntkdfl_tf[privacy]" (or pip install dp-accounting).'
                          ) from err
    return dp_accounting


def _check_accounting(compositions, delta, **positive):
    for name, value in positive.items():
        if not (isinstance(value, (int, float, np.integer, np.floating)) and value > 0
                and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    if not (isinstance(compositions, (int, np.integer)) and compositions >= 1):
        raise ValueError(f"compositions must be a positive integer, got {compositions!r}.")
    if not (isinstance(delta, (int, float, np.integer, np.floating)) and 0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}.")


def _accountant(dp_accounting):
    """An RDP accountant at dp-accounting's default orders (1.1 ... 1024) and powers of two on
    to 2^20: a tight small ε needs high orders (ε >= log(1/δ) / (order - 1) whatever the noise,
    so the default orders floor ε at 0.0125 for δ = 1e-9)."""
    default = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    return dp_accounting.rdp.RdpAccountant(
        list(default) + [2.0 ** k for k in range(11, 21) if 2.0 ** k > max(default)])


def _gaussian_event(dp_accounting, noise_multiplier, compositions):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(float(noise_multiplier)), int(compositions))


def gaussian_epsilon(noise_multiplier, compositions, delta):
    """The ε for which ``compositions`` releases of a Gaussian mechanism are (ε, δ)-DP together.

    Each release adds Gaussian noise of standard deviation ``noise_multiplier`` times the
    release's L2 sensitivity (its clip norm). The Rényi-DP accountant of ``dp-accounting``
    (Mironov 2017) composes the releases and converts to (ε, δ); for one release it is looser
    than the exact analytic bound (Balle & Wang 2018), and tight in its growth with the count.

    Args:
        noise_multiplier: noise standard deviation over the L2 sensitivity, > 0.
        compositions: how many releases (e.g. rounds x packages a sample appears in), >= 1.
        delta: the δ of the guarantee, in (0, 1).

    Returns:
        ε (float, inf if no finite ε holds at the accountant's orders).

    Raises:
        ValueError: a non-positive noise multiplier or count, or δ outside (0, 1).
        ImportError: ``dp-accounting`` is not installed.
    """
    _check_accounting(compositions, delta, noise_multiplier=noise_multiplier)
    dp_accounting = _dp_accounting()
    accountant = _accountant(dp_accounting)
    accountant.compose(_gaussian_event(dp_accounting, noise_multiplier, compositions))
    return float(accountant.get_epsilon(float(delta)))


def gaussian_noise_for(epsilon, compositions, delta):
    """The smallest noise multiplier whose ``compositions`` releases are (ε, δ)-DP.

    The inverse of ``gaussian_epsilon``, by ``dp_accounting.calibrate_dp_mechanism`` (a
    bracketed root search; the result never exceeds the budget, to 1e-6 relative).

    Args:
        epsilon: the ε budget, > 0.
        compositions: how many releases, >= 1.
        delta: the δ of the guarantee, in (0, 1).

    Returns:
        The noise multiplier (noise standard deviation over the L2 sensitivity).

    Raises:
        ValueError: a non-positive ε or count, or δ outside (0, 1).
        ImportError: ``dp-accounting`` is not installed.
    """
    _check_accounting(compositions, delta, epsilon=epsilon)
    dp_accounting = _dp_accounting()
    # The classic single-release bound with sqrt(compositions) as a starting guess; the
    # search brackets the root upward from far below it, then refines it by Brent's method.
    guess = math.sqrt(2 * compositions * math.log(1.25 / delta)) / epsilon
    bracket = dp_accounting.LowerEndpointAndGuess(guess / 16, guess)
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(dp_accounting),
        lambda sigma: _gaussian_event(dp_accounting, sigma, compositions),
        float(epsilon), float(delta), bracket, tol=guess * 1e-7))
