"""SGD with momentum and L2, in place on one flat parameter buffer.

The optimizer never knows how the gradient was summed: it is handed the
gradient of the mean loss (summed over all shards, divided by the global
sample count) and updates `params` in place; its only state is the velocity.
"""
from __future__ import annotations

import numpy as np

from .model import Layout


class SGD:
    def __init__(self, layout: Layout, dtype, lr: float, momentum: float = 0.0, l2: float = 0.0):
        self.lr, self.momentum, self.l2 = lr, momentum, l2
        self.velocity = np.zeros(layout.size, dtype=dtype)
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
