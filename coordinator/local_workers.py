"""`--workers N`: worker processes on this host, started and stopped with the coordinator."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import zmq

from ddp import keys as keyfiles
from ddp.errors import DDPError

from .access import CurveKeys
from .membership import Membership


def connect_endpoint(bound: str) -> str:
    """Where local workers reach an endpoint bound to all interfaces."""
    return bound.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://[::]:", "tcp://[::1]:")


class LocalWorkers:
    """`--workers N`: worker processes on this host, stopped and reaped with the coordinator."""

    def __init__(self, n: int, endpoint: str, threads: int, keys: CurveKeys | None, tmpdir: str):
        cmd = [sys.executable, "-m", "ddp", "worker", "--connect", endpoint, "--threads", str(threads),
               "--quiet", "--retry-for", "60"]
        if keys is not None:  # a key pair of their own, known to this coordinator only
            public, secret = zmq.curve_keypair()
            secret_file = os.path.join(tmpdir, "local-worker.key_secret")
            server_file = os.path.join(tmpdir, "coordinator.key")
            keyfiles.write_keys(secret_file, public, secret)
            keyfiles.write_keys(server_file, keys.public, None)
            keys.allowed.add(public)
            cmd += ["--curve-secret", secret_file, "--server-key", server_file]
        env = dict(os.environ, DDP_WORKER_PARENT=str(os.getpid()))  # they exit when we are gone
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env) for _ in range(n)]

    def check(self, members: Membership) -> None:
        """All of them gone and nobody else serving: there is no one left to wait for."""
        if not members and all(p.poll() is not None for p in self.procs):
            codes = ", ".join(str(p.returncode) for p in self.procs)
            raise DDPError(f"all {len(self.procs)} worker processes exited (exit codes {codes}); "
                           f"see their errors above")

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
