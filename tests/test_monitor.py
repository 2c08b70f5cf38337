"""Metrics, /healthz, /status, /api/history, --log-jsonl and --pushgateway: the Monitor's
HTTP server on its own, then real runs under mpirun and ZeroMQ that serve them. (The
recorded state and its views without a server: test_monitor_state.py.)"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import MPIRUN, free_port, rank_pids, kill_tree, one_error_line, train, train_cmd
from ddp.monitor import BUCKETS, REJECT_REASONS, STATES, Monitor
from inproc import train_here
from zmq_helpers import procs  # noqa: F401 (fixture)

# every sample the README and the Grafana dashboard rely on (cross-entropy runs)
METRICS = {
    "ddp_train_loss", "ddp_train_accuracy", "ddp_val_loss", "ddp_val_accuracy", "ddp_learning_rate",
    "ddp_grad_norm", "ddp_workers", "ddp_total_steps", "ddp_epoch", "ddp_worker_last_step",
    "ddp_worker_compute_duration_seconds", "ddp_worker_last_report_timestamp_seconds",
    "ddp_start_time_seconds", "ddp_state", "ddp_build_info", "ddp_train_steps_total",
    "ddp_train_samples_total", "ddp_rejected_messages_total", "ddp_worker_failures_total",
    "ddp_worker_joins_total", "ddp_last_checkpoint_timestamp_seconds", "ddp_shard_timeouts_total",
} | {f"ddp_{h}_duration_seconds_{part}" for h in ("step", "compute", "allreduce")
     for part in ("bucket", "sum", "count")}


def get(port: int, path: str, method: str = "GET", timeout: float = 5):
    """(status code, body text, headers) of one request to the monitor."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def scrape(port: int) -> dict:
    """{family name: family} from /metrics, parsed by prometheus_client's own parser."""
    code, body, headers = get(port, "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body)}


def value(families: dict, name: str, **labels) -> float:
    """The value of the sample `name` (full sample name, e.g. ..._total) with these labels."""
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name} {labels}")


def poll(fn, timeout: float, what: str):
    """fn()'s first truthy result within `timeout` s, else fail saying `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = fn()
        except (OSError, KeyError, ValueError):
            got = None
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def new_monitor() -> Monitor:
    return Monitor(backend="mpi", total_steps=100, layers=(4, 8, 3), parameters=67, lr=0.05,
                   classify=True, stall_timeout=0.3)


@pytest.fixture
def monitor():
    """A served Monitor that stops at once at the end (no wait for a last poll)."""
    m = new_monitor()
    port = m.serve("127.0.0.1", 0, linger=0)
    yield m, port
    m.close(0, None)


# --- the server on its own ---------------------------------------------------------------


def test_steps_show_in_metrics_status_and_history(monitor):
    m, port = monitor
    before = time.time()
    m.start(0, steps_per_epoch=10, n_workers=2)
    m.worker_report("rank-0", 0, None)
    for step in range(1, 6):
        m.step_done(step, n=32, loss_sum=32 * (1.0 / step), correct=16, t_step=0.002 * step,
                    t_compute=0.0015 * step, t_exchange=0.0005 * step)
    m.worker_report("rank-0", 5, 0.0015)
    m.worker_report("rank-1", 4, 0.003)
    m.evaluated(5, 0.75, 0.625)
    fams = scrape(port)
    assert value(fams, "ddp_train_steps_total") == 5
    assert value(fams, "ddp_train_samples_total") == 160
    assert value(fams, "ddp_val_loss") == 0.75 and value(fams, "ddp_val_accuracy") == 0.625
    assert value(fams, "ddp_learning_rate") == 0.05
    assert value(fams, "ddp_workers") == 2
    assert value(fams, "ddp_state", state="training") == 1
    assert sum(value(fams, "ddp_state", state=s) for s in STATES) == 1
    assert value(fams, "ddp_worker_last_step", worker="rank-1") == 4
    assert value(fams, "ddp_worker_compute_duration_seconds", worker="rank-1") == 0.003
    reported = value(fams, "ddp_worker_last_report_timestamp_seconds", worker="rank-0")
    assert before - 0.01 <= reported <= time.time() + 0.01  # a unix time, not a monotonic one
    for reason in REJECT_REASONS:  # present from the start, so rate() has a series
        assert value(fams, "ddp_rejected_messages_total", reason=reason.replace(" ", "_").replace("-", "_")) == 0
    # histograms: cumulative buckets, count and sum of what was observed
    steps = fams["ddp_step_duration_seconds"]
    buckets = [s for s in steps.samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert len(buckets) == len(BUCKETS) and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5
    assert value(fams, "ddp_step_duration_seconds_count") == 5
    assert abs(value(fams, "ddp_step_duration_seconds_sum") - 0.002 * 15) < 1e-12
    le_0005 = [s.value for s in buckets if s.labels["le"] == "0.005"][0]
    assert le_0005 == 2  # 0.002 and 0.004; 0.006 and up are above
    assert "ddp_last_checkpoint_timestamp_seconds" not in fams  # no checkpoint yet
    m.checkpointed(5, "/tmp/ckpt")
    assert "ddp_last_checkpoint_timestamp_seconds" in scrape(port)

    code, body, _ = get(port, "/status")
    status = json.loads(body)
    assert code == 200 and status["state"] == "training" and status["step"] == 5
    assert status["epoch"] == 0.5 and status["val_loss"] == 0.75
    assert {w["name"]: w["last_step"] for w in status["worker_list"]} == {"rank-0": 5, "rank-1": 4}
    assert status["last_checkpoint_step"] == 5

    history = json.loads(get(port, "/api/history")[1])
    assert history["val"] == [{"seq": history["val"][0]["seq"], "t": history["val"][0]["t"], "step": 5,
                               "val_loss": 0.75, "val_accuracy": 0.625}]
    assert json.loads(get(port, f"/api/history?after={history['seq']}")[1])["val"] == []
    assert get(port, "/api/history?after=x")[0] == 400


def test_healthz_turns_503_when_steps_stall(monitor):
    m, port = monitor
    m.start(0, steps_per_epoch=10, n_workers=1)
    m.step_done(1, 32, 1.0, 1, 0.01, 0.01, 0.0)
    assert get(port, "/healthz")[0] == 200
    time.sleep(0.5)  # --stall-timeout is 0.3 s here
    code, body, _ = get(port, "/healthz")
    assert code == 503 and body.startswith("stalled: no step completed")
    m.set_state("waiting-for-workers")  # waiting is not a fault of this process
    time.sleep(0.5)
    assert get(port, "/healthz")[0] == 200
    m.set_state("training")
    m.step_done(2, 32, 1.0, 1, 0.01, 0.01, 0.0)
    assert get(port, "/healthz")[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_port_is_read_only(monitor, method):
    m, port = monitor
    code, _, headers = get(port, "/metrics", method=method)
    assert code == 405 and headers["Allow"] == "GET, HEAD"
    assert get(port, "/status")[0] == 200


@pytest.mark.parametrize("path", ["/nope", "/static/../monitor.py", "/static/%2e%2e/monitor.py",
                                  "/static/", "/metrics/../../etc/passwd", "//etc/passwd"])
def test_unknown_paths_are_404(monitor, path):
    assert get(monitor[1], path)[0] == 404


def test_head_has_no_body_and_slow_clients_do_not_block_others(monitor):
    m, port = monitor
    idle = socket.create_connection(("127.0.0.1", port))  # connects and says nothing
    try:
        code, body, _ = get(port, "/healthz", method="HEAD")
        assert code == 200 and body == ""
        assert get(port, "/status")[0] == 200
    finally:
        idle.close()


def test_openmetrics_is_served_when_asked_for(monitor):
    m, port = monitor
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read().decode()
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_a_watcher_sees_the_final_state_before_the_server_stops():
    """Someone polled recently, so close() keeps serving until a poll has shown the end."""
    m = new_monitor()
    port = m.serve("127.0.0.1", 0, linger=60)
    m.start(0, steps_per_epoch=10, n_workers=1)
    m.step_done(1, 32, 1.0, 1, 0.01, 0.01, 0.0)
    assert json.loads(get(port, "/api/history")[1])["state"] == "training"
    summary = {"interrupted": False, "val_loss": 0.5, "val_accuracy": 0.75}
    closing = threading.Thread(target=m.close, args=(0, summary))
    closing.start()
    try:
        final = poll(lambda: (h := json.loads(get(port, "/api/history")[1]))["state"] == "done" and h,
                     30, "the final state in /api/history")
        closing.join(30)
        assert not closing.is_alive(), "close() still waiting after the final state was polled"
        assert final["state"] == "done"
        with pytest.raises(OSError):  # and then the port is closed
            get(port, "/status", timeout=2)
    finally:
        closing.join(60)


def test_a_poll_answered_before_the_end_is_not_the_watchers_last():
    """A poll whose answer was built before the run ended showed the state before the end:
    it must not let close() stop serving (the watcher would never see the final state)."""
    m = new_monitor()
    m.serve("127.0.0.1", 0, linger=60)
    server = m.server
    try:
        server.run_ended()
        server.served("/api/history", after_end=False)
        assert not server.final_seen.is_set()
        server.served("/api/history", after_end=True)
        assert server.final_seen.is_set()
    finally:
        m.close(0, None)


# --- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--metrics-port", "70000"], "--metrics-port must be a port number"),
    (["--metrics-port", "-1"], "--metrics-port must be a port number"),
    (["--metrics-port", "abc"], "expected an int"),
    (["--metrics-addr", " "], "--metrics-addr must not be empty"),
    (["--stall-timeout", "0"], "--stall-timeout must be a positive number"),
    (["--pushgateway", "localhost:9091"], "expected a URL like http://localhost:9091"),
    (["--pushgateway", "ftp://h:1"], "expected a URL like"),
    (["--log-jsonl", "/nonexistent-dir/x.jsonl"], "directory /nonexistent-dir does not exist"),
    (["--metrics-addr", "256.1.1.1", "--metrics-port", "1"], "cannot serve there"),
])
def test_bad_observability_flags_are_one_line_errors(args, needle, tmp_path):
    r = train_here(["--steps", "2", *args], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in one_error_line(r.stderr)


def test_a_busy_metrics_port_is_an_error_under_mpirun(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = train(["--steps", "2", "--metrics-port", str(port)], n=2, cwd=tmp_path, timeout=90)
    assert r.returncode == 2, r.stderr
    assert f"--metrics-port {port} on 127.0.0.1: cannot serve there" in one_error_line(r.stderr)


def test_coordinator_default_port_busy_is_a_warning(procs, tmp_path):
    """ddp-coordinator serves on 9108 unless told otherwise; if 9108 is taken it says so and trains."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 9108))
        except OSError:
            pytest.skip("port 9108 is in use on this machine")
        s.listen()
        endpoint = f"ipc://{tmp_path}/c.sock"
        coord = procs.coordinator(endpoint, ["--steps", "20", "--workers", "1"], cwd=tmp_path)
        coord.wait_for(r"metrics port 9108 is busy .*serving no metrics", timeout=60)
        assert coord.wait(120) == 0, coord.stderr


# --- real runs --------------------------------------------------------------------------------

RUN = ["--data", "random:4096", "--layers", "784,128,10", "--batch-size", "128", "--lr", "0.01",
       "--val-fraction", "0.1", "--eval-every", "50", "--log-every", "25"]


def test_mpi_run_serves_metrics_and_writes_jsonl(tmp_path, procs):
    port, record = free_port(), tmp_path / "run.jsonl"
    run = procs.start(train_cmd([*RUN, "--steps", "2500", "--metrics-port", str(port), "--log-jsonl",
                                 str(record), "--checkpoint-dir", str(tmp_path / "ck"),
                                 "--checkpoint-every", "100"], n=2), cwd=tmp_path)
    first = poll(lambda: (s := scrape(port)) and value(s, "ddp_train_steps_total") > 0 and s, 90,
                 "the first step in /metrics")
    status = poll(lambda: (s := json.loads(get(port, "/status")[1]))["val_loss"] is not None
                  and s["last_checkpoint_step"] and s, 90, "an evaluation and a checkpoint in /status")
    assert status["backend"] == "mpi" and status["workers"] == 2 and status["total_steps"] == 2500
    assert {w["name"] for w in status["worker_list"]} == {"rank-0", "rank-1"}
    later = poll(lambda: (s := scrape(port)) and value(s, "ddp_worker_last_step", worker="rank-1") > 0
                 and value(s, "ddp_train_steps_total") > value(first, "ddp_train_steps_total") and s,
                 60, "steps and rank 1's report advancing")
    names = {sample.name for family in later.values() for sample in family.samples}
    assert not METRICS - names, f"missing: {METRICS - names}"
    assert value(later, "ddp_build_info", backend="mpi") == 1
    assert value(later, "ddp_grad_norm") > 0
    steps_total = value(later, "ddp_train_steps_total")  # batches of 128, one shorter per epoch
    assert 100 * steps_total < value(later, "ddp_train_samples_total") <= 128 * steps_total
    assert 0 < value(later, "ddp_compute_duration_seconds_sum") < value(later, "ddp_step_duration_seconds_sum")
    code, body, _ = get(port, "/healthz")
    assert code == 200 and body.startswith("ok")
    assert run.wait(240) == 0, run.stderr

    records = [json.loads(line) for line in record.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "end" and "checkpoint" in kinds
    assert records[0]["config"]["steps"] == 2500 and records[-1]["exit_code"] == 0
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(25, 2501, 25))
    assert all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 and r["samples_per_second"] > 0
               and r["step_seconds"] >= r["compute_seconds"] for r in steps)
    assert steps[-1]["val_loss"] is not None
    assert records[-1]["summary"]["steps"] == 2500


def test_a_hung_rank_is_named(tmp_path, procs):
    """A stopped rank blocks the Allreduce; its reports stop and its step falls behind, and
    /healthz says the run stalled. When it resumes, so does the run."""
    if MPIRUN is None:
        pytest.skip("no mpirun")
    port = free_port()
    run = procs.start(train_cmd([*RUN, "--steps", "100000", "--metrics-port", str(port),
                                 "--stall-timeout", "2"], n=3), cwd=tmp_path)
    poll(lambda: value(scrape(port), "ddp_worker_last_step", worker="rank-2") > 5, 90, "rank 2 reporting")
    ranks = rank_pids(run.pid)
    assert sorted(ranks) == [0, 1, 2]
    os.kill(ranks[2], signal.SIGSTOP)
    try:
        def named():
            status = json.loads(get(port, "/status")[1])
            by = {w["name"]: w for w in status["worker_list"]}
            quiet = by["rank-2"]["seconds_since_report"] > 3 and by["rank-0"]["seconds_since_report"] < 2
            return quiet and by["rank-2"]["last_step"] <= by["rank-0"]["last_step"] and status
        poll(named, 60, "rank 2 named as the one that stopped reporting")
        code, body, _ = get(port, "/healthz")
        assert code == 503 and "stalled" in body
    finally:
        os.kill(ranks[2], signal.SIGCONT)
    poll(lambda: get(port, "/healthz")[0] == 200, 30, "/healthz back to 200 after the rank resumed")
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(60) == 130, run.stderr


def test_zmq_run_names_workers_and_counts_failures(tmp_path, procs):
    port, endpoint = free_port(), f"ipc://{tmp_path}/c.sock"
    coord = procs.coordinator(endpoint, [*RUN, "--steps", "100000", "--metrics-port", str(port),
                                         "--min-workers", "1", "--worker-timeout", "2"], cwd=tmp_path)
    poll(lambda: json.loads(get(port, "/status")[1])["state"] == "waiting-for-workers", 60,
         "state waiting-for-workers")
    assert get(port, "/healthz")[0] == 200
    workers = [procs.worker(endpoint, cwd=tmp_path) for _ in range(2)]
    fams = poll(lambda: (s := scrape(port)) and value(s, "ddp_workers") == 2 and all(
        value(s, "ddp_worker_last_step", worker=f"worker {i}") > 0 for i in (1, 2)) and s, 90,
        "two workers computing")
    assert value(fams, "ddp_worker_joins_total") == 2 and value(fams, "ddp_worker_failures_total") == 0
    assert value(fams, "ddp_build_info", backend="zmq") == 1
    kill_tree(workers[0].p)  # a failure: counted, and the worker leaves the gauges
    fams = poll(lambda: (s := scrape(port)) and value(s, "ddp_worker_failures_total") == 1 and s, 60,
                "the failure counted")
    status = json.loads(get(port, "/status")[1])
    states = {w["name"]: w["state"] for w in status["worker_list"]}
    assert states == {"worker 1": "lost", "worker 2": "active"} or \
        states == {"worker 1": "active", "worker 2": "lost"}
    assert status["workers"] == 1 and value(fams, "ddp_workers") == 1
    # garbage from a stranger is counted by reason
    import zmq

    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.connect(endpoint)
        s.send(b"not json")
        poll(lambda: value(scrape(port), "ddp_rejected_messages_total", reason="malformed") >= 1, 30,
             "the malformed message counted")
        s.close(linger=0)
    finally:
        ctx.term()
    os.kill(coord.pid, signal.SIGTERM)
    assert coord.wait(60) == 143, coord.stderr


@pytest.mark.skipif(not shutil.which("prometheus-pushgateway"),
                    reason="prometheus-pushgateway is not installed (apt-get install prometheus-pushgateway)")
def test_pushgateway_receives_the_outcome(tmp_path):
    port = free_port()
    gw = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll(lambda: get(port, "/-/ready")[0] == 200, 30, "the pushgateway to start")
        url = f"http://127.0.0.1:{port}"
        before = time.time()
        ok = train(["--steps", "30", "--pushgateway", url], n=2, cwd=tmp_path, timeout=120)
        assert ok.returncode == 0, ok.stderr
        fams = scrape(port)
        success = value(fams, "ddp_last_success_timestamp_seconds", job="ddp_train")
        assert before <= success <= time.time()  # pushed by this run
        assert value(fams, "ddp_run_exit_code", job="ddp_train") == 0
        assert value(fams, "ddp_final_loss", job="ddp_train") > 0
        assert value(fams, "ddp_run_steps", job="ddp_train") == 30
        # a failed run records its exit code and keeps the last success
        bad = train(["--steps", "30", "--lr", "1e30", "--pushgateway", url], cwd=tmp_path, timeout=120)
        assert bad.returncode == 3, bad.stderr
        fams = scrape(port)
        assert value(fams, "ddp_run_exit_code", job="ddp_train") == 3
        assert value(fams, "ddp_last_success_timestamp_seconds", job="ddp_train") == success
    finally:
        gw.terminate()
        gw.wait(10)


def test_an_unreachable_pushgateway_only_warns(tmp_path):
    port = free_port()  # nothing listens there
    r = train_here(["--steps", "5", "--pushgateway", f"http://127.0.0.1:{port}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"--pushgateway http://127.0.0.1:{port}: push failed" in r.stderr
    assert "Traceback" not in r.stderr
