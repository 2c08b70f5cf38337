"""Optimizers: in place on one flat parameter buffer, or on a part [lo, hi) of it.

An optimizer never knows how the gradient was summed: the exchange hands it the
sum of per-sample gradients over the global batch (or the part [lo, hi) of that
sum it owns) and the sample count, and it moves the same part of the parameters.
Its state is `slots` arrays shaped like the parameters, `state[k]`, held where the
exchange puts them (one shared copy on a host under the shared window), so that
a part [lo, hi) of the state goes with the same part of the parameters.
"""
from __future__ import annotations

import numpy as np

from .model import Layout


class SGD:
    """SGD with momentum and L2 on the weight matrices.

    Parameters
    ----------
    layout : Layout
        Where each layer's weights and biases lie in the flat buffer.
    dtype : numpy dtype
        Of the parameters (and so of the state).
    lr, momentum, l2 : float
        Learning rate, momentum μ (0: plain SGD), L2 coefficient λ.
    state : ndarray of shape (1, layout.size), optional
        Where the velocity lives (zeros); allocated here if not given.
    """

    slots = 1  # per-parameter state arrays: the velocity

    def __init__(self, layout: Layout, dtype, lr: float, momentum: float = 0.0, l2: float = 0.0,
                 state: np.ndarray | None = None):
        self.lr, self.momentum, self.l2 = lr, momentum, l2
        self.state = np.zeros((self.slots, layout.size), dtype=dtype) if state is None else state
        self.velocity = self.state[0]
        # L2 applies to the weight matrices only, which are the leading block of
        # each layer's slice; keep (start, stop) ranges instead of a full mask.
        self._weight_ranges = [(off, off + int(np.prod(shape)))
                               for name, off, shape in layout.entries if name.startswith("W")]

    def l2_penalty(self, params: np.ndarray) -> float:
        """½·λ·Σ‖W‖² over the weight matrices."""
        if not self.l2:
            return 0.0
        return 0.5 * self.l2 * sum(float(np.vdot(params[a:b], params[a:b]))
                                   for a, b in self._weight_ranges)

    def step_(self, params: np.ndarray, grad_sum: np.ndarray, n_samples: int, lo: int = 0) -> None:
        """One update from the *sum* of per-sample gradients over `n_samples` samples.

        g = grad_sum / n + λ·W;  v ← μ·v + g;  θ ← θ − lr·v   (μ = 0: θ ← θ − lr·g).
        `grad_sum` is overwritten (it serves as scratch space). It may cover only
        the part [lo, lo + len(grad_sum)) of the parameters: that part is updated.
        """
        hi = lo + len(grad_sum)
        g, p = grad_sum, params[lo:hi]
        if not self.momentum and not self.l2:
            g *= self.lr / n_samples          # fold 1/n into the step: two passes in all
            p -= g
            return
        g *= 1.0 / n_samples
        if self.l2:
            for a, b in self._weight_ranges:
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    g[a - lo:b - lo] += self.l2 * params[a:b]
        if self.momentum:
            v = self.velocity[lo:hi]
            v *= self.momentum
            v += g
            np.multiply(v, self.lr, out=g)
        else:
            g *= self.lr
        p -= g


def state_slots(cfg) -> int:
    """How many arrays of per-parameter state the optimizer `cfg` asks for keeps (the
    exchange allocates them where the parameters live)."""
    return SGD.slots


def make_optimizer(cfg, layout: Layout, state_for=None) -> SGD:
    """The optimizer `cfg` asks for; `state_for(slots)` gives room for its state (the
    exchange's, so that it lives where the parameters do)."""
    state = state_for(state_slots(cfg)) if state_for is not None else None
    return SGD(layout, np.dtype(cfg.dtype), cfg.lr, cfg.momentum, cfg.l2, state)
