"""The recorded state of a run: what the training loop and the coordinator tell the
monitor, kept as plain numbers. Recording a step is a few additions under a lock;
every view of it (metrics, /status, /api/history) is built from it when read.
"""
from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

WINDOW_SECONDS = 1.0        # a history point (and the loss gauges) every second of training
MAX_POINTS = 4000           # history kept for the dashboard; older points are thinned
MAX_DEPARTED = 32           # workers that left, still listed by /status
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
# why the ZeroMQ coordinator dropped a message (ddp_rejected_messages_total{reason})
REJECT_REASONS = ("malformed", "other job", "unknown worker", "unexpected", "stale", "duplicate",
                  "invalid result", "non-finite gradients", "ignored peer")
STATES = ("starting", "waiting-for-workers", "training", "evaluating", "checkpointing", "done",
          "interrupted", "failed")
RUNNING = ("training", "evaluating", "checkpointing")


def finite(x) -> float | None:
    """A float for JSON: None for missing or non-finite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(total: str, count: str) -> property:
    """A read-only attribute: the sum `total` per `count`, None while the count is 0."""
    def get(self) -> float | None:
        n = getattr(self, count)
        return getattr(self, total) / n if n else None
    return property(get, doc=f"{total} / {count} (None while {count} is 0)")


class StepTotals:
    """Sums over a run of training steps: samples, loss, correct predictions and the
    seconds each step spent in all, computing and exchanging gradients.

    One instance per interval (the last log line, the last second): `add` each step,
    read the means, then `reset` (or start a fresh instance) for the next interval.

    Attributes
    ----------
    steps : int
        Steps added.
    n : int
        Samples in those steps (the global batch sizes summed).
    loss_sum, correct : float
        The summed per-sample loss (data term) and the count of correct predictions.
    t_step, t_compute, t_exchange : float
        Seconds summed over the steps: the whole step, its forward and backward
        pass, its gradient exchange.
    mean_loss, accuracy : float or None
        Per sample: ``loss_sum / n``, ``correct / n`` (None before any sample).
    step_seconds, compute_seconds, exchange_seconds : float or None
        Per step: ``t_step / steps`` and so on (None before any step).
    """

    __slots__ = ("steps", "n", "loss_sum", "correct", "t_step", "t_compute", "t_exchange")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Back to no steps."""
        self.steps = self.n = 0
        self.loss_sum = self.correct = 0.0
        self.t_step = self.t_compute = self.t_exchange = 0.0

    def add(self, n: int, loss_sum: float, correct: float, t_step: float, t_compute: float,
            t_exchange: float) -> None:
        """Count one step of `n` samples.

        Parameters
        ----------
        n : int
            Samples in the step.
        loss_sum, correct : float
            The step's summed loss and correct count over those samples.
        t_step, t_compute, t_exchange : float
            The step's seconds: in all, computing, exchanging.
        """
        self.steps += 1
        self.n += n
        self.loss_sum += loss_sum
        self.correct += correct
        self.t_step += t_step
        self.t_compute += t_compute
        self.t_exchange += t_exchange

    mean_loss = _mean("loss_sum", "n")
    accuracy = _mean("correct", "n")
    step_seconds = _mean("t_step", "steps")
    compute_seconds = _mean("t_compute", "steps")
    exchange_seconds = _mean("t_exchange", "steps")


class Window(StepTotals):
    """The steps of one second of training, from `start` to `end` (monotonic seconds;
    `end` is None while it is open)."""

    __slots__ = ("start", "end")

    def __init__(self, start: float):
        super().__init__()
        self.start, self.end = start, None

    def due(self, now: float) -> bool:
        return now - self.start >= WINDOW_SECONDS

    @property
    def samples_per_second(self) -> float:
        return self.n / max(self.end - self.start, 1e-9)


class Histogram:
    """Bucket counts of observed durations (cumulated only when scraped), at the upper
    `bounds` of the buckets (ascending, the last one infinite)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.total += v

    def cumulative(self) -> tuple[list[int], float]:
        """(count at or below each bucket's bound, sum of the observations)."""
        return list(itertools.accumulate(self.counts)), self.total


class History:
    """The dashboard's points: one per closed window (`train`), one per evaluation
    (`val`), numbered in one sequence so a poll asks only for what is new. Guarded by
    the RunState's lock."""

    def __init__(self):
        self._seq = itertools.count(1)
        self.last_seq = 0
        self.train: list[dict] = []
        self.val: list[dict] = []

    def add(self, points: list[dict], fields: dict) -> None:
        self.last_seq = next(self._seq)
        points.append({"seq": self.last_seq, "t": time.time(), **fields})
        if len(points) > MAX_POINTS:  # halve the older half: the whole run stays, coarser
            half = MAX_POINTS // 2
            points[:half] = points[:half:2]

    def since(self, after: int) -> dict:
        return {"seq": self.last_seq,
                "train": [p for p in self.train if p["seq"] > after],
                "val": [p for p in self.val if p["seq"] > after]}


@dataclass
class WorkerInfo:
    name: str
    last_step: int = 0
    compute_seconds: float | None = None
    reported: float = 0.0          # monotonic time of the last report
    state: str = "active"          # active, left, lost


class Workers:
    """The ranks or workers computing shards, and what the coordinator counts about
    them: joins, failures, shard timeouts, messages rejected by reason."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0     # ranks (MPI) or connected workers (ZeroMQ); one thread writes
        self.active: dict[str, WorkerInfo] = {}
        self.departed: deque[WorkerInfo] = deque(maxlen=MAX_DEPARTED)
        self.rejected: Counter = Counter({r: 0 for r in REJECT_REASONS})
        self.joins = self.failures = self.shard_timeouts = 0

    def report(self, name: str, step: int, compute_seconds: float | None) -> None:
        with self.lock:
            info = self.active.get(name)
            if info is None:
                info = self.active[name] = WorkerInfo(name)
            info.last_step, info.reported = step, time.monotonic()
            if compute_seconds is not None:
                info.compute_seconds = compute_seconds

    def joined(self, name: str, step: int) -> None:
        with self.lock:
            self.joins += 1
            self.active[name] = WorkerInfo(name, last_step=step, reported=time.monotonic())

    def left(self, name: str, lost: bool) -> None:
        with self.lock:
            info = self.active.pop(name, None)
            if lost:
                self.failures += 1
            if info is not None:
                info.state = "lost" if lost else "left"
                self.departed.append(info)

    def listing(self, departed: bool = True) -> list[WorkerInfo]:
        """Copies of the active workers, then (with `departed`) those that left, newest
        first."""
        with self.lock:
            gone = reversed(self.departed) if departed else ()
            return [WorkerInfo(**vars(w)) for w in itertools.chain(self.active.values(), gone)]


class RunState:
    """What a run has done so far: its progress, the last second's means, the last
    evaluation and checkpoint, the histograms of step times, the history points and
    the workers. Written by the training loop, read by the views under `lock`."""

    def __init__(self, *, backend: str, total_steps: int, layers, parameters: int, lr: float,
                 classify: bool):
        self.lock = threading.Lock()
        self.backend, self.total_steps, self.layers = backend, total_steps, list(layers)
        self.parameters, self.lr, self.classify = parameters, lr, classify
        self.started = time.time()
        self.state = "starting"
        self.last_progress = time.monotonic()
        self.step, self.epoch, self.steps_per_epoch = 0, 0.0, 1
        self.totals = StepTotals()                # every step this process applied
        self.hist = {"step": Histogram(), "compute": Histogram(), "exchange": Histogram()}
        self.window = Window(time.monotonic())    # the second being summed
        self.last_window: Window | None = None    # the last closed one: the loss gauges
        self.grad_norm = None                     # set by the loop when a window is due
        self.val_loss = self.val_accuracy = None
        self.checkpoint_step = self.checkpoint_time = None
        self.history = History()
        self.workers = Workers()

    def set_state(self, state: str) -> None:
        with self.lock:
            if state != self.state:
                self.state = state
                self.last_progress = time.monotonic()

    def start(self, step: int, steps_per_epoch: int, n_workers: int) -> None:
        with self.lock:
            self.step = step
            self.steps_per_epoch = max(steps_per_epoch, 1)
            self.epoch = step / self.steps_per_epoch
            self.workers.count = n_workers
            self.window = Window(time.monotonic())
        self.set_state("training")

    def window_due(self) -> bool:
        """Whether the step being applied closes the current window (the caller then
        measures what is too dear to measure every step, such as the gradient norm)."""
        return self.grad_norm is None or self.window.due(time.monotonic())

    def step_done(self, step: int, n: int, loss_sum: float, correct: float,
                  t_step: float, t_compute: float, t_exchange: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.step, self.epoch = step, step / self.steps_per_epoch
            self.last_progress = now
            self.totals.add(n, loss_sum, correct, t_step, t_compute, t_exchange)
            self.window.add(n, loss_sum, correct, t_step, t_compute, t_exchange)
            self.hist["step"].observe(t_step)
            self.hist["compute"].observe(t_compute)
            self.hist["exchange"].observe(t_exchange)
            if self.window.due(now) or step >= self.total_steps or self.last_window is None:
                self._close_window(now)

    def _close_window(self, now: float) -> None:
        w = self.window
        w.end = now
        self.last_window, self.window = w, Window(now)
        self.history.add(self.history.train, {
            "step": self.step, "epoch": self.epoch, "loss": finite(w.mean_loss),
            "accuracy": finite(self.train_accuracy), "samples_per_second": w.samples_per_second,
            "step_seconds": w.step_seconds, "compute_seconds": w.compute_seconds,
            "exchange_seconds": w.exchange_seconds})

    @property
    def train_loss(self) -> float | None:
        """Mean loss over the last closed window."""
        return self.last_window.mean_loss if self.last_window else None

    @property
    def train_accuracy(self) -> float | None:
        """Accuracy over the last closed window (classification only)."""
        return self.last_window.accuracy if self.last_window and self.classify else None

    @property
    def samples_per_second(self) -> float | None:
        return self.last_window.samples_per_second if self.last_window else None

    def evaluated(self, step: int, val_loss: float, val_accuracy: float | None) -> None:
        with self.lock:
            self.val_loss, self.val_accuracy = val_loss, val_accuracy
            self.last_progress = time.monotonic()
            self.history.add(self.history.val, {"step": step, "val_loss": finite(val_loss),
                                                "val_accuracy": finite(val_accuracy)})

    def checkpointed(self, step: int) -> None:
        with self.lock:
            self.checkpoint_step, self.checkpoint_time = step, time.time()

    def ended(self, exit_code: int, summary: dict | None) -> str:
        """The run is over: its final state (done, interrupted or failed), recorded."""
        if summary is not None and not summary["interrupted"]:
            state = "done"
            with self.lock:
                self.val_loss, self.val_accuracy = summary["val_loss"], summary["val_accuracy"]
        else:
            state = "interrupted" if exit_code >= 128 else "failed"
        self.set_state(state)
        return state
