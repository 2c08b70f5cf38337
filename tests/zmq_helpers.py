"""Helpers for the ZeroMQ tests: real coordinator and worker processes, each in its own
session, tracked so that every one of them is killed when the test ends."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import PY, _env, kill_tree, unstamped

# a model big enough that a run lasts a while, small enough for 2 cores
SMALL = ["--dtype", "float64", "--layers", "2,256,256,3", "--batch-size", "64", "--lr", "0.05",
         "--momentum", "0.9"]


class Proc:
    """A running command whose stderr is collected line by line in the background."""

    def __init__(self, cmd: list[str], cwd=None, env=None):
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True, cwd=cwd, env=env or _env(),
                                  stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.out: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stderr, self.lines, unstamped),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.p.stdout, self.out), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink, clean=lambda line: line):
        """Collect lines; stderr's without the time each log line starts with."""
        for line in stream:
            sink.append(clean(line.rstrip("\n")))

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    def mark(self) -> int:
        """The number of stderr lines so far: pass it as wait_for(since=) to look at newer ones."""
        return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60, since: int = 0) -> re.Match:
        """Block until a stderr line (from line `since` on) matches `pattern` (regex);
        fail the test on timeout."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen = since
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.p.poll() is not None and seen >= len(self.lines):
                time.sleep(0.1)
                if seen >= len(self.lines):
                    pytest.fail(f"{' '.join(self.cmd)} exited ({self.p.returncode}) before "
                                f"{pattern!r}:\n{self.stderr}")
            time.sleep(0.01)
        pytest.fail(f"no line matching {pattern!r} within {timeout}s from {' '.join(self.cmd)}:\n"
                    f"{self.stderr}")

    def wait(self, timeout: float = 120, context: str = "") -> int:
        """The exit code; on timeout kill it and fail, showing its stderr (and `context`)."""
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.p)
            pytest.fail(f"timed out after {timeout}s: {' '.join(self.cmd)}\n{self.stderr}"
                        + (f"\n--- context:\n{context}" if context else ""))
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.p.poll() is None:
            kill_tree(self.p)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def procs():
    """Start processes with procs.start(cmd); all are killed (with their children) at the end."""
    started: list[Proc] = []

    class Starter:
        def start(self, cmd, **kw) -> Proc:
            proc = Proc(cmd, **kw)
            started.append(proc)
            return proc

        def coordinator(self, endpoint: str, args: list[str], **kw) -> Proc:
            return self.start([PY, "-m", "ddp", "coordinator", "--bind", endpoint, *args], **kw)

        def worker(self, endpoint: str, args: list[str] = (), **kw) -> Proc:
            return self.start([PY, "-m", "ddp", "worker", "--connect", endpoint, "--threads", "1",
                               *args], **kw)

    yield Starter()
    for proc in started:
        proc.kill()


def ipc(tmp_path, name: str = "c.sock") -> str:
    return f"ipc://{os.path.join(str(tmp_path), name)}"


def max_param_diff(a_path, b_path) -> float:
    with np.load(a_path) as a, np.load(b_path) as b:
        keys = [k for k in a.files if k != "config"]
        assert sorted(keys) == sorted(k for k in b.files if k != "config")
        return max(float(np.abs(a[k] - b[k]).max()) for k in keys)
