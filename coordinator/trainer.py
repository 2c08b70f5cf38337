"""The data-parallel training loop under MPI: every rank computes its shard, the
exchange makes the sums meet and moves the parameters, every rank ends the step
with the same parameters.

One step, on every rank:
  1. the schedule gives this step's global batch; this rank takes its shard;
  2. the worker writes Σ (weighted) per-sample gradients of the shard into the
     exchange's buffer (in passes of at most --micro-batch rows), after [loss sum,
     sample count, correct count, stop flag, weight sum], telling the exchange as
     the last pass's backward finishes each layer (so buckets can start early);
  3. the exchange finishes: the sums of every rank have met;
  4. the run has the exchange apply the optimizer: the gradient divided by the
     *global* weight sum (the sample count without weights), whatever the shards;
  5. rank 0 logs, shows progress and writes checkpoints.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ddp import data as ddata
from ddp.errors import DDPError
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.optim import state_slots
from ddp.setup import Setup
from ddp.signals import StopRequest
from ddp.worker.compute import ShardCompute

from .exchange import make_exchange
from .run import Evaluator, Run

# Slots before the gradients in the step's buffer.
LOSS, COUNT, CORRECT, STOP, WEIGHT = range(5)
N_STATS = 5


def start(run: Run, comm) -> None:
    """Rank 0 loads the starting point; every rank learns whether that failed and,
    if not, starts from the same step, parameters and optimizer state."""
    step, error = 0, None
    if comm.rank == 0:
        try:
            step = run.load_start()
        except DDPError as e:
            error = e
    comm.agree(error)
    run.begin(run.exchange.share_start(step, run.opt))


def train(setup: Setup, comm, log: Log, stop: StopRequest, wall_start: float,
          monitor: Monitor | None = None) -> dict:
    """The MPI loop to the last step (or a stop request); the run's summary."""
    cfg, layout = setup.cfg, setup.layout
    dtype = np.dtype(cfg.dtype)
    world, rank = comm.world_size, comm.rank
    # The step's buffer: the stats (padded to 64 bytes, so the gradients stay
    # aligned), then the gradients; all of it is summed over ranks.
    exchange = make_exchange(comm, layout, cfg, max(N_STATS, 64 // dtype.itemsize), state_slots(cfg))
    stats, grads = exchange.buf[:N_STATS], layout.views(exchange.grad)
    # buffers for the largest shard: a batch can hold no more than the training set
    max_rows = max(1, math.ceil(min(cfg.batch_size, len(setup.train)) / world))
    scratch = None  # a pass's gradient before it joins the sum, when there are passes
    if cfg.micro_batch and cfg.micro_batch < max_rows:
        max_rows = cfg.micro_batch
        scratch = layout.views(np.empty(layout.size, dtype))
    compute = ShardCompute(layout, cfg.activation, cfg.loss, dtype, max_rows, cfg.dropout, cfg.seed)
    reader = ddata.BatchReader(setup.train, setup.schedule, max_rows, dtype, setup.mean, setup.std)
    run = Run(setup, log, exchange, Evaluator(setup, compute, exchange), monitor)
    start(run, comm)
    stop.defer()  # the parameters exist: from now on a signal is honoured after a step
    reports = _rank_reports(comm, monitor, run.step) if cfg.metrics_port else None
    progress = reports.progress if reports is not None else [0, 0.0]

    t_compute = t_exchange = 0.0
    comm.barrier()
    run.start_clock()
    clean = False
    try:
        while not run.done:
            t0 = time.perf_counter()
            lo, hi = ddata.shard_bounds(setup.schedule.batch_len(run.step), world, rank)
            loss_sum, correct, weight = compute.batch_sums_(run.params_views, grads, scratch, reader,
                                                            run.step, lo, hi, exchange.layer_done)
            stats[LOSS], stats[COUNT], stats[CORRECT], stats[WEIGHT] = loss_sum, hi - lo, correct, weight
            stats[STOP] = 1 if stop.signum else 0
            t1 = time.perf_counter()
            t_compute += t1 - t0
            progress[0], progress[1] = run.step + 1, t_compute  # this rank reached the exchange
            totals = exchange.finish()
            t2 = time.perf_counter()
            t_exchange += t2 - t1
            stop_requested = totals[STOP] > 0
            run.update_(float(totals[LOSS]), float(totals[CORRECT]), int(totals[COUNT]),
                        t0, t1 - t0, t2 - t1, weight_sum=float(totals[WEIGHT]))
            if stop_requested:
                break
        clean = True
    finally:
        log.close_progress()
        if reports is not None:
            reports.close(clean)
    if not run.done:  # the signal may have reached one rank only: agree on which it was
        signum = np.array([stop.signum], dtype=np.int64)
        comm.allreduce_(signum, op="max")
        stop.signum = int(signum[0])
    train_seconds = run.train_seconds()
    summary = run.finish(stop, {
        "backend": "mpi",
        "compute_seconds": t_compute,
        "allreduce_seconds": t_exchange,
        "allreduce_fraction": t_exchange / train_seconds if train_seconds > 0 else None,
    })
    summary["wall_seconds"] = time.perf_counter() - wall_start
    summary["exchange"] = exchange.name
    exchange.close()
    return summary


def _rank_reports(comm, monitor: Monitor | None, step: int):
    """Each rank's progress at rank 0, where metrics are served."""
    reports = comm.rank_reports(monitor and monitor.worker_report, step)
    if monitor is not None:
        for r in range(comm.world_size):
            monitor.worker_report(f"rank-{r}", step, None)
    return reports
