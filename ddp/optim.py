"""Optimizers: in place on one flat parameter buffer, or on a part [lo, hi) of it.

An optimizer never knows how the gradient was summed: the exchange hands it the
sum of per-sample gradients over the global batch (or the part [lo, hi) of that
sum it owns) and the sample count, and it moves the same part of the parameters.
Its state is `slots` arrays shaped like the parameters, `state[k]`, held where the
exchange puts them (one shared copy on a host under the shared window), so that
a part [lo, hi) of the state goes with the same part of the parameters.

A step is two stages, so that the exchange can clip in between (the norm of the
averaged gradient is global: it needs every part):

    mean_grad_   g ← Σg / n + λ·W          (the gradient of the mean loss, L2 included)
    update_      the optimizer's rule with g; counts the step t

`step_` does both. Each stage is a few in-place numpy passes over the part, the
gradient buffer serving as scratch: nothing is allocated per step. `lr` is read at
every update, so a schedule may change it between steps.
"""
from __future__ import annotations

import math

import numpy as np

from .model import Layout

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_: scale by C / (‖g‖ + 1e-6)
# torch.optim's defaults for Adam and AdamW
ADAM_BETAS, ADAM_EPS, ADAMW_WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01


class Optimizer:
    """What every optimizer shares: its state arrays, the step count, L2 on the weights.

    Parameters
    ----------
    layout : Layout
        Where each layer's weights and biases lie in the flat buffer.
    dtype : numpy dtype
        Of the parameters (and so of the state).
    lr, l2 : float
        Learning rate, L2 coefficient λ (a loss term: it enters the gradient).
    state : ndarray of shape (slots, layout.size), optional
        Where the state lives (zeros); allocated here if not given.
    clip_norm : float, optional
        Scale the averaged gradient to at most this global norm (applied by the exchange).
    """

    kind = ""
    slot_names: tuple[str, ...] = ()  # one per state array, as the checkpoint names them
    slots = 0                         # len(slot_names)

    def __init__(self, layout: Layout, dtype, lr: float, l2: float = 0.0,
                 state: np.ndarray | None = None, clip_norm: float | None = None):
        self.lr, self.l2, self.clip_norm = lr, l2, clip_norm
        self.t = 0  # updates applied by this optimizer (Adam's bias correction needs it)
        self.state = np.zeros((self.slots, layout.size), dtype=dtype) if state is None else state
        # L2 and decoupled decay apply to the weight matrices only, which are the leading
        # block of each layer's slice; keep (start, stop) ranges instead of a full mask.
        self._weight_ranges = [(off, off + int(np.prod(shape)))
                               for name, off, shape in layout.entries if name.startswith("W")]

    def weight_parts(self, lo: int, hi: int):
        """(a, b): the weight ranges of the parameters that lie within [lo, hi)."""
        for a, b in self._weight_ranges:
            a, b = max(a, lo), min(b, hi)
            if a < b:
                yield a, b

    def l2_penalty(self, params: np.ndarray) -> float:
        """½·λ·Σ‖W‖² over the weight matrices."""
        if not self.l2:
            return 0.0
        return 0.5 * self.l2 * sum(float(np.vdot(params[a:b], params[a:b]))
                                   for a, b in self._weight_ranges)

    def mean_grad_(self, params: np.ndarray, grad_sum: np.ndarray, n_samples: int,
                   lo: int = 0) -> np.ndarray:
        """g = Σg / n + λ·W over the part [lo, lo + len(grad_sum)), in place in `grad_sum`."""
        g = grad_sum
        g *= 1.0 / n_samples
        if self.l2:
            for a, b in self.weight_parts(lo, lo + len(g)):
                g[a - lo:b - lo] += self.l2 * params[a:b]
        return g

    def update_(self, params: np.ndarray, g: np.ndarray, lo: int = 0) -> None:
        """Move params[lo:lo + len(g)] with the averaged gradient `g` (overwritten)."""
        raise NotImplementedError

    def step_(self, params: np.ndarray, grad_sum: np.ndarray, n_samples: int, lo: int = 0) -> None:
        """One update from the *sum* of per-sample gradients over `n_samples` samples.

        `grad_sum` is overwritten (it serves as scratch space). It may cover only
        the part [lo, lo + len(grad_sum)) of the parameters: that part is updated.
        """
        self.update_(params, self.mean_grad_(params, grad_sum, n_samples, lo), lo)

    def describe(self) -> dict:
        """What a checkpoint keeps besides the state arrays: the kind, slot names, t."""
        return {"kind": self.kind, "slots": list(self.slot_names), "t": self.t}


class SGD(Optimizer):
    """SGD with momentum μ, optionally Nesterov's, as torch.optim.SGD (dampening 0).

    v ← μ·v + g;  θ ← θ − lr·v   (Nesterov: θ ← θ − lr·(g + μ·v);  μ = 0: θ ← θ − lr·g).
    Other parameters as `Optimizer`.
    """

    kind = "sgd"
    slot_names = ("velocity",)
    slots = 1

    def __init__(self, layout: Layout, dtype, lr: float, momentum: float = 0.0, l2: float = 0.0,
                 state: np.ndarray | None = None, nesterov: bool = False,
                 clip_norm: float | None = None):
        super().__init__(layout, dtype, lr, l2, state, clip_norm)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity = self.state[0]
        # g + μ·v needs a second buffer besides g; this rank's own, never shared
        self._scratch = np.empty(layout.size, dtype=dtype) if nesterov else None

    def step_(self, params: np.ndarray, grad_sum: np.ndarray, n_samples: int, lo: int = 0) -> None:
        if not self.momentum and not self.l2:
            self.t += 1
            g = grad_sum
            g *= self.lr / n_samples          # fold 1/n into the step: two passes in all
            params[lo:lo + len(g)] -= g
            return
        super().step_(params, grad_sum, n_samples, lo)

    def update_(self, params: np.ndarray, g: np.ndarray, lo: int = 0) -> None:
        self.t += 1
        hi = lo + len(g)
        if self.momentum:
            v = self.velocity[lo:hi]
            v *= self.momentum
            v += g
            if self.nesterov:
                mv = self._scratch[:hi - lo]
                np.multiply(v, self.momentum, out=mv)
                g += mv
                g *= self.lr
            else:
                np.multiply(v, self.lr, out=g)
        else:
            g *= self.lr
        params[lo:hi] -= g


class Adam(Optimizer):
    """Adam as torch.optim.Adam: bias-corrected moments of g and g².

    m ← β₁·m + (1−β₁)·g;  v ← β₂·v + (1−β₂)·g²;
    θ ← θ − lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε).
    Other parameters as `Optimizer`.
    """

    kind = "adam"
    slot_names = ("exp_avg", "exp_avg_sq")
    slots = 2

    def __init__(self, layout: Layout, dtype, lr: float, betas: tuple[float, float] = ADAM_BETAS,
                 eps: float = ADAM_EPS, l2: float = 0.0, state: np.ndarray | None = None,
                 clip_norm: float | None = None):
        super().__init__(layout, dtype, lr, l2, state, clip_norm)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg, self.exp_avg_sq = self.state[0], self.state[1]

    def decay_(self, params: np.ndarray, lo: int, hi: int) -> None:
        """Before the Adam step: nothing here (AdamW decays the weights)."""

    def update_(self, params: np.ndarray, g: np.ndarray, lo: int = 0) -> None:
        self.t += 1
        hi = lo + len(g)
        self.decay_(params, lo, hi)
        m, v = self.exp_avg[lo:hi], self.exp_avg_sq[lo:hi]
        # m + (1−β₁)(g − m) and v + (1−β₂)(g² − v), with g then g² as the only scratch
        m -= g
        m *= self.beta1
        m += g
        np.square(g, out=g)
        v -= g
        v *= self.beta2
        v += g
        # m / (√v / √bc₂ + ε) = √bc₂ · m / (√v + ε·√bc₂): one pass fewer than torch's order
        root_bc2 = math.sqrt(1.0 - self.beta2 ** self.t)
        denom = np.sqrt(v, out=g)
        denom += self.eps * root_bc2
        step = np.divide(m, denom, out=g)
        step *= self.lr * root_bc2 / (1.0 - self.beta1 ** self.t)
        params[lo:hi] -= step


class AdamW(Adam):
    """AdamW as torch.optim.AdamW: decoupled weight decay θ ← θ − lr·WD·θ before the
    Adam step, on the weight matrices only (not biases).

    Parameters
    ----------
    weight_decay : float
        WD. Others as `Adam`.
    """

    kind = "adamw"

    def __init__(self, layout: Layout, dtype, lr: float, betas: tuple[float, float] = ADAM_BETAS,
                 eps: float = ADAM_EPS, weight_decay: float = ADAMW_WEIGHT_DECAY, l2: float = 0.0,
                 state: np.ndarray | None = None, clip_norm: float | None = None):
        super().__init__(layout, dtype, lr, betas, eps, l2, state, clip_norm)
        self.weight_decay = weight_decay

    def decay_(self, params: np.ndarray, lo: int, hi: int) -> None:
        if self.weight_decay:
            keep = 1.0 - self.lr * self.weight_decay
            for a, b in self.weight_parts(lo, hi):
                params[a:b] *= keep


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


SGD_MOMENTUM = 0.9


def parse_betas(text: str) -> tuple[float, float]:
    """β₁,β₂ from "0.9,0.999"; ValueError unless they are two numbers, each in [0, 1)."""
    betas = tuple(float(b) for b in str(text).split(","))
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"not two numbers in [0, 1): {text!r}")
    return betas


def clip_(g: np.ndarray, sq_norm: float, max_norm: float) -> None:
    """Scale the averaged gradient `g` (or this process's part of it) by
    min(1, C / (‖g‖ + 1e-6)), given ‖g‖² over every part."""
    scale = max_norm / (math.sqrt(sq_norm) + CLIP_EPS)
    if scale < 1.0:
        g *= scale


def sgd_momentum(cfg) -> float:
    """SGD's μ: --momentum, else 0.9 (a flag of sgd only: None with adam and adamw)."""
    return SGD_MOMENTUM if cfg.momentum is None else cfg.momentum


def state_slots(cfg) -> int:
    """How many arrays of per-parameter state the optimizer `cfg` asks for keeps (the
    exchange allocates them where the parameters live)."""
    return OPTIMIZERS[cfg.optimizer].slots


def make_optimizer(cfg, layout: Layout, state_for=None) -> Optimizer:
    """The optimizer `cfg` asks for; `state_for(slots)` gives room for its state (the
    exchange's, so that it lives where the parameters do)."""
    state = state_for(state_slots(cfg)) if state_for is not None else None
    dtype = np.dtype(cfg.dtype)
    if cfg.optimizer == "sgd":
        return SGD(layout, dtype, cfg.lr, sgd_momentum(cfg), cfg.l2, state, cfg.nesterov, cfg.clip_norm)
    betas = ADAM_BETAS if cfg.betas is None else parse_betas(cfg.betas)
    eps = ADAM_EPS if cfg.eps is None else cfg.eps
    if cfg.optimizer == "adam":
        return Adam(layout, dtype, cfg.lr, betas, eps, cfg.l2, state, cfg.clip_norm)
    wd = ADAMW_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
    return AdamW(layout, dtype, cfg.lr, betas, eps, wd, cfg.l2, state, cfg.clip_norm)
