"""What the tests share: run the real commands as subprocesses (alone or under
mpirun), each with a timeout, in their own process group so nothing outlives a
test; read their outputs; find their processes."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pytest

import psutil

from ddp.proc import descendants, kill_tree  # noqa: F401  (the tests import them from here)

PY = sys.executable
BIN = os.path.dirname(PY)


def _mpirun() -> str | None:
    for name in ("mpiexec", "mpirun"):
        path = shutil.which(name, path=BIN) or shutil.which(name)
        if path:
            return path
    return None


MPIRUN = _mpirun()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


# The commands under test put their temporary files (a coordinator's ipc:// socket
# directory, say) here, so that what a SIGKILLed one cannot remove goes with the session.
SESSION_TMP = tempfile.mkdtemp(prefix="ddp-tests-")


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = SESSION_TMP
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- processes: the tree walk and kill of ddp.proc (what ddp-bench uses), psutil for the rest ---


def alive(pid: int) -> bool:
    """pid runs (a zombie that its parent has not reaped yet does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rank_pids(root: int) -> dict[int, int]:
    """{rank: pid} of the ddp ranks below `root` (mpirun): their environment says PMI_RANK."""
    ranks = {}
    for pid in descendants(root):
        try:
            proc = psutil.Process(pid)
            env, cmd = proc.environ(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "PMI_RANK" in env and "ddp" in cmd and "hydra" not in cmd:
            ranks[int(env["PMI_RANK"])] = pid
    return ranks


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live ddp processes (other than this one) that mention `marker`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] != os.getpid() and marker in cmdline and "ddp" in cmdline:
            found.append(cmdline)
    return found


def rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def run(cmd: list[str], timeout: float = 120, cwd=None, env=None) -> Result:
    """Run cmd in a new session; on timeout kill it and all it started, and fail the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd, env=env or _env(),
                            stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{out}\nstderr:\n{err}")
    return Result(proc.returncode, out, err)


def train_cmd(args: list[str], n: int | None = None) -> list[str]:
    """`python -m ddp train ARGS`, under `mpirun -n N` when n is given."""
    base = [PY, "-m", "ddp", "train", *args]
    if n is None:
        return base
    if MPIRUN is None:
        pytest.skip("no mpirun/mpiexec found (pip install mpich)")
    return [MPIRUN, "-n", str(n), *base]


def train(args: list[str], n: int | None = None, timeout: float = 120, **kw) -> Result:
    return run(train_cmd(args, n), timeout=timeout, **kw)


def predict(args: list[str], timeout: float = 60, **kw) -> Result:
    return run([PY, "-m", "ddp", "predict", *args], timeout=timeout, **kw)


def load_model(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


# the time every log line starts with (ddp.log.stamped)
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


def unstamped(line: str) -> str:
    """A log line without its leading time."""
    return STAMP.sub("", line, count=1)


def one_error_line(stderr: str, prog: str = "ddp-train") -> str:
    """The single error line (without its time); fails if there is a traceback or more
    than one error."""
    assert "Traceback" not in stderr, stderr
    lines = [unstamped(ln) for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln.startswith(f"{prog}: error")]
    assert len(lines) == 1, f"expected exactly one error line, got:\n{stderr}"
    return lines[0]


def expect_error(res: Result, prog: str, *fragments: str) -> str:
    """`res` failed with exit 2 and one error line holding every fragment; that line."""
    line = one_error_line(res.stderr, prog)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def until(done, what: str, timeout: float = 60.0, log: str = ""):
    """Poll `done()` every 0.1 s until it is true, and return its value; fail after
    `timeout` s, saying `what` did not happen (and showing `log`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = done()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout} s" + (f"; log:\n{log}" if log else ""))
