"""The data-parallel training loop: every rank computes its shard, the sums meet
in one Allreduce, every rank applies the same SGD step.

One step, on every rank:
  1. the schedule gives this step's global batch; this rank takes its shard;
  2. the worker writes Σ per-sample gradients of the shard into the flat buffer,
     followed by [loss sum, sample count, correct count, stop flag];
  3. one in-place Allreduce sums that whole buffer over ranks;
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
from dataclasses import dataclass, replace

import numpy as np

from ddp import checkpoint as ckpt
from ddp import data as ddata
from ddp.config import TRAJECTORY_KEYS, Config
from ddp.errors import DDPError, DivergedError, UsageError
from ddp.log import Log
from ddp.model import Layout, init_params_
from ddp.optim import SGD
from worker.compute import ShardCompute

# Slots after the gradients in the buffer that is allreduced each step.
LOSS, COUNT, CORRECT, STOP = range(4)
N_STATS = 4


class StopRequest:
    """Set by SIGTERM/SIGINT: finish the step, checkpoint, exit. A second signal kills."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class Setup:
    """Everything a run needs, identical on every rank."""

    cfg: Config
    layout: Layout
    train: ddata.Dataset
    val: ddata.Dataset | None
    schedule: ddata.Schedule
    mean: np.ndarray | None
    std: np.ndarray | None

    @property
    def total_steps(self) -> int:
        return self.cfg.steps or self.cfg.epochs * self.schedule.steps_per_epoch


def prepare(cfg: Config) -> Setup:
    """Load and validate the data; resolve the layers. Raises DDPError on bad input."""
    data, layers = ddata.load(cfg.data, cfg)
    cfg = replace(cfg, layers=layers)
    val = None
    if cfg.val_fraction > 0:
        data, val = ddata.split(data, cfg.val_fraction, cfg.seed)
    elif cfg.val_data:
        val, _ = ddata.load(cfg.val_data, cfg, flag="--val-data")
    mean = std = None
    if cfg.standardize:
        mean, std = ddata.standardization(data)
    schedule = ddata.Schedule(len(data), cfg.batch_size, cfg.seed, cfg.shuffle)
    return Setup(cfg, Layout(layers, cfg.bias), data, val, schedule, mean, std)


def model_config(setup: Setup) -> dict:
    cfg = setup.cfg
    out = {"layers": list(cfg.layers), "activation": cfg.activation, "loss": cfg.loss,
           "bias": cfg.bias, "dtype": cfg.dtype, "standardize": None, "training": cfg.to_dict()}
    if setup.mean is not None:
        out["standardize"] = {"mean": setup.mean.tolist(), "std": setup.std.tolist()}
    return out


def _check_resumable(found: ckpt.Checkpoint, cfg: Config, params: np.ndarray, log: Log) -> None:
    saved_cfg, path = found.meta.get("config", {}), found.path
    now = cfg.to_dict()
    differ = [k for k in TRAJECTORY_KEYS if saved_cfg.get(k) != now.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} → {now.get(k)!r}" for k in differ)
        raise UsageError(f"checkpoint {path} was written by a different run ({detail}); "
                         f"use another --checkpoint-dir or --no-resume to start over")
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


def initial_state(setup: Setup, comm, log: Log, params: np.ndarray, opt: SGD) -> int:
    """Fill params/velocity on every rank from a checkpoint, --init or the seed; return the step."""
    cfg = setup.cfg
    step = np.zeros(1, dtype=np.int64)
    error = None
    if comm.rank == 0:
        try:
            check_writable(cfg)
            found = None
            if cfg.checkpoint_dir and cfg.resume:
                found = ckpt.latest_checkpoint(cfg.checkpoint_dir, log.warn)
            if found is not None:
                _check_resumable(found, cfg, params, log)
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


def train(setup: Setup, comm, log: Log, stop: StopRequest,
          wall_start: float) -> tuple[dict, np.ndarray]:
    """Run the loop to the last step (or a stop request); return (summary, parameters)."""
    cfg, layout = setup.cfg, setup.layout
    dtype = np.dtype(cfg.dtype)
    world, rank = comm.world_size, comm.rank
    P = layout.size

    # One buffer for everything that is summed each step: gradients, then stats.
    comm_buf = np.zeros(P + N_STATS, dtype=dtype)
    grad_flat, stats = comm_buf[:P], comm_buf[P:]
    params = np.empty(P, dtype=dtype)
    params_views, grad_views = layout.views(params), layout.views(grad_flat)
    opt = SGD(layout, dtype, cfg.lr, cfg.momentum, cfg.l2)

    # buffers for the largest shard: a batch can hold no more than the training set
    max_rows = max(1, math.ceil(min(cfg.batch_size, len(setup.train)) / world))
    compute = ShardCompute(layout, cfg.activation, cfg.loss, dtype, max_rows)
    reader = ddata.BatchReader(setup.train, setup.schedule, max_rows, dtype, setup.mean, setup.std)
    evaluate = Evaluator(setup, compute, comm, dtype)

    start_step = initial_state(setup, comm, log, params, opt)
    total = setup.total_steps
    spe = setup.schedule.steps_per_epoch
    log_every = cfg.log_every or max(1, (total - start_step) // 20)

    def meta(step: int) -> dict:
        epoch, k = divmod(step, spe)
        return {"epoch": epoch, "batch_in_epoch": k, "world_size": world, "config": cfg.to_dict()}

    last_checkpoint = None

    def write_checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        if rank == 0 and cfg.checkpoint_dir and step != last_checkpoint:
            last_checkpoint = step
            path = ckpt.save_checkpoint(cfg.checkpoint_dir, step, params, opt.velocity, meta(step))
            log.info(f"checkpoint {path}")

    log.start_progress(cfg.progress, total, start_step)
    interval = np.zeros(3)  # loss sum, correct, count since the last log line
    t_compute = t_allreduce = t_eval = 0.0
    samples = 0
    val_loss = val_acc = None
    step = start_step
    comm.barrier()
    t_loop = time.perf_counter()
    try:
        while step < total:
            t0 = time.perf_counter()
            x, y = reader.shard(step, rank, world)
            loss_sum, correct = compute.grad_sums_(params_views, grad_views, x, y)
            stats[LOSS], stats[COUNT], stats[CORRECT] = loss_sum, len(x), correct
            stats[STOP] = 1 if stop.signum else 0
            t1 = time.perf_counter()
            comm.allreduce_(comm_buf)
            t2 = time.perf_counter()
            t_compute += t1 - t0
            t_allreduce += t2 - t1

            global_n = int(stats[COUNT])  # samples in this global batch, over all ranks
            batch_loss = float(stats[LOSS]) / global_n
            if not math.isfinite(batch_loss):
                kept = f"; the last good checkpoint is step {last_checkpoint}" \
                    if last_checkpoint is not None else ""
                raise DivergedError(
                    f"loss became {batch_loss} at step {step + 1} (epoch {step // spe + 1}); "
                    f"lower --lr or check the data{kept}")
            interval += (float(stats[LOSS]), float(stats[CORRECT]), global_n)
            stop_requested = stats[STOP] > 0
            opt.step_(params, grad_flat, global_n)
            step += 1
            samples += global_n

            if cfg.eval_every and setup.val is not None and step % cfg.eval_every == 0:
                te = time.perf_counter()
                val_loss, val_acc = evaluate(setup.val, params_views)
                t_eval += time.perf_counter() - te
            if step % log_every == 0 or step == total:
                elapsed = time.perf_counter() - t_loop - t_eval
                line = (f"step {step}/{total} epoch {step // spe + (step % spe > 0)} "
                        f"loss {interval[0] / interval[2] + opt.l2_penalty(params):.4f}")
                if cfg.loss == "cross-entropy":
                    line += f" acc {interval[1] / interval[2]:.3f}"
                if val_loss is not None:
                    line += f" val_loss {val_loss:.4f}" + (
                        f" val_acc {val_acc:.3f}" if val_acc is not None else "")
                line += f" samples/s {samples / max(elapsed, 1e-9):,.0f}"
                if log.has_bar:
                    log.bar.set_postfix_str(line.split(" ", 2)[2], refresh=False)
                else:
                    log.info(line)
                interval[:] = 0
            log.advance()
            if cfg.checkpoint_dir and step % cfg.checkpoint_every == 0:
                # params are identical on every rank, so every rank takes this branch alike
                if not np.isfinite(params).all():
                    raise DivergedError(f"parameters became NaN/Inf at step {step}; lower --lr")
                write_checkpoint(step)
            if stop_requested:
                break
    finally:
        log.close_progress()
    t_loop_end = time.perf_counter()
    train_seconds = t_loop_end - t_loop - t_eval
    interrupted = step < total
    if interrupted:  # the signal may have reached one rank only: agree on which it was
        signum = np.array([stop.signum], dtype=np.int64)
        comm.allreduce_(signum, op="max")
        stop.signum = int(signum[0])
    write_checkpoint(step)
    if interrupted:
        signame = signal.Signals(stop.signum).name
        where = (f"checkpoint in {cfg.checkpoint_dir}; run the same command to resume"
                 if cfg.checkpoint_dir else "no --checkpoint-dir was given, so progress is not saved")
        log.info(f"interrupted by {signame} after step {step}/{total}: {where}")

    final_loss = train_acc = None
    if not interrupted:  # a stopped job exits promptly: no final pass over the data
        final_loss, train_acc = evaluate(setup.train, params_views)
        final_loss += opt.l2_penalty(params)
        if setup.val is not None:
            val_loss, val_acc = evaluate(setup.val, params_views)
        if rank == 0 and cfg.output:
            ckpt.save_model(cfg.output, layout, params, model_config(setup))
            log.info(f"model written to {cfg.output}")

    return {
        "steps": step,
        "total_steps": total,
        "epochs": step / spe,
        "world_size": world,
        "final_loss": final_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": train_seconds,
        "compute_seconds": t_compute,
        "allreduce_seconds": t_allreduce,
        "allreduce_fraction": t_allreduce / train_seconds if train_seconds > 0 else None,
        "resumed_from_step": start_step,
        "interrupted": interrupted,
        "signal": stop.signum or None,
        "layers": list(layout.layers),
        "parameters": P,
        "dtype": cfg.dtype,
    }, params


def summary_text(s: dict) -> str:
    if s["interrupted"]:
        return (f"stopped: {s['steps']}/{s['total_steps']} steps on {s['world_size']} "
                f"rank{'s' * (s['world_size'] > 1)}, {_fmt(s['samples_per_second'], ',.0f')} samples/s")
    acc = "" if s["train_accuracy"] is None else f" accuracy {s['train_accuracy']:.4f}"
    val = ""
    if s["val_loss"] is not None:
        val = f", val loss {s['val_loss']:.4f}" + (
            "" if s["val_accuracy"] is None else f" accuracy {s['val_accuracy']:.4f}")
    sps = s["samples_per_second"]
    return (f"done: {s['steps']} steps on {s['world_size']} rank{'s' * (s['world_size'] > 1)}, "
            f"loss {s['final_loss']:.4f}{acc}{val}, "
            f"{_fmt(sps, ',.0f')} samples/s, allreduce {_fmt(s['allreduce_fraction'], '.1%')} "
            f"of step time, wall {s['wall_seconds']:.2f} s")


