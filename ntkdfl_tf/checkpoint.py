"""Checkpoints: the whole trainer state needed to continue a run bit for bit.

A checkpoint holds every client's weights, the number of finished rounds, the root seed, the
table of derived random streams and any other JSON-able entries of the state (the run's
configuration fingerprint), and the algorithm's state between rounds when it has one
(``algorithm_state``: DisPFL's masks; the baselines' momentum buffers start at zero every
round, as in the reference). The streams are keyed by (root seed,
stream, round), so the seed and the round fix every later draw (topology, sampling, failures,
channel) exactly.

Files. ``<logdir>/checkpoint.npz`` is the newest checkpoint and ``checkpoint.prev.npz`` the one
before it. A save writes the new file atomically (``ntkdfl_tf.io.atomic_path``: temporary
file, fsync, rename), and just before the rename makes ``checkpoint.prev.npz`` a hard link to
(or, where links are unsupported, a copy of) the file it replaces. ``checkpoint.npz`` is never
missing once written, so a run killed at any instant leaves a complete newest checkpoint and,
from the second round on, a previous one. ``load_latest`` falls back to the previous one when
the newest is damaged (a copy cut short, bytes changed on disk). Deleting ``checkpoint.npz``
starts afresh: the previous file is a backup of it, never resumed from on its own.

Layout (format 2). A zip (stored, not compressed; ``np.load`` opens it) of ``meta.json``
(``{"format", "num_weights", "state"}``, ``state`` being the JSON-able entries),
``weight_<i>.npy``, ``state_<field>_<i>.npy`` for each array of the algorithm's state (its
fields and their lengths in ``meta.json``'s ``algorithm_state``; absent without state), and last ``sha256.txt``: the SHA-256 of
every other member's name and bytes, in order. ``load`` reads every byte and checks the digest,
so a truncated file or a flipped byte anywhere in the arrays or the metadata raises
``CheckpointError`` naming the file. Format-1 files (one ``meta.npy``, no digest) are refused
with the same error, which says how to start afresh.
"""

import hashlib
import json
import os
import shutil
import warnings
import zipfile

import numpy as np

from ntkdfl_tf.errors import CheckpointError
from ntkdfl_tf.io import atomic_open, atomic_path

FORMAT = 2
NAME = "checkpoint.npz"
_ARRAYS = ("weights", "algorithm_state")
_DIGEST = "sha256.txt"
_FRESH = "delete it, or start afresh with --noresume"


def previous_path(path):
    """The previous checkpoint kept next to ``path`` (``checkpoint.npz`` -> ``.prev.npz``)."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


class _Hashing:
    """A file wrapper that feeds every byte written or read through a running digest."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def write(self, data):
        self.digest.update(data)
        return self.f.write(data)

    def read(self, size=-1):
        data = self.f.read(size)
        self.digest.update(data)
        return data


# -- save -------------------------------------------------------------------------------------
def _meta_json(state):
    """``meta.json``'s bytes; raises TypeError naming an entry JSON cannot hold."""
    extra = {k: v for k, v in state.items() if k not in _ARRAYS}
    for key, value in extra.items():
        try:
            json.dumps(value, default=_numpy_scalar)
        except (TypeError, ValueError) as e:
            raise TypeError(f"The state entry {key!r} cannot be stored in a checkpoint ({e}); "
                            "keep extra entries to JSON types (dict, list, str, number, bool, "
                            "None).") from e
    meta = {"format": FORMAT, "num_weights": len(state["weights"]), "state": extra}
    if state.get("algorithm_state") is not None:
        meta["algorithm_state"] = {name: len(arrays)
                                   for name, arrays in state["algorithm_state"].items()}
    return json.dumps(meta, default=_numpy_scalar).encode()


def _numpy_scalar(value):
    """JSON fallback: NumPy scalars (np.int64 and the like) become Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _members(state):
    """``(name, bytes or array)`` pairs in file order; checks every entry first.

    Raises:
        TypeError: a non-array entry cannot be stored as JSON.
        ValueError: an array holds Python objects.
    """
    members = [("meta.json", _meta_json(state))]
    arrays = [(f"weight_{i}.npy", f"state['weights'][{i}]", a)
              for i, a in enumerate(state["weights"])]
    for name, values in (state.get("algorithm_state") or {}).items():
        arrays += [(f"state_{name}_{i}.npy", f"state['algorithm_state'][{name!r}][{i}]", a)
                   for i, a in enumerate(values)]
    for member, what, array in arrays:
        array = np.asarray(array)
        if array.dtype.hasobject:  # would need pickling, which load refuses (unsafe)
            raise ValueError(f"{what} holds Python objects (dtype object); "
                             "checkpoints store numeric arrays only.")
        members.append((member, array))
    return members


def _keep_previous(path):
    """Makes ``previous_path(path)`` the checkpoint now at ``path`` (if any), atomically."""
    if not os.path.exists(path):
        return
    with atomic_path(previous_path(path), suffix=".npz.tmp") as tmp:
        os.remove(tmp)  # os.link wants a free name
        try:
            os.link(path, tmp)  # no bytes copied: the old file lives on under the new name
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)


def save(path, state, keep_previous=True):
    """Writes ``state`` (from ``DecentralizedTrainer.get_state``) to ``path`` atomically.

    Args:
        path: the checkpoint file, normally ``<logdir>/checkpoint.npz``.
        state: a dict with ``weights`` (a list of arrays) and any other
            JSON-able entries (NumPy scalars are stored as Python numbers; tuples come back as
            lists).
        keep_previous: keep the checkpoint this save replaces as ``previous_path(path)``; pass
            False when that file is damaged or of another run, so it does not become the
            fallback.

    Raises:
        TypeError: an entry other than the arrays cannot be stored as JSON.
        ValueError: an array holds Python objects (it would need pickling).
    """
    members = _members(state)  # checks every entry before anything is touched
    digest = hashlib.sha256()
    with atomic_open(path, "wb", suffix=".npz.tmp") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, value in members:
                digest.update(name.encode())
                with z.open(name, "w", force_zip64=True) as member:
                    out = _Hashing(member, digest)
                    if isinstance(value, bytes):
                        out.write(value)
                    else:
                        np.lib.format.write_array(out, value, allow_pickle=False)
            z.writestr(_DIGEST, digest.hexdigest())
        if keep_previous:  # the new file is complete: only now let the old one become previous
            _keep_previous(path)


# -- load -------------------------------------------------------------------------------------
def _read_members(z):
    """``{name: bytes or array}`` of every member before the digest; checks the digest.

    Raises:
        ValueError: the digest is missing or does not match.
    """
    names = z.namelist()
    if _DIGEST not in names:
        raise ValueError(f"no {_DIGEST} entry")
    digest, members = hashlib.sha256(), {}
    for name in names[:names.index(_DIGEST)]:
        digest.update(name.encode())
        with z.open(name) as raw:
            f = _Hashing(raw, digest)
            if name.endswith(".npy"):
                members[name] = np.lib.format.read_array(f, allow_pickle=False)
                f.read()  # the rest, if any: every byte counts in the digest and zip CRC
            else:
                members[name] = f.read()
    if z.read(_DIGEST).decode("ascii") != digest.hexdigest():
        raise ValueError("its SHA-256 does not match the content")
    return members


def _old_format(z):
    """The format number of a format-1 file (``meta.npy``, no digest), else None."""
    if "meta.npy" not in z.namelist() or _DIGEST in z.namelist():
        return None
    with z.open("meta.npy") as f:
        meta = json.loads(np.lib.format.read_array(f, allow_pickle=False).tobytes().decode())
    return meta.get("format", 1)


def load(path):
    """Reads and verifies a checkpoint written by ``save``.

    Args:
        path: the checkpoint file.

    Returns:
        The state dict given to ``save`` (JSON entries as JSON gives them back).

    Raises:
        CheckpointError: the file is missing, cut short, changed on disk (digest or zip CRC
            mismatch, unreadable entries) or of another format; the message names the file.
    """
    try:
        with zipfile.ZipFile(path) as z:
            old = _old_format(z)
            if old is None:
                members = _read_members(z)
    except FileNotFoundError as e:
        raise CheckpointError(f"No checkpoint at {path}.") from e
    except Exception as e:  # noqa: BLE001 - any failure to parse means a damaged file
        raise CheckpointError(f"The checkpoint {path} is damaged or incomplete "
                              f"({type(e).__name__}: {e}); {_FRESH}.") from e
    if old is not None:
        raise CheckpointError(f"{path} has checkpoint format {old}, this version reads "
                              f"{FORMAT}; {_FRESH}.")
    return _unpack(path, members)


def _unpack(path, members):
    """The state dict from members whose digest matched."""
    try:
        meta = json.loads(members["meta.json"].decode())
        fmt = meta.get("format")
        if fmt == FORMAT:
            weights = [members[f"weight_{i}.npy"] for i in range(meta["num_weights"])]
            state = dict(meta["state"], weights=weights)
            if "algorithm_state" in meta:
                state["algorithm_state"] = {
                    name: [members[f"state_{name}_{i}.npy"] for i in range(count)]
                    for name, count in meta["algorithm_state"].items()}
            return state
    except (KeyError, ValueError) as e:  # a file written by something other than save()
        raise CheckpointError(f"The checkpoint {path} lacks or garbles the entry {e}; "
                              f"{_FRESH}.") from e
    raise CheckpointError(f"{path} has checkpoint format {fmt}, this version reads {FORMAT}; "
                          f"{_FRESH}.")


def check_same_run(state, expected, source):
    """Raises CheckpointError unless ``state`` (from ``load``) is of the run ``expected``
    describes: the basics (seed, algorithm, num_clients, streams) and ``state["config"]``
    compared field by field with ``expected`` (``trainer.configuration()`` plus the basics);
    the message names the first differing field. A stream table that only adds streams to
    the checkpoint's is the same run: the streams it had draw exactly as before."""
    basics = ("seed", "algorithm", "num_clients", "streams")
    mine = json.loads(json.dumps(expected))  # as it reads back from the file: lists, not tuples
    theirs = {**{key: state.get(key) for key in basics}, **(state.get("config") or {})}
    if isinstance(theirs["streams"], dict) and isinstance(mine.get("streams"), dict) and all(
            mine["streams"].get(k) == v for k, v in theirs["streams"].items()):
        theirs["streams"] = mine["streams"]
    differing = [key for key in list(basics) + sorted(set(mine) | set(theirs))
                 if mine.get(key) != theirs.get(key)]
    if differing:
        key = differing[0]
        more = f" (and {len(differing) - 1} more differing fields)" if len(differing) > 1 else ""
        raise CheckpointError(
            f"{source} is of a run with {key}={theirs.get(key)!r}, this run has "
            f"{mine.get(key)!r}{more}; use another logdir, or --noresume to start afresh "
            "(overwriting it).")


def load_latest(directory):
    """The newest readable checkpoint in ``directory``, falling back to the previous one.

    Only a damaged ``checkpoint.npz`` makes it use ``checkpoint.prev.npz`` (with a warning
    naming the skipped file); without ``checkpoint.npz`` there is nothing to resume.

    Args:
        directory: the run's folder (``RoundCheckpoint``'s directory).

    Returns:
        ``(path, state)`` of the checkpoint read, or None when ``checkpoint.npz`` is absent.

    Raises:
        CheckpointError: both files are unreadable (or the previous one is missing); the
            message names both.
    """
    path = os.path.join(directory, NAME)
    if not os.path.exists(path):
        return None
    try:
        return path, load(path)
    except CheckpointError as newest:
        previous = previous_path(path)
        try:
            state = load(previous)
        except CheckpointError as e:
            raise CheckpointError(f"No readable checkpoint in {directory}. {newest} {e} Delete "
                                  f"{path} to start afresh, or pass --noresume.") from newest
        warnings.warn(f"{path} is damaged ({newest}); resuming from the previous checkpoint "
                      f"{previous} (round {state['round']}).", stacklevel=2)
        return previous, state
