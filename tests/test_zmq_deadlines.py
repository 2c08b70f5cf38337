"""A peer that takes a shard and never answers it cannot stall a run (issue 12, item 4).

A peer does the real handshake, is admitted, takes its tasks and only sends heartbeats,
so it is never silent and its connection never closes: only the shard's deadline can
notice it (it stands for an authorized worker whose compute thread hung, which keeps
heartbeating too). Beside it one honest peer. In process, against a real Coordinator:
every step's sum must be that of the rows in shard order, the timeouts counted (in the
status and the metric), the late answer the peer finally sends dropped as stale, and the
peer dropped after three missed deadlines in a row.
"""
from __future__ import annotations

import numpy as np

from ddp.monitor import Monitor, prometheus
from inproc import train_here
from zmq_helpers import HELLO, ordered_sum, served  # noqa: F401 (fixture)


def metric(monitor: Monitor, name: str) -> float:
    for family in prometheus.Collector(monitor.run).collect():
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not among the metrics")


def test_a_peer_that_holds_its_shard_is_timed_out_and_dropped(served):
    monitor = Monitor(backend="zmq", total_steps=4, layers=(2, 100, 3), parameters=603, lr=0.1,
                      classify=True)
    s = served(min_workers=2, worker_timeout=1.0, shard_timeout=0.2, monitor=monitor)
    staller, honest = s.peer(), s.peer()
    staller.answering = False      # keeps every task, heartbeats on every poll
    staller.rejoining = False      # once dropped it stays out
    newcomer = s.peer(join=False)
    hello = []

    def late_answer_then_a_newcomer():
        if s.coord.shards.step == 1 and not getattr(staller, "late", False):
            first = staller.tasks[0]  # of step 0, long recomputed by the honest peer
            staller.grads(first, array=np.full(s.coord.P, 1e3))
            staller.late = True
        if any(line.startswith("waiting for 2 workers (1 connected)") for line in s.lines) \
                and not hello:  # once: the reply may take a few polls
            hello.append(newcomer.say("hello", **HELLO))

    s.during_poll = late_answer_then_a_newcomer
    for step in range(4):
        grad, _ = s.run_step(step)
        np.testing.assert_array_equal(grad, ordered_sum(step, s.shards_of(step), s.coord.P))
    name = "worker 1"
    timed_out = [ln for ln in s.lines if ln.startswith(f"{name}: rows [")]
    assert len(timed_out) == 2 and all("recomputed by another worker" in ln for ln in timed_out)
    assert "of step 1 not back after" in timed_out[0], timed_out
    dropped = [ln for ln in s.lines if ln.startswith(f"{name} missed 3 shard deadlines in a row")]
    assert len(dropped) == 1 and "rows [0, 32) of step 3 not back after" in dropped[0], dropped
    assert s.coord.shards.timeouts == 3 and s.coord.status()["shard_timeouts"] == 3, "\n".join(s.lines)
    assert metric(monitor, "ddp_shard_timeouts_total") == 3
    assert s.coord.members.dropped["stale"] >= 1, s.coord.members.dropped
    assert s.coord.members.lost == 1 and len(staller.tasks) >= 3
    assert [t["step"] for t in newcomer.tasks] == [3]


def test_shard_timeout_flag_is_validated():
    res = train_here(["--backend", "zmq", "--shard-timeout", "0", "--steps", "1"])
    assert res.returncode == 2 and "--shard-timeout must be a positive number" in res.stderr, res.stderr
    res = train_here(["--shard-timeout", "5", "--steps", "1"])
    assert res.returncode == 2 and "--backend zmq" in res.stderr, res.stderr
