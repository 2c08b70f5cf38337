"""The Monitor: the one object a run's loop talks to. It records into a RunState and
hands the state to the views that were asked for: the HTTP server (metrics, /healthz,
/status, the dashboard), the JSON-lines record and, at the end, the Pushgateway."""
from __future__ import annotations

from ..errors import MissingPackageError, UsageError, require
from . import prometheus
from .jsonl import JsonlRecord
from .server import LINGER_SECONDS, MonitorServer
from .state import RunState, finite
from .views import RunViews

DEFAULT_PORT = 9108


class Monitor:
    """The run's observable state and its outlets; fed by the training loop (MPI rank 0
    or the ZeroMQ coordinator), read by the HTTP thread.

    Parameters
    ----------
    backend : str
        "mpi" or "zmq", for ddp_build_info and /status.
    total_steps, layers, parameters, lr, classify
        What the run is: its length, layer sizes, parameter count, learning rate and
        whether it classifies (accuracy is shown only then).
    stall_timeout : float
        Seconds without a step before /healthz answers 503.
    jsonl : str or None
        --log-jsonl: the file the record is appended to.
    pushgateway : str or None
        --pushgateway: where the outcome is pushed at the end.
    warn : callable
        Takes one-line warnings (a failed push, a record that cannot be written).
    """

    def __init__(self, *, backend: str, total_steps: int, layers, parameters: int, lr: float,
                 classify: bool, stall_timeout: float = 60.0, jsonl: str | None = None,
                 pushgateway: str | None = None, warn=print):
        self.run = RunState(backend=backend, total_steps=total_steps, layers=layers,
                              parameters=parameters, lr=lr, classify=classify)
        self.stall_timeout, self.pushgateway, self.warn = stall_timeout, pushgateway, warn
        self.record = JsonlRecord(jsonl, warn) if jsonl else None
        self.server: MonitorServer | None = None
        self.closed = False

    # --- fed by the training loop -------------------------------------------------

    def set_state(self, state: str) -> None:
        self.run.set_state(state)

    def start(self, step: int, steps_per_epoch: int, n_workers: int) -> None:
        self.run.start(step, steps_per_epoch, n_workers)

    def window_due(self) -> bool:
        """Whether the step being applied closes the current second (the caller then
        measures what is too dear to measure every step, such as the gradient norm)."""
        return self.run.window_due()

    @property
    def grad_norm(self) -> float | None:
        """The last measured norm of the averaged gradient (set by the loop)."""
        return self.run.grad_norm

    @grad_norm.setter
    def grad_norm(self, value: float) -> None:
        self.run.grad_norm = value

    @property
    def lr(self) -> float:
        """The learning rate in use (set by the loop before each update)."""
        return self.run.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.run.lr = value

    def step_done(self, step: int, n: int, loss_sum: float, correct: float,
                  t_step: float, t_compute: float, t_exchange: float) -> None:
        self.run.step_done(step, n, loss_sum, correct, t_step, t_compute, t_exchange)

    def evaluated(self, step: int, val_loss: float, val_accuracy: float | None) -> None:
        self.run.evaluated(step, val_loss, val_accuracy)

    def checkpointed(self, step: int, path: str) -> None:
        self.run.checkpointed(step)
        self.event("checkpoint", step=step, path=path)

    def set_workers(self, n: int) -> None:
        self.run.workers.count = n

    def worker_report(self, name: str, step: int, compute_seconds: float | None) -> None:
        self.run.workers.report(name, step, compute_seconds)

    def worker_joined(self, name: str, step: int) -> None:
        self.run.workers.joined(name, step)
        self.event("worker_joined", worker=name, step=step)

    def worker_left(self, name: str, why: str, lost: bool) -> None:
        self.run.workers.left(name, lost)
        self.event("worker_failed" if lost else "worker_left", worker=name, reason=why)

    def shard_timeout(self) -> None:
        self.run.workers.shard_timeouts += 1  # one thread writes; a scrape reads one int

    def reject(self, reason: str) -> None:
        self.run.workers.rejected[reason] += 1  # one thread writes; a scrape copies it

    def event(self, kind: str, **fields) -> None:
        """A line of the --log-jsonl record (nothing without one)."""
        if self.record is not None:
            self.record.write(kind, **fields)

    # --- the outlets ------------------------------------------------------------------

    def serve(self, addr: str, port: int, linger: float = LINGER_SECONDS) -> int:
        """Start the HTTP thread on addr:port; the port it got (port 0: any free one).
        At the end it waits up to `linger` seconds for someone watching to see it."""
        views = RunViews(self.run, prometheus.registry(self.run), self.stall_timeout)
        self.server = MonitorServer(views, addr, port, linger)
        return self.server.port

    def close_record(self) -> None:
        if self.record is not None:
            self.record.close()

    def close(self, exit_code: int, summary: dict | None) -> None:
        """The run is over: final state, the record's last line, the push; stop serving.
        Only the first call counts."""
        if self.closed:
            return
        self.closed = True
        state = self.run.ended(exit_code, summary)
        if self.server is not None:
            self.server.run_ended()
        fields = {"exit_code": exit_code, "state": state, "step": self.run.step}
        if summary is not None:
            fields["summary"] = {k: finite(v) if isinstance(v, float) else v for k, v in summary.items()}
        self.event("end", **fields)
        self.close_record()
        if self.pushgateway:
            prometheus.push(self.run, self.pushgateway, exit_code, summary, self.warn)
        if self.server is not None:
            self.server.close()
            self.server = None


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
                monitor.close_record()
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
