"""What a run shows while it trains: Prometheus metrics, /healthz, /status, a live
dashboard, a JSON-lines record and, at the end, a push to a Pushgateway.

One `Monitor` lives where a run is decided (MPI rank 0, the ZeroMQ coordinator).
The training loop tells it what happened; an HTTP thread serves what it knows,
read-only. Recording a step is a few additions under a lock: metric families are
built only when /metrics is scraped, so a step costs the same whether anyone
looks or not.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
import platform
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from . import __version__
from .errors import MissingPackageError, UsageError, require

DEFAULT_PORT = 9108
WINDOW_SECONDS = 1.0        # a history point (and the loss gauges) every second of training
MAX_POINTS = 4000           # history kept for the dashboard; older points are thinned
MAX_DEPARTED = 32           # workers that left, still listed by /status
LINGER_SECONDS = 3.0        # at the end, how long a watched run waits for a last poll
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
# why the ZeroMQ coordinator dropped a message (ddp_rejected_messages_total{reason})
REJECT_REASONS = ("malformed", "other job", "unknown worker", "unexpected", "stale", "duplicate",
                  "invalid result", "non-finite gradients", "ignored peer")
STATES = ("starting", "waiting-for-workers", "training", "evaluating", "checkpointing", "done",
          "interrupted", "failed")
RUNNING = ("training", "evaluating", "checkpointing")
DASHBOARD = Path(__file__).with_name("dashboard")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                 ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8",
                 ".md": "text/plain; charset=utf-8", ".json": "application/json"}


def _finite(x) -> float | None:
    """A float for JSON: None for missing or non-finite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _thin(points: list) -> None:
    """Past MAX_POINTS, halve the older half: the whole run stays, at a coarser grain."""
    if len(points) > MAX_POINTS:
        half = MAX_POINTS // 2
        points[:half] = points[:half:2]


class Histogram:
    """Bucket counts of observed durations (cumulated only when scraped)."""

    __slots__ = ("counts", "total")

    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, v)] += 1
        self.total += v


@dataclass
class WorkerInfo:
    name: str
    last_step: int = 0
    compute_seconds: float | None = None
    reported: float = 0.0          # monotonic time of the last report
    state: str = "active"          # active, left, lost


class Window:
    """Sums over the steps of the current second (a history point when it closes)."""

    def __init__(self, now: float):
        self.start = now
        self.loss = self.correct = 0.0
        self.n = self.steps = 0
        self.t_step = self.t_compute = self.t_comm = 0.0


class Monitor:
    """The run's observable state; fed by the training loop, read by the HTTP thread."""

    def __init__(self, *, backend: str, total_steps: int, layers, parameters: int, lr: float,
                 classify: bool, stall_timeout: float = 60.0, jsonl: str | None = None,
                 pushgateway: str | None = None, warn=print):
        self.lock = threading.Lock()
        self.backend, self.total_steps, self.layers = backend, total_steps, list(layers)
        self.parameters, self.lr, self.classify = parameters, lr, classify
        self.stall_timeout, self.pushgateway, self.warn = stall_timeout, pushgateway, warn
        self.started = time.time()
        self.state = "starting"
        self.last_progress = time.monotonic()
        self.step = self.start_step = 0
        self.epoch = 0.0
        self.steps_per_epoch = 1
        self.steps_total = self.samples_total = 0
        self.hist = {"step": Histogram(), "compute": Histogram(), "comm": Histogram()}
        self.window = Window(time.monotonic())
        self.loss = self.accuracy = self.samples_per_second = None
        self.val_loss = self.val_accuracy = None
        self.grad_norm = None
        self.n_workers = 0
        self.workers: dict[str, WorkerInfo] = {}
        self.departed: deque[WorkerInfo] = deque(maxlen=MAX_DEPARTED)
        self.rejected: Counter = Counter({r: 0 for r in REJECT_REASONS})
        self.failures = self.joins = self.shard_timeouts = 0
        self.checkpoint_step = self.checkpoint_time = None
        self.seq = itertools.count(1)
        self.last_seq = 0
        self.train_points: list[dict] = []
        self.val_points: list[dict] = []
        self.server: ThreadingHTTPServer | None = None
        self.last_request = -math.inf     # monotonic time of the last request served
        self.final_seen = threading.Event()  # a poll after the end saw the final state
        self.closed = False
        self.jsonl = None
        if jsonl:
            try:
                self.jsonl = open(jsonl, "a", buffering=1)
            except OSError as e:
                raise UsageError(f"--log-jsonl {jsonl}: cannot write there ({e.strerror or e})")
            self.jsonl_path = jsonl

    # --- fed by the training loop -------------------------------------------------

    def set_state(self, state: str) -> None:
        with self.lock:
            if state != self.state:
                self.state = state
                self.last_progress = time.monotonic()

    def start(self, step: int, steps_per_epoch: int, n_workers: int) -> None:
        with self.lock:
            self.step = self.start_step = step
            self.steps_per_epoch = max(steps_per_epoch, 1)
            self.epoch = step / self.steps_per_epoch
            self.n_workers = n_workers
            self.window = Window(time.monotonic())
        self.set_state("training")

    def window_due(self) -> bool:
        """Whether the step being applied closes the current window (the caller then
        measures what is too dear to measure every step, such as the gradient norm)."""
        return self.grad_norm is None or time.monotonic() - self.window.start >= WINDOW_SECONDS

    def step_done(self, step: int, n: int, loss_sum: float, correct: float,
                  t_step: float, t_compute: float, t_comm: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.step, self.epoch = step, step / self.steps_per_epoch
            self.steps_total += 1
            self.samples_total += n
            self.last_progress = now
            self.hist["step"].observe(t_step)
            self.hist["compute"].observe(t_compute)
            self.hist["comm"].observe(t_comm)
            w = self.window
            w.loss += loss_sum
            w.correct += correct
            w.n += n
            w.steps += 1
            w.t_step += t_step
            w.t_compute += t_compute
            w.t_comm += t_comm
            if now - w.start >= WINDOW_SECONDS or step >= self.total_steps or self.loss is None:
                self._close_window(w, now)

    def _close_window(self, w: Window, now: float) -> None:
        self.loss = w.loss / w.n if w.n else None
        self.accuracy = w.correct / w.n if (w.n and self.classify) else None
        self.samples_per_second = w.n / max(now - w.start, 1e-9)
        self.last_seq = next(self.seq)
        self.train_points.append({
            "seq": self.last_seq, "t": time.time(), "step": self.step, "epoch": self.epoch,
            "loss": _finite(self.loss), "accuracy": _finite(self.accuracy),
            "samples_per_second": self.samples_per_second, "step_seconds": w.t_step / w.steps,
            "compute_seconds": w.t_compute / w.steps, "comm_seconds": w.t_comm / w.steps})
        _thin(self.train_points)
        self.window = Window(now)

    def evaluated(self, step: int, val_loss: float, val_accuracy: float | None) -> None:
        with self.lock:
            self.val_loss, self.val_accuracy = val_loss, val_accuracy
            self.last_progress = time.monotonic()
            self.last_seq = next(self.seq)
            self.val_points.append({"seq": self.last_seq, "t": time.time(), "step": step,
                                    "val_loss": _finite(val_loss), "val_accuracy": _finite(val_accuracy)})
            _thin(self.val_points)

    def checkpointed(self, step: int, path: str) -> None:
        with self.lock:
            self.checkpoint_step, self.checkpoint_time = step, time.time()
        self.event("checkpoint", step=step, path=path)

    def set_workers(self, n: int) -> None:
        self.n_workers = n

    def worker_report(self, name: str, step: int, compute_seconds: float | None) -> None:
        with self.lock:
            info = self.workers.get(name)
            if info is None:
                info = self.workers[name] = WorkerInfo(name)
            info.last_step, info.reported = step, time.monotonic()
            if compute_seconds is not None:
                info.compute_seconds = compute_seconds

    def worker_joined(self, name: str, step: int) -> None:
        with self.lock:
            self.joins += 1
            self.workers[name] = WorkerInfo(name, last_step=step, reported=time.monotonic())
        self.event("worker_joined", worker=name, step=step)

    def worker_left(self, name: str, why: str, lost: bool) -> None:
        with self.lock:
            info = self.workers.pop(name, None)
            if lost:
                self.failures += 1
            if info is not None:
                info.state = "lost" if lost else "left"
                self.departed.append(info)
        self.event("worker_failed" if lost else "worker_left", worker=name, reason=why)

    def shard_timeout(self) -> None:
        self.shard_timeouts += 1  # one thread writes; a scrape reads one int

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1  # one thread writes; a scrape copies under the GIL

    # --- the JSON-lines record ------------------------------------------------------

    def event(self, kind: str, **fields) -> None:
        if self.jsonl is None:
            return
        record = {"time": round(time.time(), 6), "event": kind}
        record.update({k: _finite(v) if isinstance(v, (float, np.floating)) else v
                       for k, v in fields.items()})
        try:
            self.jsonl.write(json.dumps(record, default=str) + "\n")
        except (OSError, ValueError) as e:
            self.warn(f"--log-jsonl {self.jsonl_path}: cannot write ({getattr(e, 'strerror', None) or e}); "
                      f"no more records")
            self._close_jsonl()

    def _close_jsonl(self) -> None:
        if self.jsonl is not None:
            try:
                self.jsonl.close()
            except OSError:
                pass
            self.jsonl = None

    # --- read by the HTTP thread ------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        with self.lock:
            state, idle = self.state, time.monotonic() - self.last_progress
        if state in RUNNING and idle > self.stall_timeout:
            return False, (f"stalled: no step completed for {idle:.0f} s (bound {self.stall_timeout:g} s, "
                           f"--stall-timeout) at step {self.step}")
        return True, f"ok: {state} at step {self.step}/{self.total_steps}"

    def _worker_list(self, now: float) -> list[dict]:
        out = []
        for info in itertools.chain(self.workers.values(), reversed(self.departed)):
            out.append({"name": info.name, "last_step": info.last_step, "state": info.state,
                        "seconds_since_report": round(now - info.reported, 3),
                        "compute_seconds": _finite(info.compute_seconds)})
        return out

    def status(self) -> dict:
        now = time.monotonic()
        with self.lock:
            return {
                "state": self.state, "backend": self.backend, "version": __version__,
                "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
                "loss": _finite(self.loss), "accuracy": _finite(self.accuracy),
                "val_loss": _finite(self.val_loss), "val_accuracy": _finite(self.val_accuracy),
                "samples_per_second": _finite(self.samples_per_second), "workers": self.n_workers,
                "worker_list": self._worker_list(now),
                "last_checkpoint_step": self.checkpoint_step, "last_checkpoint_time": self.checkpoint_time,
                "seconds_since_step": round(now - self.last_progress, 3) if self.steps_total else None,
                "started": self.started, "layers": self.layers, "parameters": self.parameters,
            }

    def history(self, after: int) -> dict:
        with self.lock:
            return {"seq": self.last_seq, "state": self.state,
                    "train": [p for p in self.train_points if p["seq"] > after],
                    "val": [p for p in self.val_points if p["seq"] > after]}

    def collect(self):
        """Metric families for prometheus_client (a custom collector: built per scrape)."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily)

        def gauge(name, doc, value, labels=None):
            g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
            if labels:
                for key, v in value:
                    g.add_metric(list(key), v)
            elif value is not None:
                g.add_metric([], value)
            return g

        with self.lock:
            hists = {k: (list(itertools.accumulate(h.counts)), h.total) for k, h in self.hist.items()}
            age = time.time() - time.monotonic()  # monotonic → unix time
            workers = [(w.name, w.last_step, w.compute_seconds, w.reported + age)
                       for w in self.workers.values()]
            rejected = dict(self.rejected)
            values = dict(loss=self.loss, acc=self.accuracy, val_loss=self.val_loss,
                          val_acc=self.val_accuracy, grad_norm=self.grad_norm, state=self.state,
                          steps=self.steps_total, samples=self.samples_total, epoch=self.epoch,
                          checkpoint=self.checkpoint_time)
        yield InfoMetricFamily("ddp_build", "ddp-train version and runtime", value={
            "version": __version__, "backend": self.backend, "python": platform.python_version(),
            "numpy": np.__version__})
        yield gauge("ddp_start_time_seconds", "Unix time the run started", self.started)
        yield gauge("ddp_state", "1 for the run's current state",
                    [((s,), float(s == values["state"])) for s in STATES], labels=("state",))
        yield gauge("ddp_total_steps", "Steps the run will take in all", self.total_steps)
        yield gauge("ddp_epoch", "Epochs completed (fractional)", values["epoch"])
        yield CounterMetricFamily("ddp_train_steps_total", "SGD steps applied by this process",
                                  value=values["steps"])
        yield CounterMetricFamily("ddp_train_samples_total", "Training samples consumed by this process",
                                  value=values["samples"])
        yield gauge("ddp_train_loss", "Mean training loss over the last second of steps (data term)",
                    values["loss"])
        if self.classify:
            yield gauge("ddp_train_accuracy", "Training accuracy over the last second of steps",
                        values["acc"])
        yield gauge("ddp_val_loss", "Validation loss at the last evaluation", values["val_loss"])
        if self.classify:
            yield gauge("ddp_val_accuracy", "Validation accuracy at the last evaluation", values["val_acc"])
        yield gauge("ddp_learning_rate", "SGD learning rate", self.lr)
        yield gauge("ddp_grad_norm", "L2 norm of the averaged gradient (sampled once a second)",
                    values["grad_norm"])
        yield gauge("ddp_workers", "Ranks (MPI) or connected workers (ZeroMQ) computing shards",
                    self.n_workers)
        yield gauge("ddp_worker_last_step", "Last step each rank or worker reported",
                    [((w[0],), w[1]) for w in workers], labels=("worker",))
        yield gauge("ddp_worker_compute_duration_seconds", "Mean compute time per step of each rank or worker",
                    [((w[0],), w[2]) for w in workers if w[2] is not None], labels=("worker",))
        yield gauge("ddp_worker_last_report_timestamp_seconds", "Unix time each rank or worker last "
                    "reported (a hung one stops)", [((w[0],), w[3]) for w in workers], labels=("worker",))
        for key, name, doc in (("step", "ddp_step_duration_seconds", "Wall time of one training step"),
                               ("compute", "ddp_compute_duration_seconds",
                                "Forward and backward pass of a step (ZeroMQ: the slowest shard)"),
                               ("comm", "ddp_allreduce_duration_seconds",
                                "Gradient exchange of a step: the Allreduce (ZeroMQ: sends, waits "
                                "and the sum)")):
            cum, total = hists[key]
            yield HistogramMetricFamily(name, doc, sum_value=total, buckets=[
                ("+Inf" if math.isinf(b) else repr(b), c) for b, c in zip(BUCKETS, cum)])
        c = CounterMetricFamily("ddp_rejected_messages_total", "Messages the coordinator dropped, by reason",
                                labels=["reason"])
        for reason, n in rejected.items():
            c.add_metric([reason.replace(" ", "_").replace("-", "_")], n)
        yield c
        yield CounterMetricFamily("ddp_worker_failures_total", "Workers lost (died, hung or unreachable)",
                                  value=self.failures)
        yield CounterMetricFamily("ddp_worker_joins_total", "Workers admitted", value=self.joins)
        yield CounterMetricFamily("ddp_shard_timeouts_total", "Shards not back by their deadline "
                                  "(recomputed by another worker)", value=self.shard_timeouts)
        if values["checkpoint"] is not None:
            yield gauge("ddp_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint",
                        values["checkpoint"])

    # --- serving --------------------------------------------------------------------

    def serve(self, addr: str, port: int) -> int:
        """Start the HTTP thread on addr:port; the port it got (port 0: any free one)."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        handler = type("Handler", (_Handler,), {"monitor": self, "registry": registry,
                                                "static": _static_files()})
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family,
                                                               "daemon_threads": True})
        self.server = server_class((addr, port), handler)
        threading.Thread(target=self.server.serve_forever, name="ddp-metrics", daemon=True).start()
        return self.server.server_address[1]

    def close(self, exit_code: int, summary: dict | None) -> None:
        """The run is over: final state, the record's last line, the push; stop serving.
        Only the first call counts."""
        if self.closed:
            return
        self.closed = True
        if summary is not None and not summary["interrupted"]:
            state = "done"
            with self.lock:
                self.val_loss, self.val_accuracy = summary["val_loss"], summary["val_accuracy"]
        else:
            state = "interrupted" if exit_code >= 128 else "failed"
        self.set_state(state)
        fields = {"exit_code": exit_code, "state": state, "step": self.step}
        if summary is not None:
            fields["summary"] = {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()}
        self.event("end", **fields)
        self._close_jsonl()
        if self.pushgateway:
            self.push(exit_code, summary)
        if self.server is not None:
            if time.monotonic() - self.last_request < 10:  # someone is watching: let them see the end
                self.final_seen.wait(LINGER_SECONDS)
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def push(self, exit_code: int, summary: dict | None) -> None:
        """The outcome of a batch job, as the Prometheus docs recommend: pushadd, so a
        failure keeps the last success's timestamp."""
        from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

        registry = CollectorRegistry()

        def put(name, doc, value):
            if value is not None:
                Gauge(name, doc, registry=registry).set(value)

        now = time.time()
        put("ddp_run_duration_seconds", "Wall time of the last run", now - self.started)
        put("ddp_run_end_timestamp_seconds", "Unix time the last run ended", now)
        put("ddp_run_exit_code", "Exit code of the last run", exit_code)
        put("ddp_run_steps", "Steps taken by the last run", self.step)
        if exit_code == 0 and summary is not None:
            put("ddp_last_success_timestamp_seconds", "Unix time of the last successful run", now)
            put("ddp_final_loss", "Final training loss of the last successful run",
                _finite(summary.get("final_loss")))
            put("ddp_final_accuracy", "Final training accuracy of the last successful run",
                _finite(summary.get("train_accuracy")))
        try:
            pushadd_to_gateway(self.pushgateway, job="ddp_train", registry=registry, timeout=10,
                               grouping_key={"instance": socket.gethostname()})
        except Exception as e:  # noqa: BLE001 — a failed push must not change the run's outcome
            self.warn(f"--pushgateway {self.pushgateway}: push failed ({e})")


def _static_files() -> dict[str, Path]:
    """/static/<relative path> → file, for exactly the files the dashboard ships."""
    if not DASHBOARD.is_dir():
        return {}
    return {p.relative_to(DASHBOARD).as_posix(): p for p in DASHBOARD.rglob("*") if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD only: nothing on this port changes training."""

    monitor: Monitor
    registry = None
    static: dict = {}
    timeout = 10               # an idle connection is closed after this many seconds
    server_version = f"ddp-train/{__version__}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 — quiet: the trainer's log is for training
        pass

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, code: int, text: str) -> None:
        self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        path, m = url.path, self.monitor
        try:
            self._route(url, path, m)
        except (BrokenPipeError, ConnectionResetError):
            return
        m.last_request = time.monotonic()
        if m.closed and path in ("/api/history", "/metrics"):  # the dashboard's last poll, a scrape
            m.final_seen.set()

    def _route(self, url, path: str, m: Monitor) -> None:
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encode, ctype = choose_encoder(self.headers.get("Accept"))
            return self._send(200, encode(self.registry), ctype)
        if path == "/healthz":
            ok, text = m.health()
            return self._text(200 if ok else 503, text)
        if path == "/status":
            return self._json(m.status())
        if path == "/api/history":
            query = parse_qs(url.query)
            try:
                after = int(query.get("after", ["0"])[0])
            except ValueError:
                return self._text(400, "after must be an integer")
            return self._json(m.history(after))
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        if path.startswith("/static/") and path[len("/static/"):] in self.static:
            file = self.static[path[len("/static/"):]]
            return self._send(200, file.read_bytes(),
                              CONTENT_TYPES.get(file.suffix, "application/octet-stream"),
                              {"Content-Security-Policy": "default-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data:"})
        return self._text(404, f"not found: {path} (try /, /metrics, /healthz, /status)")

    do_HEAD = do_GET

    def _read_only(self):
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only


def open_monitor(cfg, setup, backend: str, log, serving: bool = False) -> Monitor | None:
    """The run's Monitor (and its HTTP thread) as the config asks, or None. A port that
    is busy is an error when given, a warning when it is ddp-coordinator's default."""
    port = cfg.metrics_port
    implicit = port is None and serving
    if implicit:
        port = DEFAULT_PORT
    if not (port or cfg.log_jsonl or cfg.pushgateway):
        return None
    try:
        if port or cfg.pushgateway:
            require("prometheus_client", "--pushgateway" if cfg.pushgateway and not port
                    else "--metrics-port")
    except MissingPackageError as e:
        if not implicit or cfg.pushgateway:
            raise
        log.warn(f"{e}; serving no metrics")
        port = None
    monitor = Monitor(backend=backend, total_steps=setup.total_steps, layers=setup.layout.layers,
                      parameters=setup.layout.size, lr=cfg.lr, classify=cfg.loss == "cross-entropy",
                      stall_timeout=cfg.stall_timeout, jsonl=cfg.log_jsonl,
                      pushgateway=cfg.pushgateway, warn=log.warn)
    if port:
        try:
            bound = monitor.serve(cfg.metrics_addr, port)
        except OSError as e:
            if not implicit:
                monitor._close_jsonl()
                raise UsageError(f"--metrics-port {port} on {cfg.metrics_addr}: cannot serve there "
                                 f"({e.strerror or e}); pick another port or --metrics-port 0 for none")
            log.warn(f"metrics port {port} is busy ({e.strerror or e}); serving no metrics "
                     f"(give --metrics-port)")
        else:
            host = f"[{cfg.metrics_addr}]" if ":" in cfg.metrics_addr else cfg.metrics_addr
            log.info(f"dashboard and metrics on http://{host}:{bound}/ (/metrics, /healthz, /status)")
    monitor.event("start", backend=backend, total_steps=setup.total_steps,
                  parameters=setup.layout.size, config=cfg.to_dict())
    return monitor
