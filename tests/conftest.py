"""Shared helpers: run the real commands as subprocesses (alone or under mpirun),
each with a timeout, in their own process group so nothing outlives a test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from ddp.bench import descendants  # the test modules import it from here

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


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process, its group and every descendant."""
    victims = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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


def one_error_line(stderr: str, prog: str = "ddp-train") -> str:
    """The single error line; fails if there is a traceback or more than one error."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"{prog}: error")]
    assert len(lines) == 1, f"expected exactly one error line, got:\n{stderr}"
    return lines[0]


@pytest.fixture
def classification_npz(tmp_path):
    """A small separable 3-class problem in an .npz (X float64, y int)."""
    rng = np.random.default_rng(7)
    centers = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    y = rng.integers(0, 3, 90)
    X = centers[y] + 0.3 * rng.standard_normal((90, 4))
    path = tmp_path / "cls.npz"
    np.savez(path, X=X, y=y)
    return path
