"""A peer that takes a shard and never answers it cannot stall a run (issue 12, item 4).

A raw pyzmq peer does the real handshake, is admitted, takes its tasks and only sends
heartbeats, so it is never silent and its connection never closes: only the shard's
deadline can notice it (it stands for an authorized worker whose compute thread hung,
which keeps heartbeating too). Beside it one real `ddp-worker`. The run must end with
the parameters of an undisturbed `ddp-train` run, count the timeouts, drop the late
answer the peer finally sends, and drop the peer after three missed deadlines in a row.
"""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import zmq

from conftest import free_port, read_json, train
from ddp import protocol
from zmq_helpers import SMALL, ipc, max_param_diff, procs  # noqa: F401 (fixture)

STEPS = 30
ARGS = [*SMALL, "--steps", str(STEPS), "--log-every", "1"]


class StallingPeer(threading.Thread):
    """Joins as a member, keeps every task, heartbeats; once `late` is set it answers its
    first task with gradients that would change the result if they were summed."""

    def __init__(self, endpoint: str, late: threading.Event, halt: threading.Event):
        super().__init__(daemon=True)
        self.endpoint, self.late, self.halt = endpoint, late, halt
        self.tasks: list[tuple[dict, int]] = []   # (header, array bytes)
        self.late_sent = False
        self.error: BaseException | None = None

    def run(self):
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 10_000)  # a blocked send fails the test, never hangs
        try:
            s.connect(self.endpoint)
            job = self._join(s)
            deadline = time.monotonic() + 120
            last_beat = 0.0
            while not self.halt.is_set() and time.monotonic() < deadline:
                if s.poll(50):
                    frames = s.recv_multipart()
                    msg = protocol.decode(frames[0], protocol.FROM_COORDINATOR,
                                          protocol.MAX_REPLY_HEADER)
                    if msg["type"] == "task":
                        self.tasks.append((msg, len(frames[1])))
                    elif msg["type"] == "stop":
                        break
                if time.monotonic() - last_beat > 0.2:
                    s.send(protocol.encode("heartbeat", job=job))
                    last_beat = time.monotonic()
                if self.late.is_set() and not self.late_sent and self.tasks:
                    first, nbytes = self.tasks[0]
                    n = first["hi"] - first["lo"]
                    head = protocol.encode("grads", job=job, step=first["step"], task=first["task"],
                                           n=n, loss=1.0, correct=0, seconds=0.01)
                    s.send_multipart([head, np.full(nbytes // 8, 1e3, "<f8").tobytes()])
                    self.late_sent = True
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            s.close(linger=0)
            ctx.term()

    @staticmethod
    def _join(s) -> str:
        from worker.service import Job

        s.send(protocol.encode("hello"))
        job_msg = _wait_for(s, "job")
        job = job_msg["job"]
        s.send(protocol.encode("ready", job=job, fingerprint=Job(job_msg["config"]).fingerprint))
        _wait_for(s, "welcome")
        return job


def _wait_for(s, type_: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s.poll(100):
            frames = s.recv_multipart()
            msg = protocol.decode(frames[0], protocol.FROM_COORDINATOR, protocol.MAX_REPLY_HEADER)
            if msg["type"] == type_:
                return msg
    raise AssertionError(f"no {type_} from the coordinator within {timeout} s")


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_peer_that_holds_its_shard_is_timed_out_and_dropped(tmp_path, procs):  # noqa: F811
    ref, out, summary = tmp_path / "ref.npz", tmp_path / "out.npz", tmp_path / "s.json"
    r = train([*ARGS, "--output", str(ref)], timeout=120)
    assert r.returncode == 0, r.stderr

    endpoint, port = ipc(tmp_path), free_port()
    coord = procs.coordinator(endpoint, [*ARGS, "--min-workers", "2", "--worker-timeout", "1",
                                         "--output", str(out), "--summary-json", str(summary),
                                         "--metrics-port", str(port)])
    coord.wait_for("waiting for 2 workers", timeout=60)
    late, halt = threading.Event(), threading.Event()
    peer = StallingPeer(endpoint, late, halt)
    peer.start()
    try:
        peer_name = coord.wait_for(r"(worker \d+) joined \(1 worker\)", timeout=60).group(1)
        procs.worker(endpoint)
        # step 1: the peer's rows are recomputed by the real worker when the deadline passes
        coord.wait_for(rf"{peer_name}: rows \[\d+, \d+\) of step 1 not back after .* recomputed "
                       rf"by another worker", timeout=60)
        late.set()
        # the third deadline in a row: the peer is dropped, the real worker is alone
        coord.wait_for(rf"{peer_name} missed 3 shard deadlines in a row", timeout=60)
        coord.wait_for(r"waiting for 2 workers \(1 connected\)", timeout=60)
        assert scrape(port, "ddp_shard_timeouts_total") == 3
        procs.worker(endpoint)  # a second real worker lets the run finish
        assert coord.wait(timeout=120) == 0, coord.stderr
    finally:
        halt.set()
        peer.join(10)
    assert not peer.is_alive(), "the peer thread hung"
    assert peer.error is None, repr(peer.error)
    assert peer.late_sent and len(peer.tasks) >= 3

    assert max_param_diff(ref, out) <= 1e-10  # the late answer was never summed
    s = read_json(summary)
    assert s["steps"] == STEPS and not s["interrupted"], s
    assert s["shard_timeouts"] == 3, s
    assert s["dropped_messages"].get("stale", 0) >= 1, s["dropped_messages"]
    assert "Traceback" not in coord.stderr


def test_shard_timeout_flag_is_validated():
    res = train(["--backend", "zmq", "--shard-timeout", "0", "--steps", "1"], timeout=60)
    assert res.returncode == 2 and "--shard-timeout must be a positive number" in res.stderr, res.stderr
    res = train(["--shard-timeout", "5", "--steps", "1"], timeout=60)
    assert res.returncode == 2 and "--backend zmq" in res.stderr, res.stderr
