"""Shared fixtures: real Fashion-MNIST found offline (../shared/data unless NTKDFL_DATA_DIR is set)."""

import os

import numpy as np
import pytest

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if "NTKDFL_DATA_DIR" not in os.environ and os.path.isdir(_SHARED):
    os.environ["NTKDFL_DATA_DIR"] = os.path.abspath(_SHARED)


@pytest.fixture(scope="session")
def fashion():
    """Fashion-MNIST as tfds gives it: ((x_train, y_train), (x_test, y_test))."""
    import ntkdfl_tf as nd

    return nd.data.load("fashion_mnist")


@pytest.fixture(scope="session")
def small_fashion(fashion):
    """A few thousand real samples: 20 clients of ~100 (alpha=0.1) and 2,000 test images."""
    import ntkdfl_tf as nd

    (x_train, y_train), (x_test, y_test) = fashion
    clients = nd.data.dirichlet_partition(x_train, y_train, num_clients=20, alpha=0.1, seed=0,
                                          samples_per_client=100)
    rng = np.random.default_rng(0)
    test = rng.choice(len(y_test), 2000, replace=False)
    return clients, (x_test[test], y_test[test])


@pytest.fixture(scope="session")
def tiny(small_fashion):
    """8 clients of 30 real samples each and 300 test images: fast end-to-end runs."""
    import ntkdfl_tf as nd

    clients, test = small_fashion
    sub = nd.data.ClientData.from_indices(
        clients.x.reshape((-1,) + clients.x.shape[2:]), clients.y.reshape(-1),
        [np.arange(k * clients.max_samples, k * clients.max_samples + 30) for k in range(8)])
    return sub, (test[0][:300], test[1][:300])


@pytest.fixture
def one_line_error():
    """``check(fn, *args, names=...)``: ``fn(*args)`` raises a one-line ValueError naming each
    of ``names``; returns the message."""

    def check(fn, *args, names=()):
        with pytest.raises(ValueError) as err:
            fn(*args)
        message = str(err.value)
        assert "\n" not in message
        for name in names:
            assert name in message, (name, message)
        return message

    return check
