"""The ZeroMQ backend end to end: real coordinator and worker processes on real sockets.

Every run is compared with an undisturbed reference run of the same job: whoever
computed which shard, whoever joined, left or died, the final parameters are the
same (float64, up to summation order).
"""
from __future__ import annotations

import io
import math
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import zmq
from helpers import MPIRUN, PY, alive, descendants, one_error_line, read_json, run, train
from zmq_helpers import (HELLO, SMALL, ipc, max_param_diff, ordered_sum, procs,  # noqa: F401, F811
                         served)  # (procs, served: fixtures)

from ddp import protocol

ATOL = 1e-10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final parameters of an undisturbed one-process run of the job the tests share."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    r = train([*SMALL, "--steps", "400", "--output", str(out)])
    assert r.returncode == 0, r.stderr
    return out


JOB = [*SMALL, "--steps", "400", "--log-every", "1"]


def test_zmq_backend_equals_mpi(tmp_path):
    args = [*SMALL, "--steps", "40", "--batch-size", "50"]
    mpi, zmq_ = tmp_path / "mpi.npz", tmp_path / "zmq.npz"
    if MPIRUN is None:
        pytest.skip("no mpirun")
    r = train([*args, "--output", str(mpi)], n=3)
    assert r.returncode == 0, r.stderr
    r = train([*args, "--backend", "zmq", "--workers", "3", "--output", str(zmq_),
               "--summary-json", str(tmp_path / "s.json")])
    assert r.returncode == 0, r.stderr
    assert max_param_diff(mpi, zmq_) <= ATOL
    s = read_json(tmp_path / "s.json")
    assert s["backend"] == "zmq" and s["world_size"] == 3 and s["steps"] == 40
    # per step: parameters out to and gradient sums back from each of 3 workers
    n_bytes = s["parameters"] * 8
    assert 6 * n_bytes <= s["bytes_per_step"] < 6 * n_bytes + 3 * 1024
    assert "done: 40 steps on 3 workers" in r.stdout


def test_worker_killed_at_a_random_step_and_another_stopped(tmp_path, procs, reference):
    """SIGKILL one worker at a random step: it is lost and its rows are recomputed; SIGTERM
    another: it says bye (exit 143) and leaves. The last one finishes the job exactly."""
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    coord = procs.coordinator(ep, [*JOB, "--min-workers", "1", "--worker-timeout", "30",
                                   "--output", str(out), "--summary-json", str(tmp_path / "s.json")])
    workers = [procs.worker(ep) for _ in range(3)]
    coord.wait_for(r"worker 3 joined")
    victim, leaver = random.sample(workers, 2)
    survivor = next(w for w in workers if w is not victim and w is not leaver)
    coord.wait_for(rf"^step {random.randint(5, 60)}/400 ")
    os.kill(victim.pid, signal.SIGKILL)
    lost = coord.wait_for(r"worker \d+ is lost")
    # the survivor holds its shard until the leaver has gone: the job cannot end first
    # (it would in a second on its own); --worker-timeout 30 keeps it a member meanwhile
    os.kill(survivor.pid, signal.SIGSTOP)
    try:
        os.kill(leaver.pid, signal.SIGTERM)
        assert leaver.wait(30) == 128 + signal.SIGTERM, leaver.stderr
        left = coord.wait_for(r"worker \d+ left")
    finally:
        os.kill(survivor.pid, signal.SIGCONT)
    assert coord.wait(120) == 0, coord.stderr
    assert max_param_diff(reference, out) <= ATOL
    s = read_json(tmp_path / "s.json")
    assert s["workers_lost"] == 1 and s["world_size"] == 1
    # a recovery for each step in which a departure left rows to recompute
    held = [m for m in (lost, left) if "go to other workers" in m.string]
    assert bool(s["recovery_seconds"]) == bool(held) and len(s["recovery_seconds"]) <= len(held)
    assert survivor.wait(30) == 0, survivor.stderr  # told to stop when the job finished


def test_coordinator_killed_and_restarted(tmp_path, procs, reference):
    """kill -9 the coordinator; the same command resumes from its checkpoint and the
    workers, which notice the silence, reconnect by themselves."""
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    # both workers take part from the first step: a worker slower to start than the
    # first 45 steps would otherwise meet only the second coordinator, with nothing to notice
    args = [*JOB, "--worker-timeout", "1", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--checkpoint-every", "10", "--min-workers", "2", "--output", str(out)]
    coord = procs.coordinator(ep, args)
    workers = [procs.worker(ep) for _ in range(2)]
    coord.wait_for(r"^step 45/400 ")
    os.kill(coord.pid, signal.SIGKILL)
    coord.wait(30)
    again = procs.coordinator(ep, args)
    again.wait_for(r"resuming from .*ckpt-\d+\.npz at step [1-9]\d*")
    again.wait_for(r"worker 2 joined")
    assert again.wait(120) == 0, again.stderr
    assert max_param_diff(reference, out) <= ATOL
    for w in workers:
        assert w.wait(30) == 0, w.stderr
        assert "reconnecting" in w.stderr or "joining again" in w.stderr


def test_coordinator_sigterm_checkpoints_and_stops_workers(tmp_path, procs, reference):
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    args = [*JOB, "--checkpoint-dir", str(tmp_path / "ckpt"), "--output", str(out)]
    coord = procs.coordinator(ep, args)
    workers = [procs.worker(ep) for _ in range(2)]
    coord.wait_for(r"worker 2 joined")
    coord.wait_for(r"^step \d+/400 ", since=coord.mark())
    os.kill(coord.pid, signal.SIGTERM)
    assert coord.wait(60) == 128 + signal.SIGTERM, coord.stderr
    assert "interrupted by SIGTERM" in coord.stderr
    assert not out.exists()
    for w in workers:
        assert w.wait(30) == 0, w.stderr
        assert "stopped by SIGTERM" in w.stderr
    again = procs.coordinator(ep, args)
    procs.worker(ep)
    assert again.wait(120) == 0, again.stderr
    assert "resuming from" in again.stderr
    assert max_param_diff(reference, out) <= ATOL


def test_worker_with_different_data_is_refused(tmp_path, procs):
    rng = np.random.default_rng(0)
    mine, theirs = tmp_path / "coord", tmp_path / "other"
    mine.mkdir()
    theirs.mkdir()
    X = rng.standard_normal((60, 4))
    y = rng.integers(0, 3, 60)
    np.savez(mine / "d.npz", X=X, y=y)
    X[17, 2] += 1e-9  # one value differs
    np.savez(theirs / "d.npz", X=X, y=y)
    ep = ipc(tmp_path)
    coord = procs.coordinator(ep, ["--data", "d.npz", "--steps", "30", "--log-every", "1"], cwd=mine)
    coord.wait_for("waiting for 1 worker")
    bad = procs.worker(ep, cwd=theirs)
    assert bad.wait(60) == 2
    line = one_error_line(bad.stderr, "ddp-worker")
    assert "data differs from the coordinator's" in line
    good = procs.worker(ep, cwd=mine)
    assert coord.wait(60) == 0, coord.stderr
    assert good.wait(30, context=coord.stderr) == 0


def test_a_stopped_worker_rejoins_as_a_new_member(tmp_path, procs, reference):
    """A real worker's side of a hang: SIGSTOP stands for a hang or a cut network (no
    heartbeat, no closed connection). After --worker-timeout its shard is recomputed by
    the other worker; resumed, the worker joins again as a new member, and the run ends
    exactly where it would have."""
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    coord = procs.coordinator(ep, [*JOB, "--worker-timeout", "1", "--min-workers", "2",
                                   "--output", str(out), "--summary-json", str(tmp_path / "s.json")])
    a, b = procs.worker(ep), procs.worker(ep)
    coord.wait_for(r"worker 2 joined")
    coord.wait_for(r"^step \d+/400 ", since=coord.mark())
    os.kill(b.pid, signal.SIGSTOP)
    try:
        coord.wait_for(r"worker \d+ is lost \(silent for")
        coord.wait_for(r"waiting for 2 workers \(1 connected\)")
    finally:
        os.kill(b.pid, signal.SIGCONT)
    coord.wait_for(r"worker 3 joined")  # the same process, back after noticing the silence
    assert coord.wait(120) == 0, coord.stderr
    assert max_param_diff(reference, out) <= ATOL
    assert read_json(tmp_path / "s.json")["workers_lost"] == 1
    assert a.wait(30) == 0 and b.wait(30) == 0


def test_workers_of_a_silent_coordinator_reconnect_and_the_run_ends_exactly(tmp_path, procs,
                                                                           reference):
    """The coordinator hangs (SIGSTOP): nothing reaches the workers, so each notices the
    silence after --worker-timeout and reconnects; resumed, the coordinator takes them
    back and the run ends where it would have."""
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    coord = procs.coordinator(ep, [*JOB, "--worker-timeout", "1", "--min-workers", "2",
                                   "--output", str(out)])
    workers = [procs.worker(ep), procs.worker(ep)]
    coord.wait_for(r"worker 2 joined")
    coord.wait_for(r"^step \d+/400 ", since=coord.mark())
    os.kill(coord.pid, signal.SIGSTOP)
    try:
        for w in workers:
            w.wait_for(r"coordinator silent for [\d.]+ s; reconnecting")
    finally:
        os.kill(coord.pid, signal.SIGCONT)
    assert coord.wait(120) == 0, coord.stderr
    assert max_param_diff(reference, out) <= ATOL
    assert all(w.wait(30) == 0 for w in workers)


def test_a_worker_says_hello_the_moment_its_connection_is_made(tmp_path, monkeypatch):
    """A worker with no coordinator yet (one not started, or behind a cut link) says
    hello as soon as a connection is made, not at its next periodic hello: the ones it
    said meanwhile were dropped (its socket queues nothing while unconnected). Periodic
    hellos are pushed out of the test's reach, so only the connection can prompt one."""
    from ddp.log import Log
    from ddp.signals import StopRequest
    from ddp.worker import service

    monkeypatch.setattr(service, "HELLO_EVERY", 1e6)
    ep = ipc(tmp_path, "later.sock")
    stop = StopRequest()
    worker = service.WorkerService(ep, Log(0, "ddp-worker", stream=io.StringIO()), stop)
    thread = threading.Thread(target=worker.run, daemon=True)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while worker.hellos.last == -math.inf:  # its first hello went nowhere
            assert time.monotonic() < deadline, "the worker never said its first hello"
            time.sleep(0.01)
        router.bind(ep)
        assert router.poll(30_000), "no hello after the connection was made"
        frames = router.recv_multipart()
        assert protocol.decode(frames[1], protocol.FROM_WORKER)["type"] == "hello"
    finally:
        stop.signum = signal.SIGTERM
        thread.join(30)
        router.close()
        ctx.term()
    assert not thread.is_alive()


def test_embedded_ctrl_c_cleans_up_and_resumes(tmp_path, procs, reference):
    out = tmp_path / "out.npz"
    cmd = [PY, "-m", "ddp", "train", "--backend", "zmq", "--workers", "2", *JOB,
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--output", str(out)]
    p = procs.start(cmd)
    p.wait_for(r"^step 30/400 ")
    children = descendants(p.pid)
    assert len(children) == 2
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    assert p.wait(60) == 130, p.stderr
    assert "interrupted by SIGINT" in p.stderr and not out.exists()
    assert not [pid for pid in children if alive(pid)]
    r = run(cmd, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    assert max_param_diff(reference, out) <= ATOL


def test_embedded_workers_die_with_a_killed_parent(tmp_path, procs):
    p = procs.start([PY, "-m", "ddp", "train", "--backend", "zmq", "--workers", "2", *SMALL,
                     "--steps", "100000", "--log-every", "1"])
    p.wait_for(r"^step 5/")
    children = descendants(p.pid)
    assert len(children) == 2
    os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [c for c in children if alive(c)]:
        time.sleep(0.1)
    assert not [c for c in children if alive(c)]


# --- the coordinator's own logic, in this process: fake peers on real sockets -----------------


def assert_summed_in_order(s, step: int, grad: np.ndarray) -> None:
    """grad is the sum of the step's shards in row order, to the bit."""
    np.testing.assert_array_equal(grad, ordered_sum(step, s.shards_of(step), s.coord.P))


def test_sums_in_shard_order_whoever_answers_first(served):
    s = served()
    a, b = s.peer(), s.peer()
    b.answering = False  # b answers after a, in the opposite order of the rows

    def b_answers_late():
        if a.tasks and b.tasks and len(b.got("task")) > b.sent:
            b.grads(b.tasks[-1])
            b.sent += 1

    b.sent = 0
    s.during_poll = b_answers_late
    for step in range(3):
        grad, (loss, correct, n) = s.run_step(step)
        assert s.shards_of(step) == [(0, 32), (32, 64)]
        assert (loss, correct, n) == (64.0, 0, 64)
        assert_summed_in_order(s, step, grad)
    assert s.coord.steps_done == 3 and s.coord.recoveries == []


def test_worker_joins_mid_run(served):
    """A worker that joins during a step takes a shard from the next step on."""
    s = served()
    first = s.peer()
    grad, _ = s.run_step(0)
    assert s.shards_of(0) == [(0, 64)]
    second = s.peer(join=False)
    first.answering = False

    hello = []

    def join_then_answer():
        if first.tasks[-1]["step"] == 1 and not hello:  # once: the reply may take a few polls
            hello.append(second.say("hello", **HELLO))
        elif second.got("welcome") and first.answering is False:
            first.answering = True
            first.grads(first.tasks[-1])

    s.during_poll = join_then_answer
    grad, _ = s.run_step(1)
    assert s.shards_of(1) == [(0, 64)] and not second.tasks  # joined during step 1
    assert "worker 2 joined (2 workers); it takes a shard from the next step" in s.lines
    s.during_poll = None
    grad, _ = s.run_step(2)
    assert s.shards_of(2) == [(0, 32), (32, 64)]
    assert [t["step"] for t in second.tasks] == [2]
    assert_summed_in_order(s, 2, grad)


def test_worker_leaves_cleanly_and_its_rows_go_elsewhere(served):
    """bye while holding rows: they go to the other member under a new task id; with
    --min-workers 2 the next step waits, and says so, until another one joins."""
    s = served(min_workers=2)
    a, b = s.peer(), s.peer()
    b.answering = False
    late = s.peer(join=False)
    hello = []

    def leave_then_rejoin():
        if b.tasks and b.beating:
            b.say("bye", job=b.job)
            b.beating = False
        if any(line.startswith("waiting for 2 workers (1 connected)") for line in s.lines) \
                and not hello:  # once: the reply may take a few polls
            hello.append(late.say("hello", **HELLO))

    s.during_poll = leave_then_rejoin
    grad, _ = s.run_step(0)
    assert_summed_in_order(s, 0, grad)
    assert s.shards_of(0) == [(0, 32), (32, 64)]
    assert "worker 2 left; rows [32, 64) of step 1 go to other workers (1 left)" in s.lines
    assert [(t["lo"], t["hi"]) for t in a.tasks] == [(0, 32), (32, 64)]
    assert len(s.coord.recoveries) == 1 and s.coord.members.lost == 0
    assert any(line.startswith("step 1 completed ") and line.endswith(" after its rows were reassigned")
               for line in s.lines)
    grad, _ = s.run_step(1)
    assert [t["step"] for t in late.tasks] == [1]
    assert_summed_in_order(s, 1, grad)


def test_hung_worker_times_out_then_rejoins(served):
    """A member silent for --worker-timeout (a hang, a cut network: no closed connection)
    is lost and its rows recomputed; when it speaks again it is told to rejoin and is
    admitted as a new member."""
    s = served(min_workers=2, worker_timeout=0.5, shard_timeout=30)  # no deadline first
    a, b = s.peer(), s.peer()
    b.answering = b.beating = False

    def hang_then_resume():
        lost = any("is lost (silent for" in line for line in s.lines)
        if lost and not b.beating:  # resumed: its first heartbeat is answered with rejoin
            b.beating = b.answering = True

    s.during_poll = hang_then_resume
    grad, _ = s.run_step(0)
    assert_summed_in_order(s, 0, grad)
    line = next(ln for ln in s.lines if "is lost (silent for" in ln)
    assert line.startswith("worker 2 is lost (silent for ") and "rows [32, 64) of step 1 go to" in line
    s.during_poll = None
    grad, _ = s.run_step(1)
    assert "worker 3 joined (2 workers); it takes a shard from the next step" in s.lines
    assert b.got("rejoin") and [t["step"] for t in b.tasks][-1] == 1
    assert s.coord.members.lost == 1 and s.coord.status()["workers_lost"] == 1
    assert_summed_in_order(s, 1, grad)


def test_data_that_differs_is_refused_in_process(served):
    s = served()
    stranger = s.peer(join=False)
    stranger.join(fingerprint="0" * 32)
    reason = stranger.got("refuse")[0]["reason"]
    assert "this worker's data differs from the coordinator's" in reason and "give it the same file" in reason
    assert "ddp-coordinator: warning: refused worker 1: its data differs from the coordinator's" in s.lines
    assert len(s.coord.members) == 0


def test_workers_on_one_host_are_told_their_share_of_its_cores(served):
    """Each member on a host is told cores ÷ the members there (BLAS threads): two on a
    2-core host get 1 each, one on another host keeps its cores, and when one of the two
    leaves, the other is told 2 again."""
    s = served()
    a, b = s.peer(), s.peer()  # HELLO: the same host, 2 cores
    other = s.peer(join=False)
    other.say("hello", host="fedcba9876543210", cores=4)
    s.poll_until(lambda: other.got("welcome"), "the worker on the other host joined")
    s.poll_until(lambda: other.got("threads") and [m["threads"] for m in b.got("threads")][-1:] == [1],
                 "the shares were sent")
    assert [m["threads"] for m in a.got("threads")] == [2, 1]
    assert [m["threads"] for m in other.got("threads")] == [4]
    a.beating = a.rejoining = False  # gone for good: a heartbeat after bye would join it again
    a.say("bye", job=a.job)
    s.poll_until(lambda: [m["threads"] for m in b.got("threads")][-1:] == [2], "b's share after a left")
    assert [m["threads"] for m in b.got("threads")] == [1, 2]
