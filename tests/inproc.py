"""Run the commands inside the test process, for behaviour that needs no process of
its own (flag and file validation, a short one-process run): the same entry points
the console scripts call, with their output captured and the process-wide state
they change (signal handlers, numpy's error mode, BLAS threads, environment, cwd)
put back afterwards, each within a deadline."""
from __future__ import annotations

import contextlib
import io
import os
import signal

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from helpers import SESSION_TMP, Result

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TIMEOUT = 120  # seconds for one in-process command


@contextlib.contextmanager
def deadline(seconds: float = TIMEOUT):
    """Fail the test when the block takes longer than `seconds`, so that an in-process
    command that blocks (a regression that opens a FIFO, say) fails instead of hanging
    the session. SIGALRM interrupts a blocking system call; pytest's Failed is a
    BaseException, which the commands' `except Exception` lets through."""
    def expire(signum, frame):
        pytest.fail(f"the command was still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def isolated(cwd=None):
    """Whatever a command changes process-wide is restored when the block ends."""
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    errstate = np.geterr()
    blas = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    env, here = dict(os.environ), os.getcwd()
    os.environ["TMPDIR"] = SESSION_TMP
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
        threadpool_limits(limits=blas)
        np.seterr(**errstate)
        for s, h in handlers.items():
            signal.signal(s, h)


def call(main, argv: list[str], cwd=None, timeout: float = TIMEOUT, **kw) -> Result:
    """`main(argv, **kw)` (one of ddp.cli's run_* functions) with stdout and stderr
    captured: its exit code and output, as `helpers.run` gives them for a process."""
    out, err = io.StringIO(), io.StringIO()
    with deadline(timeout), isolated(cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv], **kw)
        except SystemExit as e:  # argparse's --help/--version and usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return Result(int(code), out.getvalue(), err.getvalue())


def train_here(args: list, cwd=None) -> Result:
    """`ddp-train ARGS` on one process (no MPI: a world of one) in this process."""
    from ddp.coordinator.mpi import LocalComm
    from ddp.cli import run_train

    return call(run_train, args, cwd=cwd, comm=LocalComm())


def predict_here(args: list, cwd=None) -> Result:
    """`ddp-predict ARGS` in this process."""
    from ddp.cli import run_predict

    return call(run_predict, args, cwd=cwd)
