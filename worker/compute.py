"""What one process computes: a shard in, the sums of its per-sample gradients out.

Forward:  z_i = a_{i-1}·W_i + b_i,  a_i = f(z_i) (hidden layers; the output is linear)
Backward: δ_L = ∂(Σ wᵣ·lossᵣ)/∂z_L,  dW_i = a_{i-1}ᵀ·δ_i,  db_i = Σ_rows δ_i,
          δ_{i-1} = (δ_i·W_iᵀ) ⊙ f'(z_{i-1})

All activation and delta buffers are allocated once for the largest pass (at most
`max_rows` rows); a shard of more rows is computed in passes summed into the same
gradient, a smaller one uses the buffers' leading rows. Gradients are written straight into
views of the caller's flat buffer, so nothing is allocated per step beyond a
few (n,)- and (n, classes)-sized temporaries in the loss.
"""
from __future__ import annotations

import numpy as np

from ddp.dropout import Dropout, sample_ids
from ddp.model import ACTIVATIONS, DERIVATIVES, LOSSES, Layout


class ShardCompute:
    """Forward and backward passes over at most `max_rows` rows at a time; with
    `dropout` p > 0, training passes drop hidden units (masks from `seed`, the step and
    the samples' rows, see ddp.dropout), evaluation never does."""

    def __init__(self, layout: Layout, activation: str, loss: str, dtype, max_rows: int,
                 dropout: float = 0.0, seed: int = 0):
        self.layout = layout
        self.f, self.f_prime = ACTIVATIONS[activation], DERIVATIVES[activation]
        self.loss_name, self.loss_ = loss, LOSSES[loss]
        self.max_rows = max(int(max_rows), 1)
        widths = layout.layers[1:]
        self.acts = [np.empty((self.max_rows, w), dtype) for w in widths]
        self.deltas = [np.empty((self.max_rows, w), dtype) for w in widths[:-1]]
        self.scratch = np.empty((self.max_rows, max(widths[:-1], default=1)), dtype)
        self.dropout = self.dropped = None
        if dropout > 0 and len(widths) > 1:
            self.dropout = Dropout(dropout, seed, widths[:-1], self.max_rows, dtype)
            # a hidden layer's output after its mask: what the next layer reads
            self.dropped = [np.empty((self.max_rows, w), dtype) for w in widths[:-1]]

    def _chunks(self, n: int):
        for start in range(0, n, self.max_rows):
            yield start, min(start + self.max_rows, n)

    def forward(self, params, x: np.ndarray, masks=None) -> np.ndarray:
        """Output z of the last layer for x (n ≤ max_rows), a view of an internal buffer;
        with `masks`, each hidden layer's output is multiplied by its mask."""
        n = len(x)
        a = x
        last = len(params) - 1
        for i, (W, b) in enumerate(params):
            z = self.acts[i][:n]
            np.matmul(a, W, out=z)
            if b is not None:
                z += b
            if i < last:
                self.f(z)
                if masks is not None:
                    z = np.multiply(z, masks[i], out=self.dropped[i][:n])
            a = z
        return a

    def batch_sums_(self, params, grads, scratch, reader, step: int, lo: int, hi: int,
                    layer_done=None) -> tuple[float, int, float]:
        """Write Σ wᵣ·(per-sample gradient) over rows [lo, hi) of `step`'s batch into
        `grads`, in passes of at most `max_rows` rows read from `reader` (a BatchReader).

        Returns (weighted loss sum, correct predictions, weight sum; the row count for
        unweighted data). Passes after the first are computed into `scratch` (views
        like `grads`; unused with one pass) and added layer by layer;
        `layer_done(i)` is called in the last pass only, once layer i holds the sum.
        """
        loss_sum = weight_sum = 0.0
        correct = 0
        starts = range(lo, hi, self.max_rows) or range(lo, lo + 1)  # an empty shard: one pass
        for a in starts:
            b = min(a + self.max_rows, hi)
            positions = reader.positions(step, a, b)
            x, y = reader.rows(positions)
            w = reader.weights(positions)
            key = None if self.dropout is None else (step, sample_ids(reader.data, positions))
            done = layer_done if a == starts[-1] else None
            if a == lo:
                part = self.grad_sums_(params, grads, x, y, done, w, key)
            else:
                part = self.grad_sums_(params, scratch, x, y, _adding(grads, scratch, done), w, key)
            loss_sum += part[0]
            correct += part[1]
            weight_sum += (b - a) if w is None else float(w.sum(dtype=np.float64))
        return loss_sum, correct, weight_sum

    def grad_sums_(self, params, grads, x: np.ndarray, y: np.ndarray,
                   layer_done=None, w: np.ndarray | None = None,
                   dropout_key=None) -> tuple[float, int]:
        """Write Σ per-sample gradients over the shard into `grads` (views per layer),
        each scaled by its weight in `w` when given; with dropout on, `dropout_key`
        (step, the rows' sample ids) picks the masks of forward and backward alike.

        Returns (loss sum, correct predictions). An empty shard yields zero sums.
        `params` and `grads` are the [(W, b)] views of the flat buffers.
        `layer_done(i)`, if given, is called as soon as layer i's gradients are
        written (last layer first), so their exchange can start during backward.
        """
        n = len(x)
        if n == 0:
            for i in range(len(grads) - 1, -1, -1):
                dW, db = grads[i]
                dW[...] = 0
                if db is not None:
                    db[...] = 0
                if layer_done is not None:
                    layer_done(i)
            return 0.0, 0
        assert n <= self.max_rows, "shard larger than the buffers it was sized for"
        masks = None
        if self.dropout is not None and dropout_key is not None:
            masks = self.dropout.masks_(*dropout_key)
        z = self.forward(params, x, masks)
        correct = self._correct(z, y)
        loss_sum = self.loss_(z, y, w)       # z is now δ_L
        delta = z
        for i in range(len(params) - 1, -1, -1):
            a_in = x if i == 0 else (self.acts if masks is None else self.dropped)[i - 1][:n]
            dW, db = grads[i]
            np.matmul(a_in.T, delta, out=dW)
            if db is not None:
                np.sum(delta, axis=0, out=db)
            if layer_done is not None:
                layer_done(i)
            if i > 0:
                delta_prev = self.deltas[i - 1][:n]
                np.matmul(delta, params[i][0].T, out=delta_prev)
                if masks is not None:
                    delta_prev *= masks[i - 1]
                self.f_prime(self.acts[i - 1][:n], delta_prev, self._scratch(delta_prev.shape))
                delta = delta_prev
        return loss_sum, correct

    def _scratch(self, shape):
        """A C-contiguous scratch array of `shape` inside the one preallocated buffer."""
        return self.scratch.reshape(-1)[:shape[0] * shape[1]].reshape(shape)

    def _correct(self, z: np.ndarray, y: np.ndarray) -> int:
        if self.loss_name != "cross-entropy":
            return 0
        return int(np.count_nonzero(z.argmax(axis=1) == y))

    def eval_sums(self, params, x: np.ndarray, y: np.ndarray,
                  w: np.ndarray | None = None) -> tuple[float, int]:
        """(loss sum, weighted by `w` when given; correct) of a shard of any length,
        forward only, in chunks."""
        loss_sum, correct = 0.0, 0
        for start, stop in self._chunks(len(x)):
            z = self.forward(params, x[start:stop])
            correct += self._correct(z, y[start:stop])
            loss_sum += self.loss_(z, y[start:stop], None if w is None else w[start:stop])
        return loss_sum, correct


def _adding(grads, part, layer_done):
    """A layer_done hook that adds layer i of `part` into `grads`, then passes it on."""
    def done(i: int) -> None:
        for total, more in zip(grads[i], part[i]):
            if total is not None:
                total += more
        if layer_done is not None:
            layer_done(i)
    return done
