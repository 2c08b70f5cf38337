"""The ZeroMQ backend end to end: real coordinator and worker processes on real sockets.

Every run is compared with an undisturbed reference run of the same job: whoever
computed which shard, whoever joined, left or died, the final parameters are the
same (float64, up to summation order).
"""
from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
from conftest import MPIRUN, PY, alive, descendants, one_error_line, read_json, run, train
from zmq_helpers import SMALL, ipc, max_param_diff, procs  # noqa: F401, F811 (a fixture)

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


def test_worker_killed_at_a_random_step(tmp_path, procs, reference):
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    coord = procs.coordinator(ep, [*JOB, "--min-workers", "1", "--output", str(out),
                                   "--summary-json", str(tmp_path / "s.json")])
    workers = [procs.worker(ep) for _ in range(3)]
    coord.wait_for(r"worker 3 joined")
    victim = random.choice(workers)
    coord.wait_for(rf"^step {random.randint(5, 60)}/400 ")
    os.kill(victim.pid, signal.SIGKILL)
    lost = coord.wait_for(r"worker \d+ is lost")
    assert coord.wait(120) == 0, coord.stderr
    assert max_param_diff(reference, out) <= ATOL
    s = read_json(tmp_path / "s.json")
    assert s["workers_lost"] == 1 and s["world_size"] == 2
    recoveries = s["recovery_seconds"]  # one if the worker died holding rows of a step
    assert len(recoveries) == ("go to other workers" in lost.string)
    for w in workers:
        if w is not victim:
            assert w.wait(30) == 0, w.stderr  # told to stop when the job finished


def test_worker_joins_mid_run(tmp_path, procs, reference):
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    coord = procs.coordinator(ep, [*JOB, "--output", str(out)])
    first = procs.worker(ep)
    coord.wait_for(r"^step 20/400 ")
    second = procs.worker(ep)
    coord.wait_for(r"worker 2 joined \(2 workers\)")
    assert coord.wait(120) == 0, coord.stderr
    assert max_param_diff(reference, out) <= ATOL
    assert first.wait(30) == 0 and second.wait(30) == 0


def test_worker_leaves_cleanly(tmp_path, procs, reference):
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    coord = procs.coordinator(ep, [*JOB, "--min-workers", "2", "--output", str(out)])
    a, b = procs.worker(ep), procs.worker(ep)
    coord.wait_for(r"^step 30/400 ")
    os.kill(b.pid, signal.SIGTERM)
    assert b.wait(30) == 128 + signal.SIGTERM, b.stderr
    coord.wait_for(r"worker \d+ left")
    # --min-workers 2: the coordinator now waits, and says so, until another one joins
    coord.wait_for(r"waiting for 2 workers \(1 connected\)")
    procs.worker(ep)
    assert coord.wait(120) == 0, coord.stderr
    assert max_param_diff(reference, out) <= ATOL
    assert a.wait(30) == 0


def test_coordinator_killed_and_restarted(tmp_path, procs, reference):
    """kill -9 the coordinator; the same command resumes from its checkpoint and the
    workers, which notice the silence, reconnect by themselves."""
    ep = ipc(tmp_path)
    out = tmp_path / "out.npz"
    args = [*JOB, "--worker-timeout", "1", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--checkpoint-every", "10", "--output", str(out)]
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


def test_hung_worker_times_out_then_rejoins(tmp_path, procs, reference):
    """SIGSTOP stands for a hang or a cut network: no heartbeat, no closed connection.
    After --worker-timeout its shard is recomputed by the other worker; resumed, the
    worker notices the silence, reconnects and joins again as a new member."""
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
