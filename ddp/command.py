"""What the entry points share: the one error line, the exit code, writing a result file.

Every error the user can cause ends as one line `PROG: error: ...` on stderr and
a non-zero exit (see ddp.errors for the codes); anything else is a bug, reported
with its traceback and exit code 1.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from . import checkpoint as ckpt
from .errors import EXIT_INTERNAL, DDPError, OutputError, missing_package
from .files import check_output_target
from .log import stamped

INTERNAL_ERROR = "internal error (the traceback above is a bug report)"


def print_error(prog: str, err: BaseException | str, rank: int | None = None) -> None:
    """`PROG: error: ERR` (with the rank under mpirun) on stderr, behind the time."""
    where = f" (rank {rank})" if rank is not None else ""
    print(stamped(f"{prog}: error{where}: {err}"), file=sys.stderr, flush=True)


def exit_code(prog: str, e: BaseException) -> int:
    """The exit code of a one-process command that ended with `e` (printed if an error)."""
    if isinstance(e, SystemExit):  # --help, --version
        return int(e.code or 0)
    e = missing_package(e) or e
    if isinstance(e, DDPError):
        print_error(prog, e)
        return e.exit_code
    if not isinstance(e, Exception):
        raise e
    traceback.print_exception(e)
    print_error(prog, INTERNAL_ERROR)
    return EXIT_INTERNAL


def console_script(run: Callable[..., int], **kw) -> Callable[[], None]:
    """A console script's main: `run(**kw)` with the process's flags; its exit code is
    the process's."""
    def main() -> None:
        sys.exit(run(**kw))
    return main


def write_result(path: str, flag: str, write: Callable, binary: bool = True) -> None:
    """`write(fh)` to `path` atomically and durably, as checkpoints are written.

    The target is checked again first: it may have changed since the flags were
    validated. Any failure is an OutputError (exit 4).
    """
    check_output_target(path, flag, OutputError)
    try:
        ckpt.atomic_write(path, write, binary=binary)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}")
