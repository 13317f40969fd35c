"""The checkpoint file: round trip, the previous checkpoint kept, damage detected (issue 5)."""

import json
import os
import re
import zipfile

import numpy as np
import pytest

import ntkdfl_tf as nd
from ntkdfl_tf import checkpoint


def _state(round_=3, **extra):
    rng = np.random.default_rng(round_)
    return {"round": round_, "seed": 7, "streams": {"init": 0, "topology": 2}, "algorithm": "x",
            "num_clients": 2,
            "weights": [rng.normal(size=(2, 3, 4)).astype(np.float32),
                        rng.normal(size=(2, 5)).astype(np.float32), np.arange(5.0),
                        rng.integers(0, 9, size=(2, 2))], **extra}


def _assert_same(a, b):
    assert {k: v for k, v in a.items() if k != "weights"} == \
        {k: v for k, v in b.items() if k != "weights"}
    for key in ("weights",):
        assert len(a[key]) == len(b[key])
        for x, y in zip(a[key], b[key]):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- round trip ---------------------------------------------------------------------------------
def test_round_trip_keeps_arrays_and_json_extras(tmp_path):
    """Extra JSON-able keys (a run's config, nested dicts) come back equal, even reserved names."""
    config = {"algorithm": "ntk_dfl", "alpha": 0.1, "taus": [20, 50], "resume": True,
              "data_dir": None, "nested": {"lr": {"schedule": "cosine", "steps": [1, 2]}}}
    state = _state(config=config, format="not the file format", num_weights=-1)
    path = str(tmp_path / "checkpoint.npz")
    checkpoint.save(path, state)
    _assert_same(checkpoint.load(path), state)
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file, no previous yet


def test_numpy_scalars_are_stored_and_other_objects_refused(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    checkpoint.save(path, _state(config={"rounds": np.int64(5), "alpha": np.float32(0.5)}))
    assert checkpoint.load(path)["config"] == {"rounds": 5, "alpha": 0.5}
    with pytest.raises(TypeError, match="'config'.*object"):
        checkpoint.save(path, _state(config={"model": object()}))
    assert checkpoint.load(path)["config"]["rounds"] == 5  # the good file is untouched


# -- damage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_torn_file_raises_checkpoint_error_naming_it(tmp_path, fraction):
    path = str(tmp_path / "checkpoint.npz")
    checkpoint.save(path, _state())
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))
    with pytest.raises(nd.CheckpointError, match=f"{re.escape(path)}.*--noresume"):
        checkpoint.load(path)


def _member_data_ranges(path):
    """``{member name: (first, end)}``: where each array's bytes (npy header + data) lie."""
    ranges = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
            first = info.header_offset + 30 + int(name_len) + int(extra_len)
            ranges[info.filename] = (first, first + info.compress_size)
    return ranges


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Flip each byte of a checkpoint in turn: load raises CheckpointError or returns the state.

    A flip may only go unnoticed where it changes nothing read back (zip bookkeeping such as
    timestamps); a flip inside any array, the metadata or the digest must always raise.
    """
    state = _state(config={"alpha": 0.1, "nested": {"taus": [20, 50]}})
    good = str(tmp_path / "good.npz")
    checkpoint.save(good, state)
    payload = open(good, "rb").read()
    ranges = _member_data_ranges(good)
    assert set(ranges) == {"meta.json", "weight_0.npy", "weight_1.npy", "weight_2.npy",
                           "weight_3.npy", "sha256.txt"}  # the layout of the docstring
    path = str(tmp_path / "checkpoint.npz")
    harmless = []
    for offset in range(len(payload)):
        with open(path, "wb") as f:
            f.write(payload)
        _flip(path, offset)
        try:
            back = checkpoint.load(path)
        except nd.CheckpointError as e:
            assert path in str(e)
            continue
        _assert_same(back, state)
        harmless.append(offset)
    for name, (first, end) in ranges.items():
        assert not [o for o in harmless if first <= o < end], f"a flip in {name} went unnoticed"


def test_old_format_is_refused_with_the_fix(tmp_path):
    """A format-1 file (one meta entry, no digest) names its format and how to start afresh."""
    path = str(tmp_path / "checkpoint.npz")
    meta = {"round": 1, "seed": 0, "format": 1, "num_weights": 1, "num_algorithm_arrays": 0}
    np.savez(path, weight_0=np.zeros(3), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(nd.CheckpointError,
                       match=f"{re.escape(path)}.*format 1.*{checkpoint.FORMAT}.*"
                             "delete.*--noresume"):
        checkpoint.load(path)


# -- the previous checkpoint --------------------------------------------------------------------
def test_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    previous = checkpoint.previous_path(path)
    assert os.path.dirname(previous) == str(tmp_path) and previous != path
    for r in (1, 2, 3):
        checkpoint.save(path, _state(r))
    assert checkpoint.load(path)["round"] == 3
    assert checkpoint.load(previous)["round"] == 2
    assert sorted(os.listdir(tmp_path)) == sorted(map(os.path.basename, (path, previous)))
    checkpoint.save(path, _state(4), keep_previous=False)  # the newest was found damaged
    assert checkpoint.load(path)["round"] == 4
    assert checkpoint.load(previous)["round"] == 2


def test_load_latest_skips_a_damaged_newest_checkpoint(tmp_path):
    directory = str(tmp_path)
    assert checkpoint.load_latest(directory) is None
    path = os.path.join(directory, checkpoint.NAME)
    for r in (1, 2):
        checkpoint.save(path, _state(r))
    found, state = checkpoint.load_latest(directory)
    assert (found, state["round"]) == (path, 2)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    previous = checkpoint.previous_path(path)
    with pytest.warns(UserWarning, match=f"{re.escape(path)}.*damaged.*{re.escape(previous)}"):
        found, state = checkpoint.load_latest(directory)
    assert (found, state["round"]) == (previous, 1)
    _flip(previous, os.path.getsize(previous) // 2)
    with pytest.raises(nd.CheckpointError,
                       match=f"{re.escape(path)}.*{re.escape(previous)}.*--noresume"):
        checkpoint.load_latest(directory)


def test_load_latest_without_the_newest_starts_afresh(tmp_path):
    """Deleting checkpoint.npz (the documented way to start afresh) is not undone by the copy."""
    path = os.path.join(str(tmp_path), checkpoint.NAME)
    for r in (1, 2):
        checkpoint.save(path, _state(r))
    os.remove(path)
    assert checkpoint.load_latest(str(tmp_path)) is None
