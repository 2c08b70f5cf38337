"""The learning rate of each update and the decisions taken at evaluations: a
schedule with warmup (a function of the step and the run's length alone),
ReduceLROnPlateau and early stopping.

The rate of update t (0-based) of T is

    lr_t = base(t) · min(1, (t + 1) / W) · plateau     (no warmup factor when W = 0)
    p    = clamp((t − W) / max(1, T − W), 0, 1)

with base(t) = lr (constant), lr·G^⌊t/K⌋ (step), lr_min + (lr − lr_min)·(1 + cos πp)/2
(cosine) or lr − (lr − lr_min)·p (linear), and `plateau` the product of the factors
that ReduceLROnPlateau applied so far. The evaluations' decisions use the validation
loss summed over every process, so every process decides alike.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import DataError

SCHEDULES = ("constant", "step", "cosine", "linear")
PLATEAU_THRESHOLD = 1e-4  # relative, as torch.optim.lr_scheduler.ReduceLROnPlateau's default
# the defaults of --lr-gamma and --lr-plateau-factor: torch's StepLR and ReduceLROnPlateau's
DEFAULT_GAMMA = DEFAULT_PLATEAU_FACTOR = 0.1


def scheduled_lr(t: int, total: int, lr: float, schedule: str = "constant", warmup: int = 0,
                 lr_min: float = 0.0, step_every: int | None = None, gamma: float = 1.0) -> float:
    """The rate of update `t` (0-based) of `total` under `schedule` (one of SCHEDULES),
    before any plateau factor.

    Parameters
    ----------
    t, total : int
        The update's index and the run's number of updates.
    lr : float
        The base rate.
    schedule : str
        "constant", "step" (× gamma every `step_every` updates), "cosine" or "linear"
        (from lr down to `lr_min` over the updates after warmup).
    warmup : int
        Updates whose rate rises linearly to the schedule's: the factor (t + 1) / warmup.
    """
    if schedule == "step":
        base = lr * gamma ** (t // step_every)
    elif schedule in ("cosine", "linear"):
        p = min(max((t - warmup) / max(1, total - warmup), 0.0), 1.0)
        base = (lr_min + (lr - lr_min) * (1 + math.cos(math.pi * p)) / 2 if schedule == "cosine"
                else lr - (lr - lr_min) * p)
    else:
        base = lr
    return base * min(1.0, (t + 1) / warmup) if warmup else base


class Plateau:
    """ReduceLROnPlateau (mode min, relative threshold 1e-4, no cooldown): the rate is
    multiplied by `factor` when the loss has not improved for more than `patience`
    evaluations in a row.

    Parameters
    ----------
    patience : int
        Evaluations without improvement that are tolerated.
    factor : float
        In (0, 1): what the rate is multiplied by at each reduction.
    """

    def __init__(self, patience: int, factor: float):
        self.patience, self.factor = patience, factor
        self.best = math.inf
        self.bad = 0       # evaluations since the last improvement
        self.scale = 1.0   # the product of the reductions so far

    def observe(self, loss: float) -> bool:
        """Take an evaluation's loss; whether the rate was reduced."""
        if loss < self.best * (1 - PLATEAU_THRESHOLD):
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        if self.bad <= self.patience:
            return False
        self.scale *= self.factor
        self.bad = 0
        return True

    def state(self) -> list[float]:
        return [self.best, float(self.bad), self.scale]

    def load(self, values) -> None:
        self.best, self.bad, self.scale = float(values[0]), int(values[1]), float(values[2])


class EarlyStopping:
    """Stop after `patience` evaluations in a row without a loss lower than the best by
    more than `min_delta`; keep a copy of the parameters at the best evaluation.

    Parameters
    ----------
    patience : int
        Evaluations without improvement after which training stops.
    min_delta : float
        The least decrease of the loss that counts as an improvement.
    params : ndarray
        The run's parameters: `best` is a buffer like them, filled at each improvement.
    """

    def __init__(self, patience: int, min_delta: float, params: np.ndarray):
        self.patience, self.min_delta = patience, min_delta
        self.best = np.empty_like(params)
        self.best_loss = math.inf
        self.best_step = -1  # none yet
        self.bad = 0
        self.stopped = False

    def observe(self, step: int, loss: float, params: np.ndarray) -> None:
        """Take the loss of the evaluation after `step` updates, at `params`."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad = loss, step, 0
            self.best[...] = params
        else:
            self.bad += 1
            self.stopped = self.bad >= self.patience

    @property
    def has_best(self) -> bool:
        return self.best_step >= 0

    def state(self) -> list[float]:
        return [self.best_loss, float(self.best_step), float(self.bad), float(self.stopped)]

    def load(self, values) -> None:
        self.best_loss, self.best_step = float(values[0]), int(values[1])
        self.bad, self.stopped = int(values[2]), bool(values[3])


class RateControl:
    """The rate of each update and what the evaluations decide, for one run of
    `total` updates under the config `cfg`."""

    def __init__(self, cfg, total: int, params: np.ndarray):
        self.cfg, self.total = cfg, total
        self.last = cfg.lr  # the rate of the last update
        self.gamma = _or(cfg.lr_gamma, DEFAULT_GAMMA)
        self.plateau = (Plateau(cfg.lr_plateau_patience, _or(cfg.lr_plateau_factor,
                                                             DEFAULT_PLATEAU_FACTOR))
                        if cfg.lr_plateau_patience else None)
        self.early = (EarlyStopping(cfg.early_stopping, _or(cfg.min_delta, 0.0), params)
                      if cfg.early_stopping else None)

    def lr(self, t: int) -> float:
        """The rate of update `t` (0-based); the summary reports the last one asked for."""
        cfg = self.cfg
        rate = scheduled_lr(t, self.total, cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.lr_min,
                            cfg.lr_step_every, self.gamma)
        self.last = rate * self.plateau.scale if self.plateau is not None else rate
        return self.last

    def evaluated(self, step: int, val_loss: float, params: np.ndarray) -> None:
        """The validation loss after `step` updates (the same on every process)."""
        if self.plateau is not None:
            self.plateau.observe(val_loss)
        if self.early is not None:
            self.early.observe(step, val_loss, params)

    @property
    def stopped(self) -> bool:
        return self.early is not None and self.early.stopped

    def final_params(self, params: np.ndarray) -> np.ndarray:
        """What the run's model is: the best evaluation's parameters under early stopping
        (once an evaluation has been made), else `params`."""
        return self.early.best if self.early is not None and self.early.has_best else params

    def kept_line(self, step: int) -> str:
        """The log line saying which parameters the model holds under early stopping."""
        e = self.early
        why = (f"stopped early after step {step}: {e.bad} evaluations without an improvement"
               if e.stopped else f"{step} steps done")
        return f"{why}; the model is step {e.best_step}'s, the best (val loss {e.best_loss:.6g})"

    def summary(self) -> dict:
        """The summary's account: the rate of the last update, and early stopping's."""
        e = self.early
        if e is None:
            return {"lr": self.last}
        return {"lr": self.last, "stopped_early": e.stopped, "best_step": e.best_step if e.has_best else None,
                "best_val_loss": e.best_loss if e.has_best else None}

    # --- checkpoints and resume ----------------------------------------------------

    def meta(self) -> dict:
        """The counters, as a checkpoint's meta holds them (inf as None: JSON)."""
        out = {}
        if self.plateau is not None:
            out["lr_plateau"] = _json_floats(self.plateau.state())
        if self.early is not None:
            out["early_stopping"] = _json_floats(self.early.state())
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The checkpoint's extra arrays: the best parameters under early stopping."""
        return {"best_params": self.early.best} if self.early is not None else {}

    def restore(self, meta: dict, arrays: dict[str, np.ndarray], where: str = "checkpoint") -> None:
        """The state of a checkpoint's `meta` and extra `arrays` (written by a run of
        the same config; what it lacks keeps its initial value). DataError naming
        `where` if that state is malformed."""
        try:
            if self.plateau is not None and "lr_plateau" in meta:
                self.plateau.load(_floats(meta["lr_plateau"], 3))
            if self.early is not None and "early_stopping" in meta:
                self.early.load(_floats(meta["early_stopping"], 4))
                best = arrays.get("best_params")
                if best is not None and best.shape == self.early.best.shape:
                    self.early.best[...] = best
        except (TypeError, ValueError, OverflowError) as e:
            raise DataError(f"{where}: its schedule or early-stopping state is malformed ({e}); "
                            f"use --no-resume to start over")

    def share_(self, sum_, root: bool) -> None:
        """The root's state on every process through `sum_` (an in-place sum over the
        processes): the others contribute zeros, so the sum is exactly the root's
        (inf + 0 is inf)."""
        parts = [p for p in (self.plateau, self.early) if p is not None]
        if not parts:
            return
        values = np.array([v for p in parts for v in p.state()], dtype=np.float64)
        buffers = [values] + ([self.early.best] if self.early is not None else [])
        for buf in buffers:
            if not root:
                buf[:] = 0
            sum_(buf)
        for p in parts:
            k = len(p.state())
            p.load(values[:k])
            values = values[k:]


def _json_floats(values: list[float]) -> list[float | None]:
    return [None if math.isinf(v) else v for v in values]


def _floats(values, n: int) -> list[float]:
    """`n` numbers from a checkpoint's JSON list (None: inf)."""
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"expected a list of {n} numbers, got {str(values)[:40]}")
    return [math.inf if v is None else float(v) for v in values]


def _or(value, default):
    return default if value is None else value
