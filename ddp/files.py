"""What a path names, checked before a file is opened or replaced.

Opening a named pipe blocks until someone writes to it, and a device node or a
directory is never what a data, config, key or model file flag means; so every
input is refused unless it is a regular file (symlinks to one are fine). Outputs
are written to a temporary file and renamed over the target, which would replace
a device node, a FIFO or a symlink itself (not the file it points to) with a
regular file; so an existing output target must be a regular file too, and a
symlink is refused rather than silently replaced: give the path it points to.
"""
from __future__ import annotations

import os
import stat

from .errors import DataError, UsageError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def kind(mode: int) -> str:
    """'a directory', 'a named pipe (FIFO)', ... for a st_mode that is not a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check_input_file(path: str, flag: str, error=DataError) -> None:
    """Raise `error` (one line naming `flag`) unless `path` is, or links to, a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{flag} {path}: no such file")
    except OSError as e:
        raise error(f"{flag} {path}: cannot read it ({e.strerror or e})")
    except ValueError as e:  # an embedded NUL byte
        raise error(f"{flag} {path!r}: not a valid path ({e})")
    if not stat.S_ISREG(mode):
        raise error(f"{flag} {path}: is {kind(mode)}, not a regular file; give the path of a file")


def check_output_target(path: str, flag: str, error=UsageError) -> None:
    """Raise `error` when `path` exists and is not a regular file (a symlink included):
    the atomic rename that writes it would replace the node or the link itself."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"{flag} {path}: cannot check it ({e.strerror or e})")
    except ValueError as e:
        raise error(f"{flag} {path!r}: not a valid path ({e})")
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise error(f"{flag} {path}: is a symbolic link (to {os.readlink(path)}); writing would "
                    f"replace the link, not its target: give the real path "
                    f"{os.path.realpath(path)}")
    raise error(f"{flag} {path}: is {kind(mode)}, not a regular file; writing would replace it: "
                f"give the path of a file")
