"""Atomic file writes: a file is replaced whole or not at all.

Every file ntkdfl_tf writes during a run (history, summaries, checkpoints, saved models) goes
through ``atomic_path``: the content is written to a temporary file in the same folder, flushed
to disk, then renamed over the target. A run killed at any instant therefore leaves either the
old file or the new one, never a truncated mix.
"""

import contextlib
import csv
import os
import secrets


def _create_temp(folder, name, suffix):
    """Creates an empty, uniquely named hidden file in ``folder``; returns its path.

    Unlike ``tempfile.mkstemp`` (mode 0600) the file gets the permissions ``open`` would give
    (0666 minus the umask), so the renamed result looks like a file written in place.
    """
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # another writer took this name: draw again
            continue


def _fsync(path, directory=False):
    """Flushes ``path`` (a file, or with ``directory`` its folder entry) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    except OSError:
        if directory:  # folders cannot be opened on some systems (Windows): the rename stands
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yields a temporary path to write; on success it replaces ``path`` in one step.

    The temporary file is created (empty) in the folder of ``path``, which is made if missing,
    so the final rename never crosses file systems. When the ``with`` block ends normally the
    file is fsynced, renamed over ``path`` and the folder fsynced; if the block raises, the
    temporary file is removed and ``path`` is left as it was.

    Example::

        with atomic_path("runs/a/model.keras", suffix=".keras") as tmp:
            model.save(tmp)  # Keras wants the .keras ending

    Args:
        path: the file to (re)place.
        suffix: ending of the temporary name, for writers that check it.

    Yields:
        The temporary path (a hidden file ``.<name>.<random><suffix>`` next to ``path``).
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temp(folder, name, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync(folder, directory=True)  # makes the rename itself survive a power cut


def save_figure(figure, path, dpi=120):
    """Saves a matplotlib figure atomically (the format from ``path``'s ending)."""
    suffix = os.path.splitext(path)[1] or ".png"
    with atomic_path(path, suffix=suffix) as tmp:
        figure.savefig(tmp, dpi=dpi)


@contextlib.contextmanager
def atomic_open(path, mode="w", suffix=".tmp", **kwargs):
    """``open`` for writing through ``atomic_path``: yields the open temporary file.

    Text modes default to ``newline=""`` (what the ``csv`` module expects: no line-ending
    translation). Other keyword arguments go to ``open``.

    Args:
        path: the file to (re)place.
        mode: a writing mode, ``"w"`` or ``"wb"``.
        suffix: ending of the temporary name.
        **kwargs: passed to ``open`` (e.g. ``encoding``).

    Yields:
        The open file object; it is closed before the rename.
    """
    if "b" not in mode:
        kwargs.setdefault("newline", "")
    with atomic_path(path, suffix) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_csv(path, rows, fields):
    """Writes ``rows`` (dicts) under the header ``fields`` through ``atomic_open``.

    Raises:
        ValueError: a row has a key outside ``fields``; the old file is kept.
    """
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path):
    """A CSV file with a header as a list of dicts; [] when the file does not exist yet."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
