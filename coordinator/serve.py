"""A whole ZeroMQ run: ddp-coordinator, and ddp-train --backend zmq (with --workers N)."""
from __future__ import annotations

import shutil
import signal
import tempfile
import time

import numpy as np

from ddp.errors import DivergedError
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.setup import Setup
from ddp.worker.compute import ShardCompute

from .access import CurveKeys
from .local_workers import LocalWorkers, connect_endpoint
from ddp.signals import StopRequest

from .exchange import LocalExchange
from .run import Evaluator, Run
from .server import Coordinator

EVAL_ROWS = 4096


def serve(setup: Setup, log: Log, stop: StopRequest, keys: CurveKeys | None, spawn: int = 0,
          worker_threads: int = 1, monitor: Monitor | None = None) -> dict:
    """Run the job as the coordinator (and `spawn` local workers); the run's summary."""
    cfg = setup.cfg
    dtype = np.dtype(cfg.dtype)
    # the workers' sums are added here, in shard order: one process applies the update
    exchange = LocalExchange(setup.layout.size, 0, dtype)
    compute = ShardCompute(setup.layout, cfg.activation, cfg.loss, dtype,
                           min(EVAL_ROWS, max(len(setup.train), 1)))
    run = Run(setup, log, exchange, Evaluator(setup, compute, exchange), monitor)
    run.begin(run.load_start())
    stop.defer()  # the parameters exist: from now on a signal is honoured after a step
    tmpdir = tempfile.mkdtemp(prefix="ddp-coordinator-")
    coord = local = None
    reason = "the coordinator failed"
    try:
        coord = Coordinator(setup, log, stop, cfg.bind or f"ipc://{tmpdir}/coordinator.sock", keys,
                            monitor)
        log.info(f"coordinator: job {coord.job_id} on {coord.endpoint}"
                 f"{' (CURVE)' if keys else ''}, data fingerprint {coord.fingerprint}")
        if spawn:
            local = LocalWorkers(spawn, connect_endpoint(coord.endpoint), worker_threads, keys, tmpdir)
            coord.watchdog = lambda: local.check(coord.members)
        started = coord.wait_for_workers(max(cfg.min_workers, spawn))  # all local ones at first
        run.start_clock()
        if monitor is not None:
            monitor.set_workers(len(coord.members))
        while started and not run.done:
            t0 = time.perf_counter()
            result = coord.run_step(run.step, run.params, exchange.grad)  # Σ in shard order
            if result is None:
                break
            loss, correct, n = result
            wall = time.perf_counter() - t0
            compute = min(coord.step_compute, wall)  # the slowest shard; the rest is exchange
            run.update_(loss, correct, n, t0, compute, wall - compute,
                        weight_sum=coord.shards.weight_sum)
            if stop.signum:
                break
        run.world_size = len(coord.members)
        if run.done:
            reason = "training finished"
        else:
            reason = f"the coordinator was stopped by {signal.Signals(stop.signum).name}"
            if not stop.signum:  # cannot happen: the loop only ends early on a signal
                raise AssertionError("training loop ended early without a stop request")
        coord.stop_workers(reason)
        summary = run.finish(stop, exchange_summary(coord, keys))
        return summary
    except DivergedError:
        reason = "training diverged"
        raise
    finally:
        if coord is not None:
            if coord.members or coord.members.pending:
                coord.stop_workers(reason)
            coord.close()
        if local is not None:
            local.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


def exchange_summary(coord: Coordinator, keys: CurveKeys | None) -> dict:
    """What the summary says of the ZeroMQ exchange: traffic, refusals, failures."""
    steps = max(coord.steps_done, 1)
    sent, received = coord.router.bytes_sent, coord.bytes_received
    return {
        "backend": "zmq",
        "endpoint": coord.endpoint,
        "bytes_sent_per_step": sent / steps,
        "bytes_received_per_step": received / steps,
        "bytes_per_step": (sent + received) / steps,
        "dropped_messages": dict(coord.members.dropped),
        "workers_lost": coord.members.lost,
        "shard_timeouts": coord.shards.timeouts,
        "recovery_seconds": coord.recoveries,
        "refused_keys": keys.refused if keys else 0,
    }
