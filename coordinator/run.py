"""One run's bookkeeping, the same under MPI and ZeroMQ: the parameters and the
optimizer, each step's update (through the exchange), the log line, evaluation,
checkpoints and the summary.

The MPI loop and the ZeroMQ coordinator differ only in how a step's gradient sums
come together; each then calls `Run.update_(loss_sum, correct, n, ...)`, and the
run asks its exchange to move the parameters.
"""
from __future__ import annotations

import math
import signal
import time

import numpy as np

from ddp import checkpoint as ckpt
from ddp import data as ddata
from ddp.errors import DivergedError
from ddp.log import Log, human_bytes
from ddp.monitor import Monitor, StepTotals
from ddp.optim import make_optimizer
from ddp.schedule import RateControl
from ddp.setup import Setup
from ddp.signals import StopRequest
from ddp.worker.compute import ShardCompute

from .start import load_start


def model_config(setup: Setup) -> dict:
    cfg = setup.cfg
    out = {"layers": list(cfg.layers), "activation": cfg.activation, "loss": cfg.loss,
           "bias": cfg.bias, "dtype": cfg.dtype, "standardize": None, "training": cfg.to_dict()}
    if setup.mean is not None:
        out["standardize"] = {"mean": setup.mean.tolist(), "std": setup.std.tolist()}
    return out


class Evaluator:
    """Data-parallel evaluation: each process takes a contiguous shard of the set and
    the exchange sums the shards' loss and counts."""

    def __init__(self, setup: Setup, compute: ShardCompute, exchange):
        self.setup, self.compute, self.exchange = setup, compute, exchange
        self.sums = np.zeros(4, dtype=np.float64)  # loss sum, correct, count, weight sum
        self.dtype = np.dtype(setup.cfg.dtype)

    def __call__(self, dataset: ddata.Dataset, params_views) -> tuple[float, float | None]:
        """(mean loss, weighted by the set's w if it has one; accuracy, unweighted, or
        None for mse) over the whole dataset."""
        rows = self.compute.max_rows
        reader = ddata.BatchReader(dataset, self.setup.schedule, rows, self.dtype,
                                   self.setup.mean, self.setup.std)
        lo, hi = ddata.shard_bounds(len(dataset), self.exchange.world_size, self.exchange.rank)
        self.sums[:] = 0
        for start in range(lo, hi, rows):
            positions = slice(start, min(start + rows, hi))
            x, y = reader.rows(positions)
            w = reader.weights(positions)
            loss_sum, correct = self.compute.eval_sums(params_views, x, y, w)
            self.sums += (loss_sum, correct, len(x), len(x) if w is None else w.sum())
        self.exchange.sum_(self.sums)
        loss_sum, correct, count, weight_sum = self.sums
        accuracy = correct / count if self.setup.cfg.loss == "cross-entropy" else None
        return loss_sum / weight_sum, accuracy


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def log_line(step: int, total: int, epoch: int, loss: float, accuracy: float | None,
             val_loss: float | None, val_acc: float | None, samples_per_second: float) -> str:
    line = f"step {step}/{total} epoch {epoch} loss {loss:.4f}"
    if accuracy is not None:
        line += f" acc {accuracy:.3f}"
    if val_loss is not None:
        line += f" val_loss {val_loss:.4f}" + (f" val_acc {val_acc:.3f}" if val_acc is not None else "")
    return line + f" samples/s {samples_per_second:,.0f}"


def stopped_line(signum: int, step: int, total: int, checkpoint_dir: str | None) -> str:
    where = (f"checkpoint in {checkpoint_dir}; run the same command to resume"
             if checkpoint_dir else "no --checkpoint-dir was given, so progress is not saved")
    return f"interrupted by {signal.Signals(signum).name} after step {step}/{total}: {where}"


def per_weight(weighted: bool, loss_sum: float, n_samples: int, weight_sum: float | None):
    """(what a step's gradient sum is divided by, its loss sum per row): the rows and the
    loss sum, or with weighted data the weights' sum and loss_sum·n/Σw, so that the log
    and the metrics, which divide by the rows, show the weighted mean. A batch whose
    weights are all 0 has zero sums: divided by 1, it moves by its L2 term only."""
    if not weighted or weight_sum is None:
        return n_samples, loss_sum
    divisor = weight_sum if weight_sum > 0 else 1.0
    return divisor, loss_sum * n_samples / divisor


class SteadyRate:
    """The rate after a run's first steps (BLAS and caches warm), for benchmarks:
    steps, seconds and samples/s from `from_step` on, evaluation time excluded."""

    def __init__(self, start: int, total: int):
        self.from_step = start + min(20, (total - start) // 5)
        self.marked = None  # (perf_counter, evaluation s, samples) at from_step

    def mark(self, t_eval: float, samples: int) -> None:
        self.marked = (time.perf_counter(), t_eval, samples)

    def result(self, step: int, t_eval: float, samples: int) -> dict | None:
        if self.marked is None or step <= self.from_step:
            return None
        t0, t_eval0, samples0 = self.marked
        seconds = time.perf_counter() - t0 - (t_eval - t_eval0)
        return {"from_step": self.from_step, "steps": step - self.from_step,
                "seconds": seconds, "samples_per_second": (samples - samples0) / seconds}


class Run:
    """What both backends do around the summed gradients: hold the parameters and the
    optimizer, have the exchange apply each step's update, log, evaluate, checkpoint,
    summarize.

    Parameters
    ----------
    setup : Setup
        The run's config, data, model layout and schedule.
    log : Log
        Where the run's lines go (only the root's speak).
    exchange
        How the step's sums meet and the parameters move (`coordinator.exchange`);
        its `params` are the run's parameters.
    evaluate : Evaluator
        Mean loss and accuracy of a dataset at the current parameters.
    monitor : Monitor, optional
        The metrics, on the root only.
    """

    def __init__(self, setup: Setup, log: Log, exchange, evaluate: Evaluator,
                 monitor: Monitor | None = None):
        cfg, layout = setup.cfg, setup.layout
        self.setup, self.cfg, self.layout, self.log, self.evaluate = setup, cfg, layout, log, evaluate
        self.exchange, self.monitor = exchange, monitor
        self.rank, self.world_size = exchange.rank, exchange.world_size
        self.opt = make_optimizer(cfg, layout, exchange.optimizer_state)
        self.params = exchange.params
        self.params_views = layout.views(self.params)
        self.control = RateControl(cfg, setup.total_steps, self.params)  # lr, plateau, early stop
        self.series = ckpt.Series(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.total = setup.total_steps
        self.spe = setup.schedule.steps_per_epoch
        self.last_checkpoint = None
        self.interval = StepTotals()  # since the last log line
        self.samples = 0
        self.val_loss = self.val_acc = None
        self.t_eval = 0.0
        self.t_loop = None
        self.begin(0)

    def load_start(self) -> int:
        """The root: parameters and optimizer state from a checkpoint, --init or the
        seed (then shared by the exchange); the step to start from."""
        return load_start(self.setup, self.log, self.params, self.opt, self.series,
                          lambda found: self.control.restore(found.meta, found.extra, found.path))

    def begin(self, step: int) -> None:
        """Train from `step` on."""
        self.step = self.start_step = step
        self.log_every = self.cfg.log_every or max(1, (self.total - step) // 20)
        self.steady = SteadyRate(step, self.total)
        if step and self.world_size > 1:  # resumed: only the root read the checkpoint
            self.control.share_(self.exchange.sum_, self.rank == 0)

    @property
    def done(self) -> bool:
        return self.step >= self.total or self.control.stopped

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

    def update_(self, loss_sum: float, correct: float, n_samples: int, started: float,
                t_compute: float, t_exchange: float, weight_sum: float | None = None) -> None:
        """One step from the global batch's sums (`weight_sum`: Σ wᵢ of weighted data): the
        exchange moves the parameters; then the log line, evaluation and checkpoint due.
        `started` is the step's perf_counter start; the others, compute and exchange seconds."""
        divisor, loss_sum = per_weight(self.setup.train.w is not None, loss_sum, n_samples, weight_sum)
        self.check_loss(loss_sum, n_samples)
        monitor = self.monitor
        self.opt.lr = self.control.lr(self.step)
        if monitor is not None:
            monitor.lr = self.opt.lr
        norm = self.exchange.apply_(self.opt, divisor,
                                    monitor.window_due if monitor is not None else None)
        if norm is not None and monitor is not None:  # measured when the metrics want it
            monitor.grad_norm = norm / divisor
        self.step += 1
        self.samples += n_samples
        step, cfg = self.step, self.cfg
        if step == self.steady.from_step:
            self.steady.mark(self.t_eval, self.samples)
        t_step = time.perf_counter() - started
        self.interval.add(n_samples, loss_sum, correct, t_step, t_compute, t_exchange)
        if monitor is not None:
            monitor.step_done(step, n_samples, loss_sum, correct, t_step, t_compute, t_exchange)
        if cfg.eval_every and self.setup.val is not None and step % cfg.eval_every == 0:
            te = time.perf_counter()
            self._set_state("evaluating")
            self.val_loss, self.val_acc = self.evaluate(self.setup.val, self.params_views)
            self.control.evaluated(step, self.val_loss, self.params)  # plateau, early stopping
            if monitor is not None:
                monitor.evaluated(step, self.val_loss, self.val_acc)
                monitor.set_state("training")
            self.t_eval += time.perf_counter() - te
        if step % self.log_every == 0 or self.done:
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
        totals = self.interval
        loss = totals.mean_loss + self.opt.l2_penalty(self.params)
        accuracy = totals.accuracy if self.cfg.loss == "cross-entropy" else None
        samples_per_second = self.samples / max(self.train_seconds(), 1e-9)
        epoch = self.step // self.spe + (self.step % self.spe > 0)
        line = log_line(self.step, self.total, epoch, loss, accuracy, self.val_loss, self.val_acc,
                        samples_per_second)
        if self.log.has_bar:
            self.log.bar.set_postfix_str(line.split(" ", 2)[2], refresh=False)
        else:
            self.log.info(line)
        if self.monitor is not None:
            self.monitor.event("step", step=self.step, epoch=self.step / self.spe, loss=loss,
                               accuracy=accuracy, val_loss=self.val_loss, val_accuracy=self.val_acc,
                               samples_per_second=samples_per_second, lr=self.opt.lr,
                               step_seconds=totals.step_seconds,
                               compute_seconds=totals.compute_seconds,
                               exchange_seconds=totals.exchange_seconds)
        totals.reset()

    def meta(self) -> dict:
        epoch, k = divmod(self.step, self.spe)
        return {"epoch": epoch, "batch_in_epoch": k, "world_size": self.world_size,
                "config": self.cfg.to_dict(), "data_fingerprint": self.setup.fingerprint(),
                **self.control.meta()}

    def write_checkpoint(self) -> None:
        if self.rank == 0 and self.cfg.checkpoint_dir and self.step != self.last_checkpoint:
            self.last_checkpoint = self.step
            self._set_state("checkpointing")
            path = self.series.save(self.step, self.params, self.opt.state, self.meta(),
                                    self.opt.describe(), self.control.arrays())
            self.log.info(f"checkpoint {path}")
            if self.monitor is not None:
                self.monitor.checkpointed(self.step, path)
                self.monitor.set_state("training")

    def finish(self, stop: StopRequest, extra: dict | None = None) -> dict:
        """Checkpoint; unless interrupted, evaluate and write the model; the summary."""
        self.log.close_progress()
        train_seconds = self.train_seconds()
        steady = self.steady.result(self.step, self.t_eval, self.samples)
        cfg, step, total = self.cfg, self.step, self.total
        interrupted = not self.done
        self.write_checkpoint()
        if interrupted:
            self.log.info(stopped_line(stop.signum, step, total, cfg.checkpoint_dir))
        final_loss = train_acc = None
        if not interrupted:  # a stopped job exits promptly: no final pass over the data
            final_loss, train_acc = final_pass(self, stop)
        return {
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
            **self.control.summary(),
            **(extra or {}),
        }


def final_pass(run: Run, stop: StopRequest) -> tuple[float, float | None]:
    """A complete run's end: the model (the best parameters under early stopping)
    evaluated on the training and validation data and written; (loss, accuracy) on
    the training data. A signal that arrives meanwhile is only reported (`stop`)."""
    cfg, log = run.cfg, run.log
    if run.monitor is not None:
        run.monitor.set_state("evaluating")
    params = run.control.final_params(run.params)
    if params is not run.params:
        log.info(run.control.kept_line(run.step))
    views = run.layout.views(params)
    final_loss, train_acc = run.evaluate(run.setup.train, views)
    final_loss += run.opt.l2_penalty(params)
    if run.setup.val is not None:
        run.val_loss, run.val_acc = run.evaluate(run.setup.val, views)
    if run.rank == 0 and cfg.output:
        ckpt.save_model(cfg.output, run.layout, params, model_config(run.setup))
        log.info(f"model written to {cfg.output}")
    if stop.signum:  # the run was complete: nothing to resume, so it exits 0
        log.info(f"{signal.Signals(stop.signum).name} arrived after the last step: the run finished "
                 f"its evaluation{' and model' * bool(cfg.output)} and exits 0")
    return final_loss, train_acc


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
    if s.get("stopped_early"):
        val += f", stopped early (the model is step {s['best_step']}'s)"
    if s.get("backend") == "zmq":
        exchange = f"{human_bytes(s['bytes_per_step'])} sent+received per step"
    else:
        exchange = f"exchange {_fmt(s['allreduce_fraction'], '.1%')} of step time"
    return (f"done: {s['steps']} steps on {_who(s)}, loss {s['final_loss']:.4f}{acc}{val}, "
            f"{_fmt(s['samples_per_second'], ',.0f')} samples/s, {exchange}, "
            f"wall {s['wall_seconds']:.2f} s")
