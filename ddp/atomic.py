"""Files written atomically and durably, and the temporaries a crash leaves behind.

A file is filled as a temporary in its own directory, fsynced, renamed over the
target and the directory fsynced, so the rename itself survives a crash; a reader
sees the old file or the new one, never a part. Checkpoints, models, summaries and
the training service's records are all written so.
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
import time

import numpy as np

# exactly what atomic_write creates for an .npz: its prefix, 8 random characters, its suffix
_TMP_NAME = re.compile(r"^\.tmp-[a-z0-9_]{8}\.npz$")
# a temporary file younger than this may be one another process is about to rename
STALE_TMP_SECONDS = 60


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(directory: str, suffix: str) -> tuple[int, str]:
    """A new file `.tmp-XXXXXXXX<suffix>` in `directory`, created with the mode any file
    gets here (0666 less the umask), not mkstemp's private 0600: a model or checkpoint
    must be readable by whoever may read the directory's other files."""
    while True:
        name = os.path.join(directory, f".tmp-{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue


def atomic_write(path: str, write, binary: bool = True) -> None:
    """Write a file so that `path` is either the old file or the complete new one.

    `write(fh)` fills a temporary file in the same directory; then fsync, rename over
    the target, fsync the directory (so the rename itself survives a crash).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(directory, os.path.splitext(path)[1])
    try:
        # held while it is written: a starting run's cleanup (remove_stale_temporaries)
        # tells a live write from the remains of a killed one by this lock
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    """An .npz written with atomic_write()."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz, refusing object arrays (no pickles). Any failure, whatever
    zipfile or numpy raise for a hostile file (an unsupported compression method, the
    encryption flag, a header claiming terabytes...), becomes ValueError saying why."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 (the file is untrusted input: every failure is "unreadable")
        raise ValueError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def remove_stale_temporaries(directory: str, min_age: float = STALE_TMP_SECONDS) -> list[str]:
    """Delete the temporary files a killed atomic_savez left in `directory`; their paths.

    Only regular files named exactly as atomic_savez names them, untouched for `min_age`
    seconds and not locked by a writer (atomic_savez holds an flock while it writes), so
    another process's checkpoint in progress, and every file of another naming, survive.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in names:
        if not _TMP_NAME.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer
                os.unlink(path)
            finally:
                os.close(fd)
        except OSError:
            continue
        removed.append(path)
    return removed
