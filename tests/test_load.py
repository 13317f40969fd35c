"""Offline dataset loading: re-gzipped (Debian-style) files, checksum and not-found errors.

tfds itself is never called here (``_tfds_load`` is replaced); the end-to-end tfds path is tested
elsewhere.
"""

import gzip
import importlib
import io
import os
import re
import shutil

import numpy as np
import pytest

import ntkdfl_tf as nd

load_module = importlib.import_module("ntkdfl_tf.data.load")  # nd.data.load is the function
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _source_dir():
    root = os.environ.get("NTKDFL_DATA_DIR")
    if not root or not os.path.isdir(os.path.join(root, "mnist")):
        pytest.skip("NTKDFL_DATA_DIR is not set to a folder holding mnist/*.gz")
    return os.path.join(root, "mnist")


def _regzip(raw, path):
    """Writes ``raw`` gzipped with a header unlike upstream's (file name, mtime 0, fast level)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="renamed", mode="wb", fileobj=buf, mtime=0, compresslevel=1) as f:
        f.write(raw)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture(scope="module")
def regzipped(tmp_path_factory):
    """``<tmp>/mnist/*.gz``: MNIST re-gzipped (same content, other .gz bytes), and the raw IDX."""
    source = _source_dir()
    root = tmp_path_factory.mktemp("debian")
    (root / "mnist").mkdir()
    raw = {}
    for name in FILES:
        with gzip.open(os.path.join(source, name + ".gz"), "rb") as f:
            raw[name] = f.read()
        _regzip(raw[name], root / "mnist" / (name + ".gz"))
        original = open(os.path.join(source, name + ".gz"), "rb").read()
        assert (root / "mnist" / (name + ".gz")).read_bytes() != original
    return root, raw


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No tfds, no environment folder, no Debian folder: only what a test passes explicitly."""
    def no_tfds(*args, **kwargs):
        raise ConnectionError("offline (tfds disabled in this test)")

    monkeypatch.setattr(load_module, "_tfds_load", no_tfds)
    monkeypatch.delenv("NTKDFL_DATA_DIR", raising=False)
    monkeypatch.setattr(load_module, "DEBIAN_DIRS", {})


def _idx(raw, header):
    return np.frombuffer(raw, np.uint8, offset=header)


def test_regzipped_files_load_without_tfds(regzipped):
    """Debian-style .gz files load offline with tfds's shapes and dtypes and the exact content."""
    root, raw = regzipped
    (x_train, y_train), (x_test, y_test) = nd.data.load("mnist", data_dir=str(root))
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == x_test.dtype == np.uint8
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert y_train.dtype == y_test.dtype == np.int64
    assert y_train.min() >= 0 and y_train.max() < 10 and len(np.unique(y_test)) == 10
    np.testing.assert_array_equal(x_test.ravel(), _idx(raw["t10k-images-idx3-ubyte"], 16))
    np.testing.assert_array_equal(y_train, _idx(raw["train-labels-idx1-ubyte"], 8))


def test_dataset_folder_itself_is_accepted(regzipped):
    """data_dir may point at the folder holding the files, not only at its parent."""
    root, raw = regzipped
    (_, _), (_, y_test) = nd.data.load("mnist", data_dir=str(root / "mnist"))
    np.testing.assert_array_equal(y_test, _idx(raw["t10k-labels-idx1-ubyte"], 8))


@pytest.mark.parametrize("damage", ["content", "not_gzip"])
def test_corrupted_file_raises_checksum_error(regzipped, tmp_path, damage):
    """A file with changed content (or not gzip at all) raises DataChecksumError naming it."""
    root, raw = regzipped
    folder = tmp_path / "mnist"
    shutil.copytree(root / "mnist", folder)
    if damage == "content":
        bad = folder / "train-labels-idx1-ubyte.gz"
        labels = bytearray(raw["train-labels-idx1-ubyte"])
        labels[100] = (labels[100] + 1) % 10
        _regzip(bytes(labels), bad)
    else:
        bad = folder / "train-images-idx3-ubyte.gz"
        bad.write_bytes(b"definitely not gzip")
    with pytest.raises(nd.data.DataChecksumError, match="mnist") as excinfo:
        nd.data.load("mnist", data_dir=str(tmp_path))
    assert str(bad) in str(excinfo.value)


def test_unknown_dataset_raises():
    """A name tfds does not know raises ValueError naming it."""
    with pytest.raises(ValueError, match="'no_such_dataset'"):
        nd.data.load("no_such_dataset")


def test_other_tfds_dataset_without_a_prepared_copy_offline_raises_data_not_found():
    """A tfds image dataset that tfds cannot provide (here: tfds disabled) says how to fix it."""
    with pytest.raises(nd.data.DataNotFoundError, match="kmnist.*ConnectionError.*tfds_data_dir"):
        nd.data.load("kmnist")


@pytest.mark.parametrize("name", nd.data.DATASETS)
def test_missing_files_offline_raise_data_not_found(tmp_path, monkeypatch, name):
    """No local files and tfds unavailable: DataNotFoundError lists the folders and the fix."""
    env_dir = tmp_path / "env"
    monkeypatch.setenv("NTKDFL_DATA_DIR", str(env_dir))
    with pytest.raises(nd.data.DataNotFoundError) as excinfo:
        nd.data.load(name, data_dir=str(tmp_path / "given"))
    message = str(excinfo.value)
    for folder in (tmp_path / "given", tmp_path / "given" / name, env_dir):
        assert str(folder) in message
    assert "NTKDFL_DATA_DIR" in message and "ConnectionError" in message
    assert isinstance(excinfo.value, FileNotFoundError)


def test_incomplete_folder_is_not_used(regzipped, tmp_path):
    """A folder missing one of the four files is skipped (not found), not half-loaded."""
    root, _ = regzipped
    shutil.copytree(root / "mnist", tmp_path / "mnist")
    os.remove(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(nd.data.DataNotFoundError, match=re.escape(str(tmp_path / "mnist"))):
        nd.data.load("mnist", data_dir=str(tmp_path))
