"""The multilayer perceptron: activations, losses, the flat parameter layout, init.

Conventions: layer i computes z = a·W_i + b_i with W_i of shape (fan_in, fan_out);
hidden layers apply an activation f, the output layer is linear and feeds the loss.
Every function named with a trailing underscore works in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# --- activations -------------------------------------------------------------
# Forward in place on z (z becomes a = f(z)); the derivative multiplies delta in
# place by f'(z), written in terms of the activation a = f(z) that forward kept.


def relu_(z):
    np.maximum(z, 0, out=z)


def quiet_float_warnings() -> None:
    """No numpy RuntimeWarning on overflow or NaN in this thread. A diverging run is
    stopped by the project's own checks (the loss, the summed gradients), which name the
    step; numpy's warnings would only crowd the log before them."""
    np.seterr(over="ignore", invalid="ignore", divide="ignore", under="ignore")


def relu_derivative_(a, delta, scratch=None):
    """delta ⊙ [a > 0]; `scratch` (delta's shape and dtype) spares a temporary mask."""
    if scratch is None:
        np.multiply(delta, a > 0, out=delta)
        return
    np.greater(a, 0, out=scratch, casting="unsafe")  # the mask as 0.0/1.0
    np.multiply(delta, scratch, out=delta)


def sigmoid_(z):
    # 1 / (1 + exp(-z)); exp overflow for very negative z gives inf -> 0, which is the limit
    with np.errstate(over="ignore"):
        np.negative(z, out=z)
        np.exp(z, out=z)
        z += 1
        np.reciprocal(z, out=z)


def sigmoid_derivative_(a, delta, scratch=None):
    delta *= a
    delta *= 1 - a


def tanh_(z):
    np.tanh(z, out=z)


def tanh_derivative_(a, delta, scratch=None):
    delta *= 1 - a * a


def identity_(z):
    pass


def identity_derivative_(a, delta, scratch=None):
    pass


ACTIVATIONS = {"relu": relu_, "sigmoid": sigmoid_, "tanh": tanh_, "identity": identity_}
DERIVATIVES = {
    "relu": relu_derivative_,
    "sigmoid": sigmoid_derivative_,
    "tanh": tanh_derivative_,
    "identity": identity_derivative_,
}

# --- losses ------------------------------------------------------------------
# Each takes the output z (n, K), the targets and optional sample weights w (n,),
# returns the (weighted) *sum* Σ wᵢ·ℓᵢ of the per-sample losses and turns z in place
# into delta = d(that sum)/dz (row i scaled by wᵢ). Without w nothing is multiplied.


def log_softmax(z):
    """Numerically stable log softmax along the rows (a new array)."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy_(z, labels, weights=None):
    """Sum over samples of -log softmax(z)[label]; z becomes softmax(z) - onehot(label).

    Row maxima and sums go through argmax/take and a product with ones: numpy's
    reductions along a short last axis (10 classes) cost several times more.
    """
    n, k = z.shape
    if not z.flags.c_contiguous:  # the training buffers always are; keep the fallback exact
        flat = np.ascontiguousarray(z)
        loss = cross_entropy_(flat, labels, weights)
        z[...] = flat
        return loss
    flat = z.reshape(-1)
    starts = np.arange(0, n * k, k)
    z -= flat.take(starts + z.argmax(axis=1))[:, None]      # shift: each row's max is 0
    at_label = starts + labels
    label_logits = flat.take(at_label)
    np.exp(z, out=z)
    norm = z @ np.ones((k, 1), z.dtype)                       # Σ_j exp(z_j), ≥ 1
    if weights is None:
        loss_sum = float(np.log(norm).sum(dtype=np.float64) - label_logits.sum(dtype=np.float64))
    else:
        loss_sum = float(np.dot(weights, np.log(norm[:, 0], dtype=np.float64) - label_logits))
    z /= norm
    flat[at_label] -= 1
    if weights is not None:
        z *= weights[:, None]
    return loss_sum


def squared_error_(z, targets, weights=None):
    """Sum over samples of 1/2·Σ_j (z_j − t_j)²; z becomes z − t."""
    z -= targets.reshape(z.shape)
    if weights is None:
        return 0.5 * float(np.vdot(z, z))
    loss_sum = 0.5 * float(np.dot(weights, np.einsum("ij,ij->i", z, z, dtype=np.float64)))
    z *= weights[:, None]
    return loss_sum


LOSSES = {"cross-entropy": cross_entropy_, "mse": squared_error_}


def loss_sum(name, z, targets, weights=None):
    """The summed loss of outputs z without touching z (evaluation and tests)."""
    return LOSSES[name](np.array(z, copy=True), targets, weights)


# --- the flat parameter buffer -----------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each layer's W and b live inside one flat buffer.

    The table of (offset, shape) entries is built once; `views(flat)` hands out
    numpy views, so the optimizer and the Allreduce see one contiguous array
    while the forward and backward passes see matrices.
    """

    layers: tuple[int, ...]
    bias: bool = True

    @property
    def n_layers(self) -> int:
        return len(self.layers) - 1

    @property
    def entries(self) -> list[tuple[str, int, tuple[int, ...]]]:
        out, offset = [], 0
        for i, (fan_in, fan_out) in enumerate(zip(self.layers[:-1], self.layers[1:])):
            out.append((f"W{i}", offset, (fan_in, fan_out)))
            offset += fan_in * fan_out
            if self.bias:
                out.append((f"b{i}", offset, (fan_out,)))
                offset += fan_out
        return out

    @property
    def size(self) -> int:
        name, offset, shape = self.entries[-1]
        return offset + math.prod(shape)  # Python ints: a huge layer must not wrap around

    def layer_spans(self) -> list[tuple[int, int]]:
        """[lo, hi) of each layer's W and b (contiguous) in the flat buffer."""
        spans = {}
        for name, offset, shape in self.entries:
            i = int(name[1:])
            lo, hi = spans.get(i, (offset, offset))
            spans[i] = (min(lo, offset), offset + int(np.prod(shape)))
        return [spans[i] for i in range(self.n_layers)]

    def views(self, flat: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """[(W_i, b_i or None)] as views into `flat` (no copies)."""
        assert flat.shape == (self.size,) and flat.flags.c_contiguous
        by_name = {
            name: flat[offset:offset + int(np.prod(shape))].reshape(shape)
            for name, offset, shape in self.entries
        }
        return [(by_name[f"W{i}"], by_name.get(f"b{i}")) for i in range(self.n_layers)]

    def arrays(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named copies, in the model file's naming: W0, b0, W1, …"""
        return {name: np.array(flat[offset:offset + int(np.prod(shape))].reshape(shape))
                for name, offset, shape in self.entries}


def init_params_(flat: np.ndarray, layout: Layout, activation: str, seed: int) -> None:
    """He init for ReLU, Xavier (Glorot uniform) for the others; biases zero."""
    rng = np.random.default_rng([seed, 4])
    for W, b in layout.views(flat):
        fan_in, fan_out = W.shape
        if activation == "relu":
            W[...] = rng.standard_normal(W.shape) * np.sqrt(2.0 / fan_in)
        else:
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            W[...] = rng.uniform(-bound, bound, W.shape)
        if b is not None:
            b[...] = 0


def forward(views, activation: str, x: np.ndarray) -> np.ndarray:
    """Plain (allocating) forward pass: the output layer's z. For prediction."""
    f = ACTIVATIONS[activation]
    a = x
    for i, (W, b) in enumerate(views):
        a = a @ W
        if b is not None:
            a += b
        if i < len(views) - 1:
            f(a)
    return a
