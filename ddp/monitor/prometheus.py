"""The Prometheus views: of a RunState (metric families built when /metrics is
scraped, and at the end of a run the push of its outcome to a Pushgateway), and of the
training service (its jobs, queue and pool, and each tracked job's families labelled
with its id). prometheus_client is imported only here, and only when used."""
from __future__ import annotations

import math
import platform
import socket
import time

import numpy as np

from .. import __version__
from .jobs import JOB_BUCKETS, ServiceState
from .state import BUCKETS, STATES, RunState, finite

# (RunState.hist key, metric name, help): the names are the README's and Grafana's
HISTOGRAMS = (
    ("step", "ddp_step_duration_seconds", "Wall time of one training step"),
    ("compute", "ddp_compute_duration_seconds",
     "Forward and backward pass of a step (ZeroMQ: the slowest shard)"),
    ("exchange", "ddp_allreduce_duration_seconds",
     "Gradient exchange of a step: the Allreduce (ZeroMQ: sends, waits and the sum)"),
)


def _gauge(name: str, doc: str, value, labels=None):
    """A gauge family: one sample of `value`, or with `labels` one per (key, value)."""
    from prometheus_client.core import GaugeMetricFamily

    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if labels:
        for key, v in value:
            g.add_metric(list(key), v)
    elif value is not None:
        g.add_metric([], value)
    return g


def _build_info(backend: str):
    from prometheus_client.core import InfoMetricFamily

    return InfoMetricFamily("ddp_build", "ddp-train version and runtime", value={
        "version": __version__, "backend": backend, "python": platform.python_version(),
        "numpy": np.__version__})


def _labelled(family, labels: dict):
    """The family with `labels` added to every sample (before the sample's own)."""
    family.samples = [s._replace(labels={**labels, **s.labels}) for s in family.samples]
    return family


class Collector:
    """A prometheus_client custom collector over one RunState: each scrape copies the
    numbers under the state's lock and builds the families from the copy.

    Parameters
    ----------
    run : RunState
        What the families show.
    labels : dict or None
        Labels added to every sample (the service's job="<id>").
    """

    def __init__(self, run: RunState, labels: dict | None = None):
        self.run, self.labels = run, labels or {}

    def collect(self):
        for family in self._families():
            yield _labelled(family, self.labels) if self.labels else family

    def _snapshot(self) -> dict:
        run = self.run
        with run.lock:
            return dict(
                hists={k: h.cumulative() for k, h in run.hist.items()},
                loss=run.train_loss, acc=run.train_accuracy, val_loss=run.val_loss,
                val_acc=run.val_accuracy, grad_norm=run.grad_norm, state=run.state,
                steps=run.totals.steps, samples=run.totals.n, epoch=run.epoch,
                checkpoint=run.checkpoint_time)

    def _families(self):
        from prometheus_client.core import CounterMetricFamily

        run, values = self.run, self._snapshot()
        yield _build_info(run.backend)
        yield _gauge("ddp_start_time_seconds", "Unix time the run started", run.started)
        yield _gauge("ddp_state", "1 for the run's current state",
                     [((s,), float(s == values["state"])) for s in STATES], labels=("state",))
        yield _gauge("ddp_total_steps", "Steps the run will take in all", run.total_steps)
        yield _gauge("ddp_epoch", "Epochs completed (fractional)", values["epoch"])
        yield CounterMetricFamily("ddp_train_steps_total", "SGD steps applied by this process",
                                  value=values["steps"])
        yield CounterMetricFamily("ddp_train_samples_total", "Training samples consumed by this process",
                                  value=values["samples"])
        yield _gauge("ddp_train_loss", "Mean training loss over the last second of steps (data term)",
                     values["loss"])
        if run.classify:
            yield _gauge("ddp_train_accuracy", "Training accuracy over the last second of steps",
                         values["acc"])
        yield _gauge("ddp_val_loss", "Validation loss at the last evaluation", values["val_loss"])
        if run.classify:
            yield _gauge("ddp_val_accuracy", "Validation accuracy at the last evaluation",
                         values["val_acc"])
        yield _gauge("ddp_learning_rate", "Learning rate of the last update (as scheduled)", run.lr)
        yield _gauge("ddp_grad_norm", "L2 norm of the averaged gradient (sampled once a second)",
                     values["grad_norm"])
        yield from self._worker_gauges()
        for key, name, doc in HISTOGRAMS:
            yield _histogram(name, doc, *values["hists"][key])
        yield from self._coordinator_counters()
        if values["checkpoint"] is not None:
            yield _gauge("ddp_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint",
                         values["checkpoint"])

    def _worker_gauges(self):
        w = self.run.workers
        age = time.time() - time.monotonic()  # monotonic → unix time
        active = w.listing(departed=False)
        yield _gauge("ddp_workers", "Ranks (MPI) or connected workers (ZeroMQ) computing shards",
                     w.count)
        yield _gauge("ddp_worker_last_step", "Last step each rank or worker reported",
                     [((x.name,), x.last_step) for x in active], labels=("worker",))
        yield _gauge("ddp_worker_compute_duration_seconds",
                     "Mean compute time per step of each rank or worker",
                     [((x.name,), x.compute_seconds) for x in active if x.compute_seconds is not None],
                     labels=("worker",))
        yield _gauge("ddp_worker_last_report_timestamp_seconds",
                     "Unix time each rank or worker last reported (a hung one stops)",
                     [((x.name,), x.reported + age) for x in active], labels=("worker",))

    def _coordinator_counters(self):
        from prometheus_client.core import CounterMetricFamily

        w = self.run.workers
        c = CounterMetricFamily("ddp_rejected_messages_total", "Messages the coordinator dropped, by reason",
                                labels=["reason"])
        for reason, n in dict(w.rejected).items():  # copied under the GIL: one thread writes
            c.add_metric([reason.replace(" ", "_").replace("-", "_")], n)
        yield c
        yield CounterMetricFamily("ddp_worker_failures_total", "Workers lost (died, hung or unreachable)",
                                  value=w.failures)
        yield CounterMetricFamily("ddp_worker_joins_total", "Workers admitted", value=w.joins)
        yield CounterMetricFamily("ddp_shard_timeouts_total", "Shards not back by their deadline "
                                  "(recomputed by another worker)", value=w.shard_timeouts)


def _histogram(name: str, doc: str, cumulative: list[int], total: float, bounds=BUCKETS):
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, doc, sum_value=total, buckets=[
        ("+Inf" if math.isinf(b) else repr(b), c) for b, c in zip(bounds, cumulative)])


class ServiceCollector:
    """The training service's families: its jobs by state, how long jobs queued and ran,
    its worker pool; then every tracked job's own families (those of a one-job run) with
    job="<id>", merged by name, since a scrape may hold each family only once."""

    def __init__(self, service: ServiceState):
        self.service = service

    def collect(self):
        s = self.service.snapshot()
        families = [
            _build_info("service"),
            _gauge("ddp_jobs", "Jobs of the service by state",
                   [((state,), float(n)) for state, n in s["by_state"].items()], labels=("state",)),
            _histogram("ddp_job_queue_seconds", "Time a job waited in the queue",
                       *s["queue"], bounds=JOB_BUCKETS),
            _histogram("ddp_job_duration_seconds", "Time a job ran, whatever its end",
                       *s["duration"], bounds=JOB_BUCKETS),
            _gauge("ddp_pool_workers", "Workers connected to the service", s["pool_workers"]),
            _gauge("ddp_pool_idle_workers", "Connected workers that run no job", s["idle_workers"]),
        ]
        for job_id, run in s["tracked"]:
            families.extend(Collector(run, {"job": job_id}).collect())
        yield from _merged(families)


def _merged(families) -> list:
    """One family per name: the samples of later families of a name joined to the first."""
    by_name = {}
    for family in families:
        if family.name in by_name:
            by_name[family.name].samples.extend(family.samples)
        else:
            by_name[family.name] = family
    return list(by_name.values())


def _registry(collector):
    """A registry holding only `collector` (no process or platform metrics)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def registry(run: RunState):
    """A registry holding only the run's collector."""
    return _registry(Collector(run))


def service_registry(service: ServiceState):
    """A registry holding only the service's collector."""
    return _registry(ServiceCollector(service))


def push(run: RunState, url: str, exit_code: int, summary: dict | None, warn) -> None:
    """The outcome of a batch job, as the Prometheus docs recommend: pushadd, so a
    failure keeps the last success's timestamp. A failed push is a warning."""
    from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

    reg = CollectorRegistry()

    def put(name, doc, value):
        if value is not None:
            Gauge(name, doc, registry=reg).set(value)

    now = time.time()
    put("ddp_run_duration_seconds", "Wall time of the last run", now - run.started)
    put("ddp_run_end_timestamp_seconds", "Unix time the last run ended", now)
    put("ddp_run_exit_code", "Exit code of the last run", exit_code)
    put("ddp_run_steps", "Steps taken by the last run", run.step)
    if exit_code == 0 and summary is not None:
        put("ddp_last_success_timestamp_seconds", "Unix time of the last successful run", now)
        put("ddp_final_loss", "Final training loss of the last successful run",
            finite(summary.get("final_loss")))
        put("ddp_final_accuracy", "Final training accuracy of the last successful run",
            finite(summary.get("train_accuracy")))
    try:
        pushadd_to_gateway(url, job="ddp_train", registry=reg, timeout=10,
                           grouping_key={"instance": socket.gethostname()})
    except Exception as e:  # noqa: BLE001 — a failed push must not change the run's outcome
        warn(f"--pushgateway {url}: push failed ({e})")
