"""The training service end to end, with real processes: ddp-coordinator --state-dir, real
ddp-worker processes that stay, and ddp-job as the client.

Every job that ends `done` must end with the parameters of a single-process ddp-train of the
same config (float64, 1e-10), whatever ran beside it, whoever computed its rows, and
whatever happened to the service meanwhile (SIGTERM, kill -9, restarts).
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
from helpers import PY, _env, free_port, one_error_line, read_json, run, until
from inproc import train_here
from zmq_helpers import ipc, max_param_diff, procs  # noqa: F401 (fixture)

from ddp.threads import ENV_VARS, host_cores

F64 = ["--dtype", "float64"]
TIMEOUT = 120


class Service:
    """A service in tmp_path (its state in tmp_path/state), started and restarted by the test."""

    def __init__(self, procs, tmp_path, args=(), endpoint=None):  # noqa: F811
        self.procs, self.tmp_path = procs, tmp_path
        self.endpoint = endpoint or ipc(tmp_path, "service.sock")
        self.state = tmp_path / "state"
        self.args = ["--state-dir", str(self.state), "--metrics-port", "0", *args]
        self.proc = None
        self.workers = []

    def start(self):
        self.proc = self.procs.coordinator(self.endpoint, self.args)
        self.proc.wait_for(r"^service on ", timeout=60)
        return self.proc

    def worker(self, *args, env=None):
        proc = self.procs.start([PY, "-m", "ddp", "worker", "--connect", self.endpoint, *args], env=env)
        self.workers.append(proc)
        return proc

    def job(self, *args, timeout=TIMEOUT, keys=()):
        command, rest = args[0], args[1:]
        return run([PY, "-m", "ddp", "job", command, "--connect", self.endpoint, *keys, *rest],
                   timeout=timeout)

    def submit(self, *flags, keys=()) -> str:
        result = self.job("submit", *flags, keys=keys)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip().splitlines()[-1]
        assert job_id.isdigit(), result.stdout
        return job_id

    def row(self, job_id) -> dict:
        result = self.job("status", job_id, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait(self, job_id) -> int:
        return self.job("wait", job_id, timeout=TIMEOUT).returncode

    def until(self, done, what: str, timeout: float = 60.0):
        return until(done, what, timeout, log=self.proc.stderr)

    def model(self, job_id):
        return self.state / "jobs" / job_id / "model.npz"

    def record(self, job_id) -> dict:
        return read_json(self.state / "jobs" / job_id / "job.json")["job"]

    def joined(self, job_id) -> list[str]:
        """The workers that joined the job, from its own JSON-lines record."""
        with open(self.state / "jobs" / job_id / "log.jsonl") as fh:
            events = [json.loads(line) for line in fh]
        return [e["worker"] for e in events if e["event"] == "worker_joined"]


def reference(tmp_path, name: str, flags: list[str]):
    """The single-process ddp-train of the same flags: its model file."""
    out = tmp_path / f"ref-{name}.npz"
    result = train_here([*flags, "--output", out, "--quiet"])
    assert result.returncode == 0, result.stderr
    return out


def assert_exact(service: Service, tmp_path, job_id: str, flags: list[str]):
    assert service.record(job_id)["state"] == "done", service.record(job_id)
    assert max_param_diff(service.model(job_id), reference(tmp_path, job_id, flags)) < 1e-10


def test_three_jobs_two_at_once_on_the_same_two_workers_end_as_one_process(tmp_path, procs):  # noqa: F811
    service = Service(procs, tmp_path, ["--max-running", "2"])
    service.start()
    jobs = {
        "a": ["--data", "digits", "--layers", "64,32,10", "--steps", "150", "--batch-size", "64",
              "--lr", "0.05", "--seed", "1", *F64],
        "b": ["--data", "digits", "--layers", "64,48,10", "--steps", "120", "--batch-size", "50",
              "--lr", "0.1", "--momentum", "0.5", "--seed", "2", *F64],
        "c": ["--data", "digits", "--layers", "64,16,10", "--steps", "100", "--batch-size", "40",
              "--seed", "3", "--activation", "tanh", *F64],
    }
    # a and b are submitted before any worker is there: both open, then share the pool
    ids = {k: service.submit(*v, "--name", k) for k, v in jobs.items()}
    assert service.row(ids["c"])["state"] == "queued"
    # no --threads, no OMP_NUM_THREADS: each sizes its BLAS threads as the service says
    env = {k: v for k, v in _env().items() if k not in ENV_VARS}
    workers = [service.worker(env=env), service.worker(env=env)]
    for key in "abc":
        assert service.wait(ids[key]) == 0, service.proc.stderr
    for key, flags in jobs.items():
        assert_exact(service, tmp_path, ids[key], flags)
    a, b, c = (service.record(ids[k]) for k in "abc")
    assert a["started"] < b["ended"] and b["started"] < a["ended"], "a and b ran at once"
    assert c["started"] >= min(a["ended"], b["ended"]) - 1.0
    # the same two processes served all three, and stay for the next job
    assert all(w.p.poll() is None for w in workers)
    names = {k: set(service.joined(ids[k])) for k in "abc"}
    assert names["a"] | names["b"] == {"worker 1", "worker 2"}
    assert names["c"] == {"worker 1", "worker 2"}, "c gets the workers of the jobs that ended"
    # the third job on the digits did not load them again
    assert any("its data is already loaded" in w.stderr for w in workers)
    # two workers on this host: each takes half its cores
    share = f"{max(1, host_cores() // 2)} BLAS thread"
    assert all(f"{share}" in w.stderr and "share of its host" in w.stderr for w in workers)


def test_kill_9_and_sigterm_of_the_service_lose_nothing(tmp_path, procs):  # noqa: F811
    service = Service(procs, tmp_path)
    service.start()
    service.worker(), service.worker()
    long = ["--data", "digits", "--layers", "64,32,10", "--steps", "3000", "--batch-size", "32",
            "--checkpoint-every", "25", "--seed", "4", *F64]
    short = ["--data", "digits", "--layers", "64,24,10", "--steps", "80", "--seed", "5", *F64]
    first, second = service.submit(*long), service.submit(*short)
    service.until(lambda: service.row(first)["step"] >= 60, "the first job past step 60")
    # SIGTERM: the running job checkpoints and stays queued, the service exits 143
    service.proc.p.send_signal(signal.SIGTERM)
    assert service.proc.wait(60) == 143, service.proc.stderr
    assert service.record(first)["state"] == "queued"
    assert list((service.state / "jobs" / first / "checkpoints").glob("ckpt-*.npz"))
    # the same command again: the workers come back by themselves
    service.start()
    urgent = service.submit(*short[:-4], "--seed", "6", *F64, "--priority", "5")
    # the urgent job first (priority 5), then the first one resumes: kill -9 it mid-way
    service.until(lambda: service.row(first)["state"] == "running" and service.row(first)["step"] >= 120,
                  "the first job resumed and past step 120")
    os.kill(service.proc.pid, signal.SIGKILL)
    service.proc.wait(30)
    assert service.record(first)["state"] == "running"  # as a kill -9 leaves it
    service.start()
    for job_id in (first, second, urgent):
        assert service.wait(job_id) == 0, service.proc.stderr
    assert_exact(service, tmp_path, first, long)
    assert_exact(service, tmp_path, second, short)
    assert_exact(service, tmp_path, urgent, [*short[:-4], "--seed", "6", *F64])
    records = {j: service.record(j) for j in (first, second, urgent)}
    assert records[urgent]["started"] < records[second]["started"], "priority 5 runs first"


def test_bad_jobs_end_with_their_state_and_code_while_the_others_finish(tmp_path, procs):  # noqa: F811
    service = Service(procs, tmp_path)
    service.start()
    # invalid: the message of ddp-train itself, exit 2, nothing queued
    bad = service.job("submit", "--data", "digits", "--lr", "-1")
    assert bad.returncode == 2
    assert one_error_line(bad.stderr, "ddp-job").split("error: ", 1)[1] == \
        one_error_line(train_here(["--data", "digits", "--lr", "-1"]).stderr).split("error: ", 1)[1]
    assert json.loads(service.job("list", "--json").stdout) == []
    # data the coordinator read but the workers cannot: there is no worker until it opened
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, X=rng.normal(size=(200, 5)), y=rng.integers(0, 3, 200))
    missing = service.submit("--data", str(data), "--steps", "20", *F64, "--priority", "10")
    service.until(lambda: service.row(missing)["state"] == "running"
                  and service.row(missing)["message"] == "", "the job with data opened")
    data.unlink()
    diverging = service.submit("--data", "digits", "--steps", "50", "--max-loss", "1e-6",
                               "--priority", "9")
    huge = service.submit("--data", "digits", "--layers", "64,100000000000,10", "--priority", "8")
    endless = service.submit("--data", "digits", "--steps", "1000000", "--checkpoint-every", "50",
                             "--priority", "7")
    good = ["--data", "digits", "--layers", "64,20,10", "--steps", "60", "--seed", "7", *F64]
    fine = service.submit(*good, "--priority", "6")
    queued = service.submit("--data", "digits", "--steps", "10")
    cancel = service.job("cancel", queued)
    assert cancel.returncode == 0, cancel.stderr
    workers = [service.worker(), service.worker()]
    assert service.wait(missing) == 2
    assert "no such file" in service.row(missing)["message"]
    assert service.wait(diverging) == 3
    assert "--max-loss" in service.row(diverging)["message"]
    assert service.wait(huge) == 2
    assert "memory" in service.row(huge)["message"]
    service.until(lambda: service.row(endless)["step"] > 60, "the endless job past step 60")
    assert service.job("cancel", endless).returncode == 0
    assert service.wait(endless) == 130
    assert list((service.state / "jobs" / endless / "checkpoints").glob("ckpt-*.npz"))
    assert service.wait(fine) == 0
    assert_exact(service, tmp_path, fine, good)
    assert service.wait(queued) == 130 and service.record(queued)["started"] is None
    assert service.proc.p.poll() is None and all(w.p.poll() is None for w in workers)
    states = {r["id"]: r["state"] for r in json.loads(service.job("list", "--json").stdout)}
    assert states == {missing: "failed", diverging: "diverged", huge: "failed", endless: "cancelled",
                      fine: "done", queued: "cancelled"}
    # a job that is over cannot be cancelled; an unknown one is said so
    assert service.job("cancel", fine).returncode == 2
    assert service.job("status", "99").returncode == 2


def test_fetch_copies_the_model_and_the_summary_over_the_socket(tmp_path, procs):  # noqa: F811
    service = Service(procs, tmp_path)
    service.start()
    service.worker()
    flags = ["--data", "digits", "--layers", "64,10", "--steps", "30", *F64]
    job_id = service.submit(*flags)
    assert service.wait(job_id) == 0
    out = tmp_path / "fetched.npz"
    fetched = service.job("fetch", job_id, "--output", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert out.read_bytes() == service.model(job_id).read_bytes()
    summary = service.job("fetch", job_id, "--summary")
    assert json.loads(summary.stdout)["steps"] == 30
    assert service.job("fetch", job_id).returncode == 2  # a model needs --output


def test_keys_have_one_role_each(tmp_path, procs):  # noqa: F811
    from ddp.keygen import run_keygen

    keys = tmp_path / "keys"
    assert run_keygen([str(keys), "--name", "w1", "--client", "c1"]) == 0
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    service = Service(procs, tmp_path, ["--curve-secret", str(keys / "coordinator.key_secret"),
                                        "--authorized-keys", str(keys / "authorized"),
                                        "--client-keys", str(keys / "clients")], endpoint=endpoint)
    service.start()
    as_client = ["--curve-secret", str(keys / "c1.key_secret"), "--server-key", str(keys / "coordinator.key")]
    as_worker = ["--curve-secret", str(keys / "w1.key_secret"), "--server-key", str(keys / "coordinator.key")]
    refused = service.job("submit", "--data", "digits", keys=as_worker)
    assert refused.returncode == 2 and "worker's" in one_error_line(refused.stderr, "ddp-job")
    intruder = service.worker(*as_client)
    assert intruder.wait(60) == 2
    assert "client's" in one_error_line(intruder.stderr, "ddp-worker")
    job_id = service.submit("--data", "digits", "--steps", "10", keys=as_client)
    service.worker(*as_worker)
    assert service.job("wait", job_id, keys=as_client).returncode == 0
    assert service.job("list", keys=as_worker).returncode == 2
    # a client key the service does not list is refused in the handshake, and told where keys go
    assert run_keygen([str(tmp_path / "other"), "--client", "eve"]) == 0
    stranger = service.job("list", keys=["--curve-secret", str(tmp_path / "other" / "eve.key_secret"),
                                         "--server-key", str(keys / "coordinator.key")])
    assert stranger.returncode == 2
    assert "client's key" in stranger.stderr and "--client-keys" in stranger.stderr, stranger.stderr


def test_the_service_refuses_training_flags_and_a_corrupt_record_is_reported(tmp_path, procs):  # noqa: F811
    both = run([PY, "-m", "ddp", "coordinator", "--bind", ipc(tmp_path), "--state-dir",
                str(tmp_path / "s"), "--epochs", "3"])
    assert both.returncode == 2 and "ddp-job submit" in one_error_line(both.stderr, "ddp-coordinator")
    service = Service(procs, tmp_path)
    service.start()
    job_id = service.submit("--data", "digits", "--steps", "10")
    service.proc.p.send_signal(signal.SIGTERM)
    assert service.proc.wait(60) == 143
    path = service.state / "jobs" / job_id / "job.json"
    path.write_text(path.read_text().replace('"steps"', '"stepz"'))
    service.start()
    row = service.row(job_id)
    assert row["state"] == "failed" and "corrupt" in row["message"]
    assert "corrupt" in service.proc.stderr
    assert '"stepz"' in path.read_text(), "a corrupt record is kept as it is"


def test_the_service_survives_what_arrives_and_trusts_none_of_it(tmp_path, procs):  # noqa: F811
    """Malformed frames, wrong types, unknown requests, hostile arguments (a path for an id,
    a config that is not a table, ids of other jobs) get an error or are dropped; then a
    real job on the same service ends exactly as one process ends it."""
    import random

    import zmq

    from ddp import protocol

    service = Service(procs, tmp_path)
    service.start()
    request = lambda op, **args: protocol.encode("request", op=op, args=args)  # noqa: E731
    hostile = [
        [b""], [b"\xff\xfe"], [b"{}"], [b'{"v": 3, "type": "request"}'], [b"[" * 5000],
        [request("fetch", id="../../../etc/passwd", what="model")], [request("status", id=7)],
        [request("submit", config="--data digits")], [request("submit", config={"data": ["x"]})],
        [request("submit", config={"state_dir": "/"}, name="x")], [request("cancel", id="1")],
        [request("submit", config={"data": "digits"}, priority=10 ** 9)], [request("rm", id="1")],
        [request("submit", config={"data": "digits"}, name="\x1b[2J")],
        [protocol.encode("ready", job="ab" * 8, fingerprint="cd" * 8)],
        [protocol.encode("grads", job="ab" * 8, step=0, task=1, n=1, loss=0.0, correct=0, weight=1.0,
                         seconds=0.0),
         b"\0" * 16],
        [protocol.encode("heartbeat", job="")], [protocol.encode("bye", job="ab" * 8)],
    ]
    rng = random.Random(0)
    hostile += [[rng.randbytes(rng.randrange(1, 200))] for _ in range(50)]
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(service.endpoint)
        for frames in hostile:
            sock.send_multipart(frames)
        replies = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(replies) < 12:
            if sock.poll(100):
                replies.append(protocol.decode(sock.recv_multipart()[0], protocol.TO_CLIENT | {"rejoin"},
                                               protocol.MAX_REPLY_HEADER))
        errors = [r for r in replies if r["type"] == "error"]
        assert len(errors) == 9 and all(r["code"] == 2 for r in errors), replies
        sock.close()
    finally:
        ctx.term()
    assert json.loads(service.job("list", "--json").stdout) == [], "nothing hostile was queued"
    assert service.proc.p.poll() is None
    service.worker()
    flags = ["--data", "digits", "--layers", "64,16,10", "--steps", "40", *F64]
    job_id = service.submit(*flags)
    assert service.wait(job_id) == 0
    assert_exact(service, tmp_path, job_id, flags)
    assert "Traceback" not in service.proc.stderr


def test_a_job_whose_data_differs_on_the_workers_fails_with_their_reason(tmp_path, procs):  # noqa: F811
    """The workers read other data than the coordinator fingerprinted (the file changed
    after the job opened): the job fails with that reason, and the next job runs on the
    same workers."""
    service = Service(procs, tmp_path)
    service.start()
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(1)
    np.savez(data, X=rng.normal(size=(100, 4)), y=rng.integers(0, 2, 100))
    differs = service.submit("--data", str(data), "--steps", "20", *F64)
    service.until(lambda: service.row(differs)["state"] == "running"
                  and service.row(differs)["message"] == "", "the job opened")
    np.savez(data, X=rng.normal(size=(100, 4)), y=rng.integers(0, 2, 100))
    service.worker()
    assert service.wait(differs) == 2
    assert "differs" in service.row(differs)["message"]
    flags = ["--data", "digits", "--layers", "64,10", "--steps", "20", *F64]
    job_id = service.submit(*flags)
    assert service.wait(job_id) == 0
    assert_exact(service, tmp_path, job_id, flags)


def test_a_job_with_every_training_feature_ends_as_one_process(tmp_path, procs):  # noqa: F811
    """Adam + cosine with warmup + clipping + dropout + sample weights, submitted to the
    service and trained by its pool, ends with the parameters of one process."""
    service = Service(procs, tmp_path)
    service.start()
    service.worker(), service.worker()
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 5))
    np.savez(tmp_path / "w.npz", X=X, y=(X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5),
             w=rng.integers(0, 3, 150).astype(float))
    flags = ["--data", str(tmp_path / "w.npz"), "--layers", "5,12,3", "--batch-size", "11", "--steps", "40",
             "--optimizer", "adam", "--lr-schedule", "cosine", "--warmup-steps", "4", "--clip-norm", "0.5",
             "--dropout", "0.2", *F64]
    job_id = service.submit(*flags)
    assert service.wait(job_id) == 0, service.proc.stderr
    assert_exact(service, tmp_path, job_id, flags)
