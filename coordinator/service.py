"""The training service: `ddp-coordinator --bind ENDPOINT --state-dir DIR`.

One ROUTER socket serves the pool of workers and the clients (ddp-job). Jobs wait in
the queue (their records under DIR, see `jobstore`), run by priority then submission
order, up to --max-running at once, and share the pool: each running job gets its
--min-workers, then the workers are dealt out evenly (`pool.targets`); a worker moves
between jobs only between two steps (it holds no task then). Everything a job does is
the one-job coordinator's (`jobrun.JobRun`: Shards, Run), so its result is the one of
a single-process ddp-train whatever else ran beside it.

With CURVE, a worker's key (--authorized-keys) can only join as a worker and a client's
key (--client-keys) can only send requests. SIGTERM: running jobs checkpoint and are
kept queued; the service exits 128+signal and, started again, resumes them.
"""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

from ddp import protocol
from ddp.config import Config
from ddp.errors import EXIT_SIGNAL_BASE, DDPError, UsageError
from ddp.log import Log
from ddp.protocol import ProtocolError
from ddp.signals import StopRequest

from .access import CurveKeys
from .jobrun import JobRun
from .jobstore import JobStore
from .membership import Member, Membership
from .pool import enter
from .requests import Requests, job_row
from .scheduler import MAX_FRAME, Scheduler
from .transport import Router

BUSY_POLL = 0.02             # seconds between looks while a job opens or closes in its thread
STOP_WAIT = 600.0            # at a stop, the longest wait for a job to write its checkpoint


class Service:
    """The service's loop: messages in, the pool's heartbeats, the scheduler, the jobs' steps."""

    def __init__(self, cfg: Config, log: Log, stop: StopRequest, keys: CurveKeys | None, metrics=None):
        self.cfg, self.log, self.stop, self.keys, self.metrics = cfg, log, stop, keys, metrics
        self.store = JobStore(cfg.state_dir, log)
        self.router = Router(cfg.bind, MAX_FRAME, keys)
        self.endpoint = self.router.endpoint
        self.pool = Membership(self.router, log, None, cfg.worker_timeout)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ddp-job")
        self.scheduler = Scheduler(cfg, log, self.store, self.pool, self.executor, metrics)
        self.records, self.jobs = self.scheduler.records, self.scheduler.jobs
        self.requests = Requests(self)
        self.last_publish = 0.0
        queued = sum(r.state == "queued" for r in self.records.values())
        log.info(f"service on {self.endpoint}{' (CURVE)' if keys else ''}, state in {cfg.state_dir}: "
                 f"{len(self.records)} job{'s' * (len(self.records) != 1)} on record, {queued} queued")

    # --- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal; the exit code (128 + the signal)."""
        try:
            while not self.stop.signum:
                self.turn()
            self.shutdown()
            return EXIT_SIGNAL_BASE + self.stop.signum
        finally:
            self.close()

    def turn(self) -> None:
        busy = any(j.phase in ("opening", "closing") for j in self.jobs.values())
        if self.router.wait(BUSY_POLL if busy else self.pool.heartbeat):
            for _ in range(1000):
                message = self.router.receive()
                if message is None:
                    break
                self._handle(*message)
        now = time.monotonic()
        for member, why in self.pool.gone(now):
            self.gone(member, why, lost=True)
        for job in list(self.jobs.values()):
            job.check_deadlines(now)
        self.scheduler.schedule()
        for job in list(self.jobs.values()):
            job.tick()
            if job.phase == "ended":
                self.scheduler.retire(job)
        self.publish()

    # --- messages ------------------------------------------------------------------

    def _role(self, frame) -> str:
        """"client", "worker", or "any" without CURVE (loopback only: everyone is both)."""
        if self.keys is None:
            return "any"
        key = frame.get("User-Id").encode()
        return "client" if key in self.keys.clients else "worker"

    def _handle(self, frames: list, extra: int = 0) -> None:
        peer = frames[0]
        if peer in self.pool.banned:
            return self.pool.drop("ignored peer")
        if extra or len(frames) < 2:
            return self.strike(peer, "malformed")
        try:
            msg = protocol.decode(frames[1].bytes, protocol.FROM_WORKER | protocol.FROM_CLIENT,
                                  protocol.MAX_REQUEST)
        except ProtocolError:
            return self.strike(peer, "malformed")
        kind = msg["type"]
        if (len(frames) == 3) != (kind in protocol.ARRAY_TYPES) or (
                kind != "request" and len(frames[1]) > protocol.MAX_HEADER):
            return self.strike(peer, "malformed")
        if kind == "status":
            return self.pool.reply(peer, "status_reply", status=self.status())
        role = self._role(frames[1])
        if kind == "request":
            return self.requests.handle(peer, msg, role)
        if role == "client":
            return self.pool.reply(peer, "refuse", reason=(
                "this key is a client's (--client-keys): it cannot join as a worker; give the "
                "worker a key of its own (ddp-keygen DIR --name NAME, in --authorized-keys)"))
        self._from_worker(peer, kind, msg, frames)

    def _from_worker(self, peer: bytes, kind: str, msg: dict, frames: list) -> None:
        if kind == "hello":
            member = self.pool.get(peer)
            if member is not None:  # a worker starting over: its tasks go to the others
                self.gone(member, "rejoined")
            enter(self.pool, peer, msg["host"], msg["cores"])
            return
        member = self.pool.heard_from(peer, kind)  # e.g. this service restarted: hello again
        if member is None:
            return
        if kind == "heartbeat":
            return
        if kind == "bye":
            return self.gone(member, "left")
        job = self._job_of(member)
        if job is None or msg["job"] != member.job:
            return self.pool.drop("stale")  # e.g. moved to another job meanwhile
        if kind == "ready":
            return self.strike(peer, "unexpected") if member.joined else job.ready(member, msg["fingerprint"])
        if kind == "unable":
            return job.cannot(member, msg["reason"]) if not member.joined else self.strike(peer, "unexpected")
        if not member.joined:
            return self.pool.drop("stale")
        job.result(member, msg, frames)

    def _job_of(self, member: Member) -> JobRun | None:
        if not member.job:
            return None
        return next((j for j in self.jobs.values() if j.wire == member.job), None)

    def strike(self, peer: bytes, reason: str) -> None:
        banned = self.pool.strike(peer, reason)
        if banned is not None:
            self.gone(*banned)

    def gone(self, member: Member, why: str, lost: bool = False) -> None:
        """A worker left the service: out of its job (its rows go to the others) and the pool."""
        job = self._job_of(member)
        if job is not None:
            job.drop(member, why, lost)
        if member.peer in self.pool.members:
            self.pool.remove(member, why, lost)

    # --- status --------------------------------------------------------------------

    def rows(self) -> list[dict]:
        return [job_row(r, self.jobs.get(r.id)) for r in
                sorted(self.records.values(), key=lambda r: r.seq)]

    def status(self) -> dict:
        return {"state": "serving", "endpoint": self.endpoint, "jobs": self.rows(),
                "workers": [{"name": m.name, "job": next((j.record.id for j in self.jobs.values()
                                                          if j.wire == m.job), None),
                             "loading": not m.joined} for m in self.pool.all()],
                "dropped": dict(self.pool.dropped), "workers_lost": self.pool.lost,
                "refused_keys": self.keys.refused if self.keys else 0}

    def publish(self) -> None:
        """The jobs table and the pool to the metrics, twice a second at most."""
        now = time.monotonic()
        if self.metrics is None or now - self.last_publish < 0.5:
            return
        self.last_publish = now
        self.metrics.set_jobs(self.rows())
        self.metrics.set_pool(len(self.pool), sum(1 for m in self.pool.all() if not m.job))

    # --- the end -------------------------------------------------------------------

    def shutdown(self) -> None:
        """Running jobs checkpoint and stay queued; the workers are not told to stop (they
        wait, and come back by themselves when the service does)."""
        name = signal.Signals(self.stop.signum).name
        self.log.info(f"{name}: checkpointing {len(self.jobs)} running job(s); the queue is kept")
        deadline = time.monotonic() + STOP_WAIT
        while self.jobs and time.monotonic() < deadline:
            for job in list(self.jobs.values()):
                if job.phase in ("running", "opening") and job.ending is None:
                    job.stop(signal.SIGTERM)
                job.tick()
                if job.phase == "ended":
                    self.scheduler.retire(job)
            if self.jobs:
                wait([j.future for j in self.jobs.values()], timeout=BUSY_POLL)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.router.close()


def open_metrics(cfg: Config, log: Log):
    """The service's HTTP port (metrics, /status, dashboard), or None (--metrics-port 0,
    or the default port busy)."""
    from ddp.monitor import DEFAULT_PORT

    port = DEFAULT_PORT if cfg.metrics_port is None else cfg.metrics_port
    if not port:
        return None
    from ddp.monitor import ServiceMonitor

    try:
        metrics = ServiceMonitor(cfg.metrics_addr, port, stall_timeout=cfg.stall_timeout, warn=log.warn)
    except OSError as e:
        if cfg.metrics_port is not None:
            raise UsageError(f"--metrics-port {port} on {cfg.metrics_addr}: cannot serve there "
                             f"({e.strerror or e}); pick another port or --metrics-port 0 for none")
        log.warn(f"metrics port {port} is busy ({e.strerror or e}); serving no metrics (give --metrics-port)")
        return None
    log.info(f"dashboard and metrics on http://{cfg.metrics_addr}:{metrics.port}/ (/metrics, /status)")
    return metrics


def run_service(cfg: Config, prog: str) -> int:
    """ddp-coordinator --state-dir: serve until stopped; the exit code."""
    from ddp.command import print_error

    from .access import preflight

    log = Log(0, prog, level="warning" if cfg.quiet else "info")
    stop = StopRequest()
    stop.install(deferred=True)  # the loop looks at it every turn
    metrics = None
    try:
        keys = preflight(cfg, log)
        metrics = open_metrics(cfg, log)
        return Service(cfg, log, stop, keys, metrics).run()
    except DDPError as e:
        print_error(prog, e)
        return e.exit_code
    finally:
        stop.restore()
        if metrics is not None:
            metrics.close()
