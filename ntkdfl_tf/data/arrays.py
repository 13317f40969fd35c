"""from_arrays: users' own NumPy data in the form ``load`` returns."""

import numpy as np


def _checked(x, y, what):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"The {what} data needs x of shape (n, ...) and y of shape (n,) with "
                         f"n > 0; got x {x.shape} and y {y.shape}.")
    if x.ndim == 3:  # (n, height, width): one channel
        x = x[..., None]
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"The {what} inputs must be numbers, got dtype {x.dtype}.")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"The {what} inputs contain NaN or inf; clean the data first.")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)
                           or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise ValueError(f"The {what} labels must be class ids of shape (n,), got dtype {y.dtype} "
                         f"and shape {y.shape}; convert one-hot labels with argmax(axis=-1).")
    if y.min() < 0:
        raise ValueError(f"The {what} labels must be class ids >= 0, got {y.min()}.")
    return x, y.astype(np.int64)


def from_arrays(x, y, x_test=None, y_test=None, test_fraction=0.2, seed=0):
    """Your own data as ``((x_train, y_train), (x_test, y_test))``, like ``load`` returns.

    Images of shape (n, height, width) get a channel axis; labels become int64. Without a test
    set, a seeded ``test_fraction`` of the samples is held out. Models built with
    ``ntkdfl_tf.models.for_data(x_train, y_train)`` take their input shape, class count and
    input standardisation from the result.

    Args:
        x, y: inputs (n, ...) (uint8 pixels or other numbers) and integer class ids (n,).
        x_test, y_test: the test set, or None to split one off.
        test_fraction: share held out for the test set when none is given.
        seed: seed of that split.

    Raises:
        ValueError: mismatched or empty arrays, non-numeric or non-finite inputs, labels that
            are not class ids, test inputs of another shape; the message names the value.
    """
    x, y = _checked(x, y, "training")
    if x_test is None and y_test is None:
        if not 0 < test_fraction < 1 or int(len(y) * test_fraction) < 1:
            raise ValueError(f"test_fraction={test_fraction!r} must lie in (0, 1) and hold out "
                             f"at least one of the {len(y)} samples.")
        order = np.random.default_rng(seed).permutation(len(y))
        held = int(len(y) * test_fraction)
        return (x[order[held:]], y[order[held:]]), (x[order[:held]], y[order[:held]])
    x_test, y_test = _checked(x_test, y_test, "test")
    if x_test.shape[1:] != x.shape[1:]:
        raise ValueError(f"Test inputs have per-sample shape {x_test.shape[1:]} but training "
                         f"inputs {x.shape[1:]}; pass matching arrays.")
    return (x, y), (x_test, y_test)
