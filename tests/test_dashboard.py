"""The dashboard in a real headless browser during a real training run.

`mpirun -n 2 ddp-train --metrics-port P` serves the page; Debian's chromium, driven through
chromedriver's W3C WebDriver HTTP interface (a few urllib calls, no client library), loads it
while the run goes on and we check: the charts fill with points, the workers table lists both
ranks, no request left 127.0.0.1:P, no script error; a screenshot is a real PNG; after the run
is stopped the page keeps its data and shows the final state (or that the server is gone).
Skipped where chromium or chromedriver is not installed (apt install chromium chromium-driver).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
from helpers import free_port, kill_tree, train_cmd
from zmq_helpers import procs  # noqa: F401 (a fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason="no chromium browser (Debian: apt install chromium chromium-driver)"),
    pytest.mark.skipif(not os.access(CHROMEDRIVER, os.X_OK),
                       reason="no chromedriver (Debian: apt install chromium-driver)"),
]

# as root, in a container, on a network that refuses what it does not know
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1280,900"]

# a long run on the spiral (several minutes): the test stops it with SIGTERM once it has seen
# what it wants, so its length does not depend on the speed of the machine
RUN = ["--data", "spiral", "--steps", "2000000", "--val-fraction", "0.2", "--eval-every", "5000",
       "--progress", "never"]

# no proxy for anything here: every request goes to 127.0.0.1
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class WebDriver:
    """The few W3C WebDriver commands the test needs, spoken to chromedriver over HTTP."""

    def __init__(self, base: str):
        self.base = base
        self.sid: str | None = None

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with _opener.open(req, timeout=timeout) as r:
                payload = json.load(r)
        except urllib.error.HTTPError as e:
            value = json.load(e).get("value", {})
            raise RuntimeError(f"webdriver {method} {path}: {value.get('error')}: "
                               f"{value.get('message')}") from None
        return payload.get("value")

    def new_session(self, capabilities: dict) -> None:
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.sid = value["sessionId"]

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.sid}/url", {"url": url})

    def js(self, script: str, *args):
        return self._call("POST", f"/session/{self.sid}/execute/sync",
                          {"script": script, "args": list(args)})

    def click(self, css: str) -> None:
        """A real click (the browser's own pointer events) on the element `css` selects."""
        found = self._call("POST", f"/session/{self.sid}/element",
                           {"using": "css selector", "value": css})
        self._call("POST", f"/session/{self.sid}/element/{next(iter(found.values()))}/click", {})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", f"/session/{self.sid}/screenshot"))

    def log(self, kind: str) -> list[dict]:
        """chromedriver's log extension: 'browser' (console) or 'performance' (DevTools events)."""
        return self._call("POST", f"/session/{self.sid}/se/log", {"type": kind})

    def quit(self) -> None:
        if self.sid:
            try:
                self._call("DELETE", f"/session/{self.sid}", timeout=15)
            except (OSError, RuntimeError):
                pass
            self.sid = None


@contextlib.contextmanager
def chromium(tmp_path):
    """A WebDriver session of a headless chromium behind chromedriver, with its files in
    tmp_path; both are killed at the end, whatever happens."""
    port = free_port()
    log = open(tmp_path / "chromedriver.log", "w")
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    driver = WebDriver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if json.loads(http_get(driver.base + "/status", 2)[1])["value"]["ready"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, f"chromedriver exited ({proc.returncode}): " \
                                        f"{(tmp_path / 'chromedriver.log').read_text()}"
            if time.monotonic() > deadline:
                pytest.fail("chromedriver not ready within 30 s")
            time.sleep(0.1)
        driver.new_session({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"],
            },
            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
            "timeouts": {"pageLoad": 30000, "script": 10000},
        })
        yield driver
    finally:
        driver.quit()
        kill_tree(proc)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        log.close()


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path) as driver:
        yield driver


# what the page shows, read in one go
PAGE = """
const d = window.ddpDashboard;
const pts = id => Number(document.getElementById(id).dataset.points);
const notice = document.getElementById('notice');
return {
  ready: !!d,
  loss: pts('chart-loss'), accuracy: pts('chart-accuracy'),
  throughput: pts('chart-throughput'), steptime: pts('chart-steptime'),
  lossData: d && d.charts.loss ? d.charts.loss.data[1].filter(v => v != null) : [],
  exchangeData: d && d.charts.steptime ? d.charts.steptime.raw.exchange.filter(v => v != null) : [],
  hasAccuracyChart: !!(d && d.charts.accuracy) && !document.getElementById('card-accuracy').hidden,
  state: d ? d.state() : null,
  polling: d ? d.polling() : null,
  badge: document.getElementById('state').textContent,
  progress: document.getElementById('progress-text').textContent,
  workers: [...document.querySelectorAll('#workers tbody tr')].map(
      tr => [...tr.cells].map(td => td.textContent)),
  notice: notice.hidden ? '' : notice.textContent,
  jobsShown: !document.getElementById('jobs-card').hidden,
};
"""

# the page's lag rule on made-up workers, at 2,000 steps/s with the newest at step 10,000
LAG_CASES = """
const lag = (last_step, since) => window.ddpDashboard.lagOf(
    {last_step: last_step, seconds_since_report: since}, 10000, 2000);
return {cadence: lag(8500, 0.4),   // 1,500 behind: within two report intervals
        behind: lag(5000, 0.4),    // reporting, but far behind
        overdue: lag(9997, 5),     // reports stopped: every step of the lag counts
        unknown: lag(null, 0.4), ahead: lag(10001, 0.1)};
"""

REQUESTS = """
return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)];
"""


def wait_page(driver: WebDriver, cond, what: str, run=None, timeout: float = 60,
              script: str = PAGE) -> dict:
    """What `script` reads of the page, as soon as `cond` holds for it (else fail, with the
    run's stderr when there is a run)."""
    deadline = time.monotonic() + timeout
    page = None
    while time.monotonic() < deadline:
        page = driver.js(script)
        if cond(page):
            return page
        time.sleep(0.25)
    stderr = f"\nrun stderr:\n{run.stderr[-3000:]}" if run is not None else ""
    pytest.fail(f"the page did not get {what} within {timeout}s; it shows:\n"
                f"{json.dumps(page, indent=1)}{stderr}")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_dashboard_during_a_run(tmp_path, procs, browser):  # noqa: F811 (procs is a fixture)
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    run = procs.start(train_cmd([*RUN, "--metrics-port", str(port)], n=2))

    # the server answers once the run is set up
    deadline = time.monotonic() + 60
    while True:
        try:
            if http_get(origin + "/status")[0] == 200:
                break
        except OSError:
            pass
        assert run.p.poll() is None, f"the run exited ({run.p.returncode}):\n{run.stderr}"
        if time.monotonic() > deadline:
            pytest.fail(f"no /status within 60 s:\n{run.stderr}")
        time.sleep(0.2)

    browser.get(origin + "/")
    page = wait_page(browser, lambda p: p["ready"] and p["loss"] >= 2 and p["throughput"] >= 1
                     and p["steptime"] >= 1 and len(p["workers"]) >= 2
                     and all(len(row) == 6 for row in p["workers"]),
                     "loss, throughput and step-time points and both ranks", run)
    assert run.p.poll() is None, "the run ended before the page saw it going on"
    assert page["state"] in ("training", "evaluating", "checkpointing"), page
    assert page["badge"] == page["state"], page
    assert not page["jobsShown"], page       # a one-job run's page has no jobs table
    assert page["progress"].startswith("step ") and "/ 2,000,000" in page["progress"], page
    assert len(page["lossData"]) >= 1 and all(0 < v < 10 for v in page["lossData"]), page
    # the step-time chart's exchange part: /api/history's exchange_seconds, in ms
    assert len(page["exchangeData"]) >= 1 and all(v >= 0 for v in page["exchangeData"]), page
    # cross-entropy on the spiral: accuracy exists, so its chart is shown
    assert page["hasAccuracyChart"] and page["accuracy"] >= 1, page
    names = sorted(row[0] for row in page["workers"])
    assert names == ["rank-0", "rank-1"], page["workers"]
    assert all(row[1] == "active" for row in page["workers"]), page["workers"]
    # healthy ranks trail each other only by their reports' cadence: no lag is shown
    assert [row[3] for row in page["workers"]] == ["0", "0"], page["workers"]
    lag = browser.js(LAG_CASES)
    assert lag == {"cadence": 0, "behind": 5000, "overdue": 3, "unknown": None, "ahead": 0}, lag

    # every request the page made went to the run's server: the resource timing entries
    # (page, assets, polls) and chromium's own network log
    urls = browser.js(REQUESTS)
    for path in ("/static/dashboard.js", "/static/dashboard.css", "/static/vendor/uPlot.iife.min.js",
                 "/static/vendor/uPlot.min.css", "/status", "/api/history"):
        assert any(urlsplit(u).path == path for u in urls), (path, urls)
    sent = [json.loads(e["message"])["message"] for e in browser.log("performance")]
    sent = [m["params"]["request"]["url"] for m in sent if m["method"] == "Network.requestWillBeSent"]
    assert any(urlsplit(u).path == "/api/history" for u in sent), sent
    for u in urls + sent:   # (chromium's log also has its own chrome:// pages: no network)
        parts = urlsplit(u)
        assert parts.scheme in ("data", "chrome") or (parts.hostname, parts.port) == ("127.0.0.1", port), u

    # no script error or failed load so far
    severe = [e for e in browser.log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe

    shot = browser.screenshot()
    (tmp_path / "dashboard.png").write_bytes(shot)
    width, height = png_size(shot)
    assert width >= 800 and height >= 600 and len(shot) > 10_000, (width, height, len(shot))

    # stop the run: every rank finishes its step and exits with 128 + SIGTERM
    points_before = page["loss"]
    os.kill(run.pid, signal.SIGTERM)
    code = run.wait(timeout=60)
    assert code == 128 + signal.SIGTERM, f"exit {code}:\n{run.stderr}"

    # the page saw the end (interrupted) or found the server gone; either way it keeps its data
    page = wait_page(browser, lambda p: "showing the final state" in p["notice"],
                     "the final state or the disconnected notice", run, timeout=45)
    if page["notice"].startswith("disconnected"):
        assert page["badge"] == "disconnected", page
    else:
        assert page["state"] == "interrupted" and page["notice"].startswith("run interrupted"), page
        assert page["polling"] is False, page
    assert page["loss"] >= points_before and page["throughput"] >= 1 and page["steptime"] >= 1, page
    assert sorted(row[0] for row in page["workers"]) == ["rank-0", "rank-1"], page["workers"]
