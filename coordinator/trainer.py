"""The data-parallel training loop: every rank computes its shard, the sums meet
in one Allreduce, every rank applies the same SGD step.

One step, on every rank:
  1. the schedule gives this step's global batch; this rank takes its shard;
  2. the worker writes Σ per-sample gradients of the shard into the flat buffer,
     after [loss sum, sample count, correct count, stop flag];
  3. in-place Allreduces sum that whole buffer over ranks, in buckets of
     --bucket-mb, each started as soon as backward has written it (last layers
     first) and all waited for before the update;
  4. the optimizer divides by the *global* sample count and updates in place,
     so parameters stay identical everywhere whatever the shard sizes;
  5. rank 0 logs, shows progress and writes checkpoints.
"""
from __future__ import annotations

import math
import os
import signal
import tempfile
import time

import numpy as np

from ddp import checkpoint as ckpt
from ddp import data as ddata
from ddp.config import TRAJECTORY_KEYS, Config
from ddp.errors import DDPError, DivergedError, UsageError
from ddp.log import Log, human_bytes
from ddp.monitor import Monitor
from ddp.model import init_params_
from ddp.optim import SGD
from ddp.setup import Setup
from ddp.signals import StopRequest  # noqa: F401 (part of this module's interface)
from worker.compute import ShardCompute

from .mpi import plan_buckets

# Slots after the gradients in the buffer that is allreduced each step.
LOSS, COUNT, CORRECT, STOP = range(4)
N_STATS = 4


def model_config(setup: Setup) -> dict:
    cfg = setup.cfg
    out = {"layers": list(cfg.layers), "activation": cfg.activation, "loss": cfg.loss,
           "bias": cfg.bias, "dtype": cfg.dtype, "standardize": None, "training": cfg.to_dict()}
    if setup.mean is not None:
        out["standardize"] = {"mean": setup.mean.tolist(), "std": setup.std.tolist()}
    return out


def _check_resumable(found: ckpt.Checkpoint, cfg: Config, params: np.ndarray, fingerprint: str,
                     log: Log) -> None:
    saved_cfg, path = found.meta.get("config", {}), found.path
    now = cfg.to_dict()
    differ = [k for k in TRAJECTORY_KEYS if saved_cfg.get(k) != now.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} → {now.get(k)!r}" for k in differ)
        raise UsageError(f"checkpoint {path} was written by a different run ({detail}); "
                         f"use another --checkpoint-dir or --no-resume to start over")
    saved_fp = found.meta.get("data_fingerprint")
    if saved_fp is None:  # written before checkpoints carried it: a refusal would strand the run
        log.warn(f"checkpoint {path} has no data fingerprint (an older ddp-train wrote it): "
                 f"resuming without checking that --data {cfg.data} still holds the same "
                 f"samples; use --no-resume if it changed")
    elif saved_fp != fingerprint:
        raise UsageError(f"checkpoint {path} was written by a different run (the samples of "
                         f"--data {cfg.data} differ: data fingerprint {saved_fp!r} → "
                         f"{fingerprint!r}); use another --checkpoint-dir or --no-resume to "
                         f"start over")
    if found.params.shape != params.shape or found.params.dtype != params.dtype:
        raise UsageError(f"checkpoint {path} holds {found.params.dtype}[{found.params.size}] "
                         f"parameters, this model has {params.dtype}[{params.size}]; use another "
                         f"--checkpoint-dir or --no-resume to start over")
    changed = [k for k in ("lr", "momentum", "l2") if saved_cfg.get(k) != now.get(k)]
    if changed:
        log.warn("resuming with changed " + ", ".join(
            f"{k} ({saved_cfg.get(k)} → {now.get(k)})" for k in changed))


def check_writable(cfg: Config) -> None:
    """Fail at start, not after hours of training, if an output cannot be written."""
    targets = [("--checkpoint-dir", cfg.checkpoint_dir, cfg.checkpoint_dir)]
    for flag, path in (("--output", cfg.output), ("--summary-json", cfg.summary_json)):
        if path:
            targets.append((flag, path, os.path.dirname(os.path.abspath(path))))
    for flag, path, directory in targets:
        if not path:
            continue
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})")


def _resume_or_start_over(setup: Setup, series: ckpt.Series, log: Log,
                          params: np.ndarray) -> ckpt.Checkpoint | None:
    """Rank 0, with --checkpoint-dir: the checkpoint to resume (checked against this run),
    or None after setting aside whatever the directory holds (--no-resume, or nothing in it
    verifies), so that every checkpoint left there from now on is this run's."""
    cfg = setup.cfg
    stale = ckpt.remove_stale_temporaries(cfg.checkpoint_dir)
    if stale:
        log.info(f"removed {len(stale)} temporary file{'s' * (len(stale) > 1)} that an "
                 f"interrupted checkpoint write left in {cfg.checkpoint_dir}")
    fingerprint = setup.fingerprint()  # hashed once; the checkpoints' meta and ZeroMQ reuse it
    found = ckpt.latest_checkpoint(cfg.checkpoint_dir, log.warn) if cfg.resume else None
    if found is not None:
        _check_resumable(found, cfg, params, fingerprint, log)
        series.continue_from(found)
        return found
    aside = series.set_aside()
    if aside is not None:
        where, steps = aside
        why = "--no-resume" if not cfg.resume else "none of them could be resumed"
        log.info(f"{why}: moved {len(steps)} earlier checkpoint{'s' * (len(steps) > 1)} "
                 f"(steps {steps[0]}–{steps[-1]}) to {where}; this run starts over")
    return None


def initial_state(setup: Setup, comm, log: Log, params: np.ndarray, opt: SGD,
                  shared: bool = False, series: ckpt.Series | None = None) -> int:
    """Fill params/velocity on every rank from a checkpoint, --init or the seed; return the step.
    `series` (rank 0, with --checkpoint-dir) learns which checkpoints the run may prune."""
    cfg = setup.cfg
    step = np.zeros(1, dtype=np.int64)
    error = None
    if comm.rank == 0:
        try:
            check_writable(cfg)
            found = None
            if cfg.checkpoint_dir:
                found = _resume_or_start_over(setup, series or ckpt.Series(cfg.checkpoint_dir),
                                              log, params)
            if found is not None:
                params[...], opt.velocity[...] = found.params, found.velocity
                step[0] = found.step
                log.info(f"resuming from {found.path} at step {found.step}")
            elif cfg.init:
                params[...] = ckpt.load_init(cfg.init, setup.layout, params.dtype)
            else:
                init_params_(params, setup.layout, cfg.activation, cfg.seed)
        except DDPError as e:
            error = e
    comm.agree(error)
    comm.bcast_(step)
    if shared:  # one copy on the host, written by rank 0
        comm.barrier()
    else:
        comm.bcast_(params)
        comm.bcast_(opt.velocity)
    return int(step[0])


class Evaluator:
    """Data-parallel evaluation: each rank takes a contiguous shard of the set."""

    def __init__(self, setup: Setup, compute: ShardCompute, comm, dtype):
        self.setup, self.compute, self.comm = setup, compute, comm
        self.sums = np.zeros(3, dtype=np.float64)  # loss sum, correct, count
        self.dtype = dtype

    def __call__(self, dataset: ddata.Dataset, params_views) -> tuple[float, float | None]:
        """(mean loss, accuracy or None for mse) over the whole dataset."""
        reader = ddata.BatchReader(dataset, self.setup.schedule, self.compute.max_rows, self.dtype,
                                   self.setup.mean, self.setup.std)
        lo, hi = ddata.shard_bounds(len(dataset), self.comm.world_size, self.comm.rank)
        self.sums[:] = 0
        for start in range(lo, hi, self.compute.max_rows):
            x, y = reader.rows(slice(start, min(start + self.compute.max_rows, hi)))
            loss_sum, correct = self.compute.eval_sums(params_views, x, y)
            self.sums += (loss_sum, correct, len(x))
        self.comm.allreduce_(self.sums)
        loss_sum, correct, count = self.sums
        accuracy = correct / count if self.setup.cfg.loss == "cross-entropy" else None
        return loss_sum / count, accuracy


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


class Run:
    """What both backends do around the summed gradients: hold the parameters and the
    optimizer, apply each step's update, log, evaluate, checkpoint, summarize.

    The MPI loop and the ZeroMQ coordinator differ only in how the gradient sums of
    a step come together; each then calls `apply_(grad_sum, loss_sum, correct, n)`.
    """

    def __init__(self, setup: Setup, comm, log: Log, evaluate: "Evaluator",
                 monitor: Monitor | None = None, shared=None):
        cfg, layout = setup.cfg, setup.layout
        self.setup, self.cfg, self.layout, self.log, self.evaluate = setup, cfg, layout, log, evaluate
        self.rank = comm.rank
        self.dtype = np.dtype(cfg.dtype)
        self.opt = SGD(layout, self.dtype, cfg.lr, cfg.momentum, cfg.l2)
        self.shared = shared  # a SharedExchange: parameters and velocity live in its window
        if shared is not None:
            self.params, self.opt.velocity = shared.params, shared.velocity
        else:
            self.params = np.empty(layout.size, dtype=self.dtype)
        self.params_views = layout.views(self.params)
        self.series = ckpt.Series(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.step = self.start_step = initial_state(setup, comm, log, self.params, self.opt,
                                                    shared is not None, self.series)
        self.total = setup.total_steps
        self.spe = setup.schedule.steps_per_epoch
        self.log_every = cfg.log_every or max(1, (self.total - self.start_step) // 20)
        self.last_checkpoint = None
        self.interval = np.zeros(3)  # loss sum, correct, count since the last log line
        self.samples = 0
        self.val_loss = self.val_acc = None
        self.t_eval = 0.0
        self.t_loop = None
        self.world_size = comm.world_size
        self.monitor = monitor
        self.times = [0, 0.0, 0.0, 0.0]  # steps; step, compute, exchange s since the last log line
        # steady state: the rate after the first steps (BLAS and caches warm), for benchmarks
        self.steady_from = self.start_step + min(20, (self.total - self.start_step) // 5)
        self.steady_mark = None  # (perf_counter, t_eval, samples) when steady_from was reached

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def start_clock(self) -> None:
        self.log.start_progress(self.cfg.progress, self.total, self.start_step)
        self.t_loop = time.perf_counter()
        if self.monitor is not None:
            self.monitor.start(self.step, self.spe, self.world_size)

    def train_seconds(self) -> float:
        return time.perf_counter() - self.t_loop - self.t_eval

    def check_loss(self, loss_sum: float, n_samples: int) -> None:
        """Stop every rank alike (the sums are the same everywhere) on a NaN/Inf batch loss
        or one above --max-loss, before the step is applied."""
        batch_loss = loss_sum / n_samples
        limit = self.cfg.max_loss
        if math.isfinite(batch_loss) and (limit is None or batch_loss <= limit):
            return
        kept = f"; the last good checkpoint is step {self.last_checkpoint}" \
            if self.last_checkpoint is not None else ""
        what = f"loss became {batch_loss}" if not math.isfinite(batch_loss) else \
            f"loss {batch_loss:.6g} exceeded --max-loss {limit:g}"
        raise DivergedError(f"{what} at step {self.step + 1} (epoch {self.step // self.spe + 1}); "
                            f"lower --lr or check the data{kept}")

    def apply_(self, grad_sum: np.ndarray, loss_sum: float, correct: float, n_samples: int,
               started: float, t_compute: float, t_exchange: float) -> None:
        """One SGD step from the gradient sums of the whole global batch (`grad_sum` is
        used as scratch), then the log line, evaluation and checkpoint that are due.
        `started` is the step's perf_counter start; the others are its compute and
        gradient-exchange seconds."""
        self.check_loss(loss_sum, n_samples)
        self.interval += (loss_sum, correct, n_samples)
        monitor = self.monitor
        if self.shared is not None:  # each rank sums and updates its part (grad_sum is None)
            want_norm = bool(self.cfg.metrics_port) and self.step % 16 == 0  # alike on every rank
            self.shared.reduce_update_(self.opt, n_samples, want_norm)
            if want_norm and monitor is not None:
                monitor.grad_norm = math.sqrt(float(self.shared.norms.sum())) / n_samples
        else:
            if monitor is not None and monitor.window_due():  # once a second, not every step
                monitor.grad_norm = math.sqrt(float(np.dot(grad_sum, grad_sum))) / n_samples
            self.opt.step_(self.params, grad_sum, n_samples)
        self.step += 1
        self.samples += n_samples
        step, cfg = self.step, self.cfg
        if step == self.steady_from:
            self.steady_mark = (time.perf_counter(), self.t_eval, self.samples)
        if monitor is not None:
            t_step = time.perf_counter() - started
            times = self.times
            times[0] += 1
            times[1] += t_step
            times[2] += t_compute
            times[3] += t_exchange
            monitor.step_done(step, n_samples, loss_sum, correct, t_step, t_compute, t_exchange)
        if cfg.eval_every and self.setup.val is not None and step % cfg.eval_every == 0:
            te = time.perf_counter()
            self._set_state("evaluating")
            self.val_loss, self.val_acc = self.evaluate(self.setup.val, self.params_views)
            if monitor is not None:
                monitor.evaluated(step, self.val_loss, self.val_acc)
                monitor.set_state("training")
            self.t_eval += time.perf_counter() - te
        if step % self.log_every == 0 or step == self.total:
            self._log_line()
        self.log.advance()
        if cfg.checkpoint_dir and step % cfg.checkpoint_every == 0:
            # params are identical on every rank, so every rank takes this branch alike
            if not np.isfinite(self.params).all():
                raise DivergedError(f"parameters became NaN/Inf at step {step}; lower --lr")
            self.write_checkpoint()

    def _set_state(self, state: str) -> None:
        if self.monitor is not None:
            self.monitor.set_state(state)

    def _log_line(self) -> None:
        loss, correct, count = self.interval
        loss = loss / count + self.opt.l2_penalty(self.params)
        accuracy = correct / count if self.cfg.loss == "cross-entropy" else None
        samples_per_second = self.samples / max(self.train_seconds(), 1e-9)
        epoch = self.step // self.spe + (self.step % self.spe > 0)
        line = f"step {self.step}/{self.total} epoch {epoch} loss {loss:.4f}"
        if accuracy is not None:
            line += f" acc {accuracy:.3f}"
        if self.val_loss is not None:
            line += f" val_loss {self.val_loss:.4f}" + (
                f" val_acc {self.val_acc:.3f}" if self.val_acc is not None else "")
        line += f" samples/s {samples_per_second:,.0f}"
        if self.log.has_bar:
            self.log.bar.set_postfix_str(line.split(" ", 2)[2], refresh=False)
        else:
            self.log.info(line)
        if self.monitor is not None:
            n = max(self.times[0], 1)
            t_step, t_compute, t_exchange = (t / n for t in self.times[1:])
            self.monitor.event("step", step=self.step, epoch=self.step / self.spe, loss=loss,
                               accuracy=accuracy, val_loss=self.val_loss, val_accuracy=self.val_acc,
                               samples_per_second=samples_per_second, step_seconds=t_step,
                               compute_seconds=t_compute, exchange_seconds=t_exchange)
        self.interval[:] = 0
        self.times = [0, 0.0, 0.0, 0.0]

    def meta(self) -> dict:
        epoch, k = divmod(self.step, self.spe)
        return {"epoch": epoch, "batch_in_epoch": k, "world_size": self.world_size,
                "config": self.cfg.to_dict(), "data_fingerprint": self.setup.fingerprint()}

    def write_checkpoint(self) -> None:
        if self.rank == 0 and self.cfg.checkpoint_dir and self.step != self.last_checkpoint:
            self.last_checkpoint = self.step
            self._set_state("checkpointing")
            path = self.series.save(self.step, self.params, self.opt.velocity, self.meta())
            self.log.info(f"checkpoint {path}")
            if self.monitor is not None:
                self.monitor.checkpointed(self.step, path)
                self.monitor.set_state("training")

    def steady(self) -> dict | None:
        """Steps, seconds and samples/s from `steady_from` on (evaluation time excluded)."""
        if self.steady_mark is None or self.step <= self.steady_from:
            return None
        t, t_eval, samples = self.steady_mark
        seconds = time.perf_counter() - t - (self.t_eval - t_eval)
        return {"from_step": self.steady_from, "steps": self.step - self.steady_from,
                "seconds": seconds, "samples_per_second": (self.samples - samples) / seconds}

    def finish(self, stop: StopRequest, extra: dict | None = None) -> dict:
        """Checkpoint; unless interrupted, evaluate and write the model; the summary."""
        self.log.close_progress()
        train_seconds = self.train_seconds()
        steady = self.steady()
        cfg, step, total = self.cfg, self.step, self.total
        interrupted = step < total
        self.write_checkpoint()
        if interrupted:
            signame = signal.Signals(stop.signum).name
            where = (f"checkpoint in {cfg.checkpoint_dir}; run the same command to resume"
                     if cfg.checkpoint_dir else "no --checkpoint-dir was given, so progress is not saved")
            self.log.info(f"interrupted by {signame} after step {step}/{total}: {where}")
        final_loss = train_acc = None
        if not interrupted:  # a stopped job exits promptly: no final pass over the data
            self._set_state("evaluating")
            final_loss, train_acc = self.evaluate(self.setup.train, self.params_views)
            final_loss += self.opt.l2_penalty(self.params)
            if self.setup.val is not None:
                self.val_loss, self.val_acc = self.evaluate(self.setup.val, self.params_views)
            if self.rank == 0 and cfg.output:
                ckpt.save_model(cfg.output, self.layout, self.params, model_config(self.setup))
                self.log.info(f"model written to {cfg.output}")
            if stop.signum:  # the run was complete: nothing to resume, so it exits 0
                self.log.info(f"{signal.Signals(stop.signum).name} arrived after the last step: "
                              f"the run finished its evaluation{' and model' * bool(cfg.output)} "
                              f"and exits 0")
        summary = {
            "steps": step,
            "total_steps": total,
            "epochs": step / self.spe,
            "world_size": self.world_size,
            "final_loss": final_loss,
            "train_accuracy": train_acc,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_acc,
            "samples_per_second": self.samples / train_seconds if train_seconds > 0 else None,
            "train_seconds": train_seconds,
            "steady": steady,
            "resumed_from_step": self.start_step,
            "interrupted": interrupted,
            "signal": stop.signum or None,
            "layers": list(self.layout.layers),
            "parameters": self.layout.size,
            "dtype": cfg.dtype,
        }
        summary.update(extra or {})
        return summary


def train(setup: Setup, comm, log: Log, stop: StopRequest, wall_start: float,
          monitor: Monitor | None = None) -> tuple[dict, np.ndarray]:
    """The MPI loop to the last step (or a stop request); returns (summary, parameters)."""
    cfg, layout = setup.cfg, setup.layout
    dtype = np.dtype(cfg.dtype)
    world, rank = comm.world_size, comm.rank
    P = layout.size

    # One buffer for everything that is summed each step: the stats (padded to 64
    # bytes, so the gradients stay aligned), then the gradients.
    head = max(N_STATS, 64 // dtype.itemsize)
    one_host = world > 1 and comm.local_size == world
    comm.agree(UsageError("--exchange shared needs every rank on one host; use --exchange auto")
               if cfg.exchange == "shared" and world > 1 and not one_host else None)
    shared = None
    if one_host and cfg.exchange != "allreduce":
        shared = exchange = comm.shared_exchange(head + P, head, dtype)
        comm_buf = shared.buf
        comm_buf[:] = 0
        totals = shared.totals
    else:
        comm_buf = np.zeros(head + P, dtype=dtype)
        buckets = plan_buckets([(head + lo, head + hi) for lo, hi in layout.layer_spans()],
                               len(comm_buf), int(cfg.bucket_mb * 1e6) // dtype.itemsize)
        exchange = comm.exchange(comm_buf, buckets)
        totals = comm_buf[:N_STATS]
    stats, grad_flat = comm_buf[:N_STATS], comm_buf[head:]
    grad_views = layout.views(grad_flat)

    # buffers for the largest shard: a batch can hold no more than the training set
    max_rows = max(1, math.ceil(min(cfg.batch_size, len(setup.train)) / world))
    compute = ShardCompute(layout, cfg.activation, cfg.loss, dtype, max_rows)
    reader = ddata.BatchReader(setup.train, setup.schedule, max_rows, dtype, setup.mean, setup.std)
    run = Run(setup, comm, log, Evaluator(setup, compute, comm, dtype), monitor, shared)
    stop.defer()  # the parameters exist: from now on a signal is honoured after a step

    # each rank's progress at rank 0, where metrics are served
    reports = None
    if setup.cfg.metrics_port:
        reports = comm.rank_reports(monitor and monitor.worker_report, run.step)
        if monitor is not None:
            for r in range(world):
                monitor.worker_report(f"rank-{r}", run.step, None)
    progress = reports.progress if reports is not None else [0, 0.0]

    t_compute = t_allreduce = 0.0
    comm.barrier()
    run.start_clock()
    clean = False
    try:
        while not run.done:
            t0 = time.perf_counter()
            x, y = reader.shard(run.step, rank, world)
            loss_sum, correct = compute.grad_sums_(run.params_views, grad_views, x, y,
                                                   exchange.layer_done)
            stats[LOSS], stats[COUNT], stats[CORRECT] = loss_sum, len(x), correct
            stats[STOP] = 1 if stop.signum else 0
            t1 = time.perf_counter()
            t_compute += t1 - t0
            progress[0], progress[1] = run.step + 1, t_compute  # this rank reached the exchange
            exchange.wait()
            t2 = time.perf_counter()
            t_allreduce += t2 - t1
            stop_requested = totals[STOP] > 0
            run.apply_(None if shared else grad_flat, float(totals[LOSS]), float(totals[CORRECT]),
                       int(totals[COUNT]), t0, t1 - t0, t2 - t1)
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
        "allreduce_seconds": t_allreduce,
        "allreduce_fraction": t_allreduce / train_seconds if train_seconds > 0 else None,
    })
    summary["wall_seconds"] = time.perf_counter() - wall_start
    summary["exchange"] = "shared" if shared else ("allreduce" if world > 1 else None)
    params = run.params
    if shared is not None:
        params = params.copy()
        shared.close()
    return summary, params



def _who(s: dict) -> str:
    n = s["world_size"]
    if s.get("backend") == "zmq":
        return f"{n} worker{'s' * (n != 1)}"
    return f"{n} rank{'s' * (n > 1)}"


def summary_text(s: dict) -> str:
    if s["interrupted"]:
        return (f"stopped: {s['steps']}/{s['total_steps']} steps on {_who(s)}, "
                f"{_fmt(s['samples_per_second'], ',.0f')} samples/s")
    acc = "" if s["train_accuracy"] is None else f" accuracy {s['train_accuracy']:.4f}"
    val = ""
    if s["val_loss"] is not None:
        val = f", val loss {s['val_loss']:.4f}" + (
            "" if s["val_accuracy"] is None else f" accuracy {s['val_accuracy']:.4f}")
    if s.get("backend") == "zmq":
        comm = f"{human_bytes(s['bytes_per_step'])} sent+received per step"
    else:
        comm = f"exchange {_fmt(s['allreduce_fraction'], '.1%')} of step time"
    return (f"done: {s['steps']} steps on {_who(s)}, loss {s['final_loss']:.4f}{acc}{val}, "
            f"{_fmt(s['samples_per_second'], ',.0f')} samples/s, {comm}, "
            f"wall {s['wall_seconds']:.2f} s")
