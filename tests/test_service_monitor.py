"""What the training service shows, in process: a ServiceMonitor on a free port of
127.0.0.1, jobs added and fed through their Monitors as the service feeds them.

/metrics (each job's families, those of a one-job run, labelled job="<id>"; ddp_jobs by
state; the queue and run-time histograms; the pool; the bound on finished jobs), /status,
/status?job=, /api/history?job=, /healthz and the refusal of bad requests. Then a real
Prometheus scraping the ServiceMonitor answers by exported_job and has data for every query
of the Grafana dashboard, and a real headless Chromium shows the jobs table and switches its
charts to the job whose row is clicked.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from ddp.monitor import JOB_STATES, MAX_FINISHED, STATES, Monitor, ServiceMonitor, prometheus
from test_dashboard import CHROMEDRIVER, CHROMIUM, chromium, wait_page
from test_monitor import get, scrape, value
from zmq_helpers import Proc

PROMETHEUS = "/usr/bin/prometheus"
LAYERS = (2, 8, 3)


def add(service: ServiceMonitor, job_id: str, name: str | None = None, total_steps: int = 100,
        jsonl: str | None = None) -> Monitor:
    m = service.add_job(job_id, name=name or f"job {job_id}", total_steps=total_steps,
                        layers=LAYERS, parameters=51, lr=0.1, classify=True, jsonl=jsonl)
    m.set_state("waiting-for-workers")
    m.start(0, steps_per_epoch=10, n_workers=2)
    m.worker_joined("worker 1", 0)
    return m


def feed(m: Monitor, steps: int, loss: float, point: bool = False) -> None:
    """`steps` more steps of 32 samples at this mean loss (accuracy 0.75); with `point`
    the last of them closes the current second, so that they make a history point (the
    run's first step always does)."""
    for i in range(steps):
        if point and i == steps - 1:
            m.run.window.start -= 10
        step = m.run.step + 1
        m.step_done(step, 32, loss * 32, 24, 0.004, 0.003, 0.001)
        m.worker_report("worker 1", step, 0.003)


def row(job_id: str, state: str, **fields) -> dict:
    base = {"id": job_id, "name": f"job {job_id}", "state": state, "priority": 0, "step": 0,
            "total_steps": 100, "loss": None, "accuracy": None, "eta_seconds": None,
            "workers": 0, "submitted": 1.7e9, "started": None, "ended": None,
            "exit_code": None, "message": ""}
    return {**base, **fields}


def samples(text: str, **labels) -> dict:
    """{(sample name, sorted labels): value} of the exposition text's samples that carry
    all these labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if all(s.labels.get(k) == v for k, v in labels.items())}


def one_line(body: str) -> bool:
    return body.endswith("\n") and body.count("\n") == 1 and "Traceback" not in body


@pytest.fixture
def service():
    s = ServiceMonitor("127.0.0.1", 0, stall_timeout=60)
    yield s
    s.close()


# --- /metrics -----------------------------------------------------------------------------


def test_each_job_has_the_families_of_a_one_job_run_labelled_with_its_id(service):
    a, b = add(service, "a"), add(service, "b")
    feed(a, 5, 0.5)
    feed(b, 3, 2.0)
    a.evaluated(5, 0.75, 0.625)
    a.checkpointed(5, "ckpt-5.npz")
    text = get(service.port, "/metrics")[1]
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert value(fams, "ddp_train_steps_total", job="a") == 5
    assert value(fams, "ddp_train_steps_total", job="b") == 3
    assert value(fams, "ddp_train_loss", job="a") == 0.5 and value(fams, "ddp_train_loss", job="b") == 2.0
    assert value(fams, "ddp_state", job="b", state="training") == 1
    assert sum(value(fams, "ddp_state", job="a", state=s) for s in STATES) == 1
    assert value(fams, "ddp_worker_last_step", job="a", worker="worker 1") == 5
    assert value(fams, "ddp_step_duration_seconds_count", job="a") == 5
    # job a's samples are exactly what a one-job run of its RunState serves, plus job="a"
    alone = generate_latest(prometheus.registry(a.run)).decode()
    want = {(name, tuple(sorted((*labels, ("job", "a"))))): v
            for (name, labels), v in samples(alone).items()}
    got = samples(text, job="a")
    assert set(got) == set(want)
    stamp = "ddp_worker_last_report_timestamp_seconds"    # unix time from monotonic: rounding
    assert {k: v for k, v in got.items() if k[0] != stamp} == \
        {k: v for k, v in want.items() if k[0] != stamp}
    # each family once (the jobs' samples merged into it), the service's build without a job
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    builds = [(s.labels.get("job"), s.labels["backend"]) for s in fams["ddp_build_info"].samples]
    assert builds == [(None, "service"), ("a", "zmq"), ("b", "zmq")]


def test_jobs_by_state_queue_and_run_times_and_the_pool(service):
    service.set_jobs([row("a", "running"), row("b", "running"), row("q", "queued"),
                      row("d", "done"), row("x", "diverged", loss=math.nan)])
    service.set_pool(3, 1)
    service.observe_queue(2.0)
    service.observe_queue(40.0)
    service.observe_duration(5400.0)
    fams = scrape(service.port)
    want = {"queued": 1, "running": 2, "done": 1, "failed": 0, "diverged": 1, "cancelled": 0}
    assert {s: value(fams, "ddp_jobs", state=s) for s in JOB_STATES} == want
    assert value(fams, "ddp_job_queue_seconds_count") == 2
    assert value(fams, "ddp_job_queue_seconds_sum") == 42.0
    assert value(fams, "ddp_job_queue_seconds_bucket", le="1.0") == 0
    assert value(fams, "ddp_job_queue_seconds_bucket", le="5.0") == 1
    assert value(fams, "ddp_job_queue_seconds_bucket", le="60.0") == 2
    assert value(fams, "ddp_job_duration_seconds_bucket", le="3600.0") == 0
    assert value(fams, "ddp_job_duration_seconds_bucket", le="7200.0") == 1
    assert value(fams, "ddp_job_duration_seconds_bucket", le="+Inf") == 1
    assert value(fams, "ddp_pool_workers") == 3 and value(fams, "ddp_pool_idle_workers") == 1
    # the OpenMetrics parser is strict (each family once, its samples together): it reads it
    req = urllib.request.Request(f"http://127.0.0.1:{service.port}/metrics",
                                 headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert {f.name for f in parse_openmetrics(r.read().decode())} >= {
            "ddp_jobs", "ddp_job_queue_seconds", "ddp_pool_workers"}


def test_finished_jobs_stay_for_the_last_five(service):
    assert MAX_FINISHED == 5
    monitors = {f"j{i}": add(service, f"j{i}") for i in range(7)}
    for job_id, m in monitors.items():
        feed(m, 1, 1.0)
    for i in range(6):    # six finish, j6 runs on
        monitors[f"j{i}"].close(143, None)
        service.job_finished(f"j{i}")
    service.set_jobs([row(f"j{i}", "cancelled" if i < 6 else "running") for i in range(7)])
    fams = scrape(service.port)
    labelled = {s.labels["job"] for s in fams["ddp_train_steps"].samples}
    assert labelled == {f"j{i}" for i in range(1, 7)}
    assert value(fams, "ddp_state", job="j1", state="interrupted") == 1
    # j0's run is no longer kept: /status?job= answers from its row, its history is empty
    code, body, _ = get(service.port, "/status?job=j0")
    status = json.loads(body)
    assert code == 200 and status["state"] == "cancelled" and status["job"]["id"] == "j0"
    assert "worker_list" not in status
    history = json.loads(get(service.port, "/api/history?job=j0")[1])
    assert history == {"seq": 0, "state": "cancelled", "train": [], "val": []}
    assert json.loads(get(service.port, "/status?job=j1")[1])["state"] == "interrupted"


# --- /status, /api/history, /healthz ---------------------------------------------------------


def test_status_lists_the_jobs_and_shows_one_in_full(service):
    a, b = add(service, "a", name="alpha"), add(service, "b")
    feed(a, 5, 0.5, point=True)
    feed(a, 1, 0.25, point=True)
    feed(b, 2, 2.0, point=True)
    rows = [row("a", "running", name="alpha", step=6, loss=0.25, eta_seconds=12.5, workers=1,
                started=1.7e9 + 5),
            row("b", "running", step=2, loss=math.inf), row("q", "queued", priority=3)]
    service.set_jobs(rows)
    rows[0]["name"] = "changed after set_jobs"    # the table was copied
    service.set_pool(2, 0)
    code, body, headers = get(service.port, "/status")
    status = json.loads(body)
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert status["service"] == {
        "version": status["service"]["version"], "pool_workers": 2, "idle_workers": 0,
        "jobs_by_state": {"queued": 1, "running": 2, "done": 0, "failed": 0, "diverged": 0,
                          "cancelled": 0}}
    assert [r["id"] for r in status["jobs"]] == ["a", "b", "q"]
    assert status["jobs"][0]["name"] == "alpha" and status["jobs"][1]["loss"] is None

    one = json.loads(get(service.port, "/status?job=a")[1])
    assert one["state"] == "training" and one["step"] == 6 and one["total_steps"] == 100
    assert one["loss"] == 0.25 and one["layers"] == list(LAYERS)
    assert [w["name"] for w in one["worker_list"]] == ["worker 1"]
    assert one["job"]["id"] == "a" and one["job"]["eta_seconds"] == 12.5
    queued = json.loads(get(service.port, "/status?job=q")[1])
    assert queued["state"] == "queued" and queued["job"]["priority"] == 3

    history = json.loads(get(service.port, "/api/history?job=a")[1])
    assert [p["loss"] for p in history["train"]] == [0.5, 0.5, 0.25]
    assert json.loads(get(service.port, f"/api/history?job=a&after={history['seq']}")[1])["train"] == []
    other = json.loads(get(service.port, "/api/history?job=b")[1])
    assert [p["loss"] for p in other["train"]] == [2.0, 2.0] and other["state"] == "training"


def test_healthz_names_the_job_that_stalled(service):
    a, b = add(service, "a"), add(service, "b")
    feed(a, 1, 1.0)
    feed(b, 1, 1.0)
    service.set_jobs([row("a", "running"), row("b", "running"), row("q", "queued")])
    assert get(service.port, "/healthz")[:2] == (200, "ok: service, 2 running, 1 queued\n")
    a.run.last_progress -= 120       # a's last step was two minutes ago (--stall-timeout 60)
    code, body, _ = get(service.port, "/healthz")
    assert code == 503 and body.startswith("stalled: job a: no step completed for 12") and one_line(body)
    assert "job b" not in body
    a.set_state("waiting-for-workers")    # no workers for it: not a fault of the service
    assert get(service.port, "/healthz")[0] == 200
    a.set_state("training")
    a.run.last_progress -= 120
    a.close(3, None)                      # a run that ended does not stall
    service.job_finished("a")
    assert get(service.port, "/healthz")[0] == 200


@pytest.mark.parametrize("path,code", [
    ("/status?job=nope", 404), ("/status?job=", 400), ("/status?jb=a", 400),
    ("/status?job=a&job=a", 400), ("/status?job", 400), ("/status?job=%0Aevil%0D", 404),
    ("/status?job=" + "x" * 5000, 404), ("/status?" + "&".join(["job=a"] * 20), 400),
    ("/api/history", 400), ("/api/history?after=3", 400), ("/api/history?job=a&after=x", 400),
    ("/api/history?job=a&after=-1", 400), ("/api/history?job=a&after=1e3", 400),
    ("/api/history?job=a&after=99999999999999999999", 400), ("/api/history?job=nope", 404),
    ("/api/history?job=a&after=1&x=2", 400),
])
def test_bad_requests_get_one_line(service, path, code):
    add(service, "a")
    got, body, headers = get(service.port, path)
    assert got == code and one_line(body) and len(body) < 300, body
    assert headers["Content-Type"].startswith("text/plain")
    assert get(service.port, "/status?job=a")[0] == 200     # and the server goes on


def test_a_job_keeps_its_record_and_a_busy_port_is_an_oserror(service, tmp_path):
    m = add(service, "a", jsonl=str(tmp_path / "a.jsonl"))
    m.checkpointed(0, "ckpt-0.npz")
    m.close(143, None)
    service.job_finished("a")
    events = [json.loads(line)["event"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert events == ["worker_joined", "checkpoint", "end"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            ServiceMonitor("127.0.0.1", taken.getsockname()[1])


# --- a real Prometheus ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A ServiceMonitor with three jobs (c finished, a and b running, fed while scraped) and
    a Prometheus scraping it every 250 ms (deploy/prometheus/prometheus.yml at its port)."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("no Prometheus server: /usr/bin/prometheus is absent (apt-get install prometheus)")
    pytest.importorskip("yaml", reason="PyYAML reads the deploy files: pip install pyyaml")
    from test_prometheus import start_prometheus

    tmp = tmp_path_factory.mktemp("service-prometheus")
    service = ServiceMonitor("127.0.0.1", 0)
    started: list[Proc] = []

    def start(cmd):
        started.append(Proc(cmd))
        return started[-1]

    try:
        jobs = {"a": (add(service, "a"), 0.5), "b": (add(service, "b"), 2.0)}
        c = add(service, "c")
        feed(c, 3, 1.0)
        c.close(0, None)
        service.job_finished("c")
        for m, _ in jobs.values():
            m.checkpointed(0, "ckpt-0.npz")
            m.grad_norm = 1.5
        prom = start_prometheus(tmp, service.port, None, start)
        start = time.time() - 1
        deadline = time.monotonic() + 60
        while not enough_scrapes(prom, start):    # steps, evaluations, jobs leaving the queue
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not scrape the service 8 times in 60 s:\n"
                            f"{started[0].stderr[-3000:]}")
            for m, loss in jobs.values():
                feed(m, 10, loss)
                m.evaluated(m.run.step, loss, 0.75)
            service.observe_queue(3.0)
            service.observe_duration(90.0)
            service.set_jobs([row("a", "running", step=jobs["a"][0].run.step),
                              row("b", "running"), row("c", "done"), row("q", "queued")])
            service.set_pool(3, 1)
            time.sleep(0.1)
        yield {"prom": prom, "start": start, "end": time.time() + 1}
    finally:
        service.close()
        for proc in started:
            proc.kill()


def enough_scrapes(prom, start: float) -> bool:
    got = prom.query(f'count_over_time(ddp_pool_workers[{time.time() - start + 1:.0f}s])')
    return bool(got) and float(got[0]["value"][1]) >= 8


def test_prometheus_answers_by_exported_job(scraped):
    prom = scraped["prom"]
    (loss,) = prom.query('ddp_train_loss{exported_job="a"}')
    assert float(loss["value"][1]) == 0.5 and loss["metric"]["job"] == "ddp-train"
    assert float(prom.query('ddp_train_loss{exported_job="b"}')[0]["value"][1]) == 2.0
    jobs = {s["metric"]["state"]: float(s["value"][1]) for s in prom.query("ddp_jobs")}
    assert jobs == {"queued": 1, "running": 2, "done": 1, "failed": 0, "diverged": 0, "cancelled": 0}
    assert {s["metric"]["exported_job"] for s in prom.query("ddp_state == 1")} == {"a", "b", "c"}


def test_every_dashboard_query_has_data_for_the_service(scraped):
    from test_deploy import dashboard_exprs, pushed_only
    from test_prometheus import dashboard_variables, finite_values, substitute

    prom = scraped["prom"]
    variables = dashboard_variables(prom, scraped)
    assert variables["scrape_job"] == "ddp-train" and variables["job"] == "a|b|c"
    exprs = [e for e in dashboard_exprs() if not pushed_only(e)]
    empty = [e for e in exprs
             if not finite_values(prom.query_range(substitute(e, variables), scraped["start"],
                                                   scraped["end"]))]
    assert not empty, "no finite value for:\n" + "\n".join(empty)
    # one job chosen: the per-run panels show that job alone
    series = prom.query_range(substitute('ddp_train_loss{exported_job=~"$job"}', {"job": "b"}),
                              scraped["start"], scraped["end"])
    assert {s["metric"]["exported_job"] for s in series} == {"b"}


# --- a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("no chromium or chromedriver (Debian: apt install chromium chromium-driver)")
    with chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


PAGE = """
const d = window.ddpDashboard, el = id => document.getElementById(id);
return {
  ready: !!d, job: d ? d.job() : null, state: d ? d.state() : null,
  loss: Number(el('chart-loss').dataset.points),
  lossData: d && d.charts.loss ? d.charts.loss.data[1].filter(v => v != null) : [],
  jobsShown: !el('jobs-card').hidden,
  rows: [...document.querySelectorAll('#jobs tbody tr')].map(tr => ({
      job: tr.dataset.job || null, selected: tr.classList.contains('selected'),
      cells: [...tr.cells].map(td => td.textContent)})),
  injected: !!el('injected') || document.querySelectorAll('#jobs img, #jobs b').length,
  meta: el('meta').textContent, notice: el('notice').hidden ? '' : el('notice').textContent,
};
"""


def shown(driver, cond, what: str) -> dict:
    return wait_page(driver, cond, what, timeout=30, script=PAGE)


EVIL = '<img src=x id=injected onerror="window.hacked=1"><b>bold</b>'


def test_the_dashboard_shows_the_jobs_and_the_charts_of_the_one_clicked(browser, service):
    a, b = add(service, "a", name="alpha"), add(service, "b", name=EVIL)
    for _ in range(3):
        feed(a, 5, 0.5, point=True)
        feed(b, 5, 2.0, point=True)
    service.set_jobs([row("q", "queued", name="waiting"),
                      row("a", "running", name="alpha", step=15, loss=0.5, eta_seconds=30, workers=1),
                      row("b", "running", name=EVIL, step=15, loss=2.0, workers=1)])
    service.set_pool(2, 0)
    browser.get(f"http://127.0.0.1:{service.port}/")

    # the first running job is shown by default
    page = shown(browser, lambda p: p["ready"] and len(p["rows"]) == 3 and p["job"] == "a"
                 and p["loss"] >= 3, "the jobs and job a's charts")
    assert page["jobsShown"] and [r["job"] for r in page["rows"]] == ["q", "a", "b"]
    assert [r["selected"] for r in page["rows"]] == [False, True, False]
    assert page["rows"][1]["cells"] == ["a", "alpha", "running", "15 / 100 (15.0%)", "0.5000",
                                        "30 s", "1"]
    assert page["rows"][2]["cells"][1] == EVIL and not page["injected"]   # text, not markup
    assert all(v == 0.5 for v in page["lossData"]) and page["meta"].startswith("job a · alpha")

    browser.click('#jobs tr[data-job="b"]')
    page = shown(browser, lambda p: p["job"] == "b" and p["loss"] >= 3
                 and all(v == 2.0 for v in p["lossData"]), "job b's charts after the click")
    assert [r["selected"] for r in page["rows"]] == [False, False, True]
    assert page["meta"].startswith("job b · " + EVIL) and not page["injected"]

    # a queued job has no run yet: its row's state, no points
    browser.click('#jobs tr[data-job="q"]')
    page = shown(browser, lambda p: p["job"] == "q" and p["loss"] == 0, "the queued job after the click")
    assert page["notice"] == "job q is queued" and page["state"] == "queued"
    assert browser.js("return window.hacked === undefined")
    severe = [e for e in browser.log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
