"""One atomic file per save: the whole trainer state needed to continue a run bit for bit.

The file (NumPy ``.npz``) holds every client's weights, the algorithm's state (momentum buffers
and the like, whatever ``Algorithm.init`` returns), the number of finished rounds, the root seed
and the table of derived random streams. The streams are keyed by (root seed, stream, round),
so the seed and the round fix every later draw (topology, sampling, failures) exactly.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
old file, so a run killed at any instant leaves either the previous or the new checkpoint.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

from ntkdfl_tf.errors import CheckpointError

FORMAT = 1


def save(path, state):
    """Writes ``state`` (from ``DecentralizedTrainer.get_state``) to ``path`` atomically."""
    arrays = {f"weight_{i}": w for i, w in enumerate(state["weights"])}
    arrays.update({f"algorithm_{i}": a for i, a in enumerate(state["algorithm_state"])})
    meta = {k: v for k, v in state.items() if k not in ("weights", "algorithm_state")}
    meta.update(format=FORMAT, num_weights=len(state["weights"]),
                num_algorithm_arrays=len(state["algorithm_state"]))
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=folder, prefix=".checkpoint.")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path):
    """Reads a checkpoint written by ``save``; raises CheckpointError if it is unreadable."""
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            weights = [z[f"weight_{i}"] for i in range(meta["num_weights"])]
            algorithm_state = [z[f"algorithm_{i}"] for i in range(meta["num_algorithm_arrays"])]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"Cannot read the checkpoint {path!r} ({e}); delete it to start "
                              "afresh.") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} has checkpoint format {meta.get('format')}, this "
                              f"version reads {FORMAT}; delete it to start afresh.")
    meta.pop("format"), meta.pop("num_weights"), meta.pop("num_algorithm_arrays")
    return dict(meta, weights=weights, algorithm_state=algorithm_state)
