"""The Grafana dashboard against a real Prometheus scraping a real run.

For each backend (a ZeroMQ coordinator with two workers, and mpirun -n 2), a real Prometheus
(with deploy/prometheus/prometheus.yml, pointed at the run's ports and scraping every 0.25 s)
scrapes a real training run and, when the Pushgateway is installed, the Pushgateway the run
pushes its outcome to. Then every query of deploy/grafana/dashboards/ddp-train.json must
return data over the run's time window, as Grafana would ask for it; all but the training
service's own (its jobs and pool, which a one-job run has not: tests/test_service_monitor.py
asks for those, and for every other query, of a scraped service).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from helpers import MPIRUN, PY, free_port, train_cmd
from zmq_helpers import Proc, ipc

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
if not os.access(PROMETHEUS, os.X_OK):
    pytest.skip("no Prometheus server: /usr/bin/prometheus is absent (apt-get install prometheus)",
                allow_module_level=True)
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")

yaml = pytest.importorskip("yaml", reason="PyYAML reads the deploy files: pip install pyyaml")
from test_deploy import (DEPLOY, dashboard_exprs, load_dashboard, pushed_only,  # noqa: E402
                         service_only)

SCRAPE = "250ms"
JOB = "ddp-train"        # the scrape job of deploy/prometheus/prometheus.yml
# (steps, every): a run of `steps` with evaluations and checkpoints every `every` steps; a
# machine that runs it in less than MIN_SCRAPES scrapes gets one 4 times longer (and so on)
RUNS = {"zmq": (3000, 300), "mpi": (12000, 1000)}
MIN_SCRAPES = 6
ATTEMPTS = 3
WORKERS = {"zmq": {"worker 1", "worker 2"}, "mpi": {"rank-0", "rank-1"}}


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(url: str, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            pytest.fail(f"{proc.cmd[0]} exited ({proc.p.returncode}):\n{proc.stderr}")
        try:
            if http_get(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} not ready within {timeout}s:\n{proc.stderr}")


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        status, body = http_get(f"{self.base}/api/v1/{path}?{query}")
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", f"{path} {params}: {reply}"
        return reply["data"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step="1")["result"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def finite_values(series: list[dict]) -> list[float]:
    return [float(v) for s in series for _, v in s["values"] if math.isfinite(float(v))]


def wait_scraping(prom: Prom, prometheus: Proc, timeout: float = 30) -> None:
    """Until Prometheus has tried every target once: it applies its targets a few seconds after
    it is ready, and a short run must not end before the first scrape."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = prom.api("targets")["activeTargets"]
        if targets and all(t["health"] != "unknown" for t in targets):
            return
        time.sleep(0.1)
    pytest.fail(f"Prometheus did not scrape its targets within {timeout}s:\n{prometheus.stderr}")


def prometheus_config(metrics_port: int, pushgateway_port: int | None) -> dict:
    """deploy/prometheus/prometheus.yml, scraping faster, at this run's ports."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=SCRAPE, scrape_timeout=SCRAPE,
                            evaluation_interval=SCRAPE)
    ports = {"localhost:9108": metrics_port, "localhost:9091": pushgateway_port}
    jobs = []
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{ports[t]}" for t in static["targets"]]
        if pushgateway_port is not None or job["job_name"] != "pushgateway":
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def start_prometheus(tmp, metrics_port: int, pushgateway_port: int | None, start) -> Prom:
    """A Prometheus on deploy/prometheus/prometheus.yml at these ports (prometheus_config), its
    files in tmp, started by `start` (which keeps it to be killed), once it has tried every
    target."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(metrics_port, pushgateway_port)))
    prometheus = start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}"])
    wait_ready(f"http://127.0.0.1:{port}/-/ready", prometheus)
    prom = Prom(port)
    wait_scraping(prom, prometheus)
    return prom


@pytest.fixture(scope="module", params=sorted(RUNS))
def observed(request, tmp_path_factory):
    """A run of the backend, watched by Prometheus (and the Pushgateway, when installed)."""
    backend = request.param
    if backend == "mpi" and MPIRUN is None:
        pytest.skip("no mpirun/mpiexec found (pip install mpich)")
    tmp = tmp_path_factory.mktemp(f"prom-{backend}")
    started: list[Proc] = []

    def start(cmd):
        proc = Proc(cmd)
        started.append(proc)
        return proc

    try:
        metrics_port = free_port()
        pushgateway_url = pg_port = None
        if PUSHGATEWAY:
            pg_port = free_port()
            pg = start([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{pg_port}",
                        f"--persistence.file={tmp / 'pushgateway.data'}"])
            wait_ready(f"http://127.0.0.1:{pg_port}/-/ready", pg)
            pushgateway_url = f"http://127.0.0.1:{pg_port}"
        prom = start_prometheus(tmp, metrics_port, pg_port, start)

        steps, every = RUNS[backend]
        for attempt in range(ATTEMPTS):
            start_time = time.time() - 1
            run = run_once(backend, steps * 4 ** attempt, every * 4 ** attempt, metrics_port,
                           pushgateway_url, tmp / f"run{attempt}", start)
            end_time = time.time() + 1
            # scrapes of the run: its window also holds a little before and after it
            (up,) = prom.query(f'sum_over_time(up{{job="{JOB}"}}[{end_time - start_time:.0f}s])')
            if float(up["value"][1]) >= MIN_SCRAPES:
                break
        if pushgateway_url:   # the outcome is pushed as the run ends: wait for a scrape of it
            deadline = time.monotonic() + 30
            pushed = f'ddp_run_end_timestamp_seconds{{job="ddp_train"}} >= {start_time:.3f}'
            while not prom.query(pushed):   # the last run's push, not an earlier one
                if time.monotonic() > deadline:
                    pytest.fail("Prometheus never saw the run's push to the Pushgateway\n"
                                + run.stderr)
                time.sleep(0.2)
        end_time = time.time() + 1
        summary = json.loads((tmp / f"run{attempt}" / "summary.json").read_text())
        yield dict(backend=backend, prom=prom, start=start_time, end=end_time, summary=summary,
                   pushgateway=pushgateway_url, stderr=run.stderr)
    finally:
        for proc in started:
            proc.kill()


def run_once(backend: str, steps: int, every: int, metrics_port: int, pushgateway_url, tmp,
             start) -> Proc:
    """One training run with metrics, to its end (exit 0); its workers too under ZeroMQ."""
    tmp.mkdir()
    args = ["--data", "spiral", "--steps", str(steps), "--val-fraction", "0.2",
            "--eval-every", str(every), "--checkpoint-every", str(every), "--log-every", str(every),
            "--metrics-port", str(metrics_port), "--checkpoint-dir", str(tmp / "ckpt"),
            "--summary-json", str(tmp / "summary.json")]
    if pushgateway_url:
        args += ["--pushgateway", pushgateway_url]
    if backend == "zmq":
        endpoint = ipc(tmp)
        run = start([PY, "-m", "ddp", "coordinator", "--bind", endpoint, "--min-workers", "2",
                     *args])
        workers = [start([PY, "-m", "ddp", "worker", "--connect", endpoint, "--threads", "1"])
                   for _ in range(2)]
    else:
        run = start(train_cmd([*args, "--threads", "1"], n=2))
        workers = []
    assert run.wait(300) == 0, run.stderr
    for worker in workers:
        assert worker.wait(30) == 0, worker.stderr
    return run


def test_prometheus_scraped_the_run(observed):
    prom = observed["prom"]
    pools = {t["scrapePool"] for t in prom.api("targets")["activeTargets"]}
    assert JOB in pools and (observed["pushgateway"] is None or "pushgateway" in pools)
    up = prom.query_range(f'up{{job="{JOB}"}}', observed["start"], observed["end"])
    assert 1.0 in finite_values(up), f"the run's target was never up: {up}"


def dashboard_variables(prom, observed) -> dict[str, str]:
    """The dashboard's template variables as Grafana fills them: each query's values, or
    for a variable that found none but offers All, its All value (the service's $job on a
    one-job run, whose series have no exported_job label)."""
    values = {}
    for var in load_dashboard()["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        selector = m.group(1)
        for name, value in values.items():
            selector = re.sub(rf"\${name}\b", lambda _: value, selector)
        found = prom.api(f"label/{m.group(2)}/values", **{
            "match[]": selector, "start": observed["start"], "end": observed["end"]})
        assert found or var.get("includeAll"), f"variable {var['name']}: {query} found nothing"
        values[var["name"]] = "|".join(map(regex_escape, found)) if found else var["allValue"]
    return values


def regex_escape(value: str) -> str:
    """A label value as a regex inside a double-quoted PromQL string, as Grafana writes it:
    a backslash before each regex metacharacter, then the string's own escapes."""
    regex = "".join("\\" + c if c in "\\^$.|?*+()[]{}" else c for c in value)
    return regex.replace("\\", "\\\\").replace('"', '\\"')


def substitute(expr: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)


def test_every_dashboard_query_has_data(observed):
    prom = observed["prom"]
    variables = dashboard_variables(prom, observed)
    assert variables["scrape_job"] == regex_escape(JOB) == JOB
    assert variables["job"] == ".*"     # a one-job run: no exported_job; All matches its series
    empty = []
    for expr in dashboard_exprs():
        if pushed_only(expr) or service_only(expr):   # the service's: tests/test_service_monitor.py
            continue
        series = prom.query_range(substitute(expr, variables), observed["start"], observed["end"])
        if not finite_values(series):
            empty.append(f"{expr}\n    -> {series}")
    assert not empty, (f"{observed['backend']}: no finite value in the run's window for:\n"
                       + "\n".join(empty) + "\n--- run stderr:\n" + observed["stderr"][-3000:])


def test_pushed_outcome_on_the_dashboard(observed):
    if observed["pushgateway"] is None:
        pytest.skip("no Pushgateway (apt-get install prometheus-pushgateway)")
    prom = observed["prom"]
    exprs = [e for e in dashboard_exprs() if pushed_only(e)]
    assert exprs
    empty = [e for e in exprs
             if not finite_values(prom.query_range(e, observed["start"], observed["end"]))]
    assert not empty, empty
    (code,) = prom.query('ddp_run_exit_code{job="ddp_train"}')
    assert float(code["value"][1]) == 0.0


def test_worker_series(observed):
    """The per-worker series are labelled as the spec says, one per rank or worker."""
    prom = observed["prom"]
    series = prom.query_range(f'ddp_worker_last_step{{job="{JOB}"}}', observed["start"],
                              observed["end"])
    assert {s["metric"]["worker"] for s in series} == WORKERS[observed["backend"]]
    workers = finite_values(prom.query_range(f'ddp_workers{{job="{JOB}"}}', observed["start"],
                                             observed["end"]))
    assert max(workers) == 2
    steps = finite_values(prom.query_range(f'ddp_train_steps_total{{job="{JOB}"}}',
                                           observed["start"], observed["end"]))
    assert 0 < max(steps) <= observed["summary"]["steps"]
