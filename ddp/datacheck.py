"""Checks of what a data set holds: inputs numeric, finite and 2-D; targets that fit
the model's outputs (class labels for cross-entropy, float rows for mse).

Each failed check is a DataError naming the data (`what`, e.g. "--data x.npz") and
saying how to fix it. Large inputs are scanned in chunks, so a memory-mapped file
is never loaded whole.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError


def _check_finite(X: np.ndarray, what: str, dtype=None, chunk_rows: int = 65536) -> None:
    """NaN/Inf, also after the cast to the training dtype (1e300 is Inf in float32).
    Scans in chunks so a memory-mapped file is never loaded whole."""
    for start in range(0, len(X), chunk_rows):
        block = np.asarray(X[start:start + chunk_rows])
        if dtype is not None and block.dtype != dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                block = block.astype(dtype)
        if not np.isfinite(block).all():
            bad = np.argwhere(~np.isfinite(block))[0]
            raise DataError(f"{what}: NaN or Inf at row {start + bad[0]}"
                            + (f", column {bad[1]}" if block.ndim > 1 else "")
                            + (f" (in {np.dtype(dtype).name})" if dtype is not None else ""))


def check_inputs(X: np.ndarray, what: str, dtype=None) -> None:
    if X.ndim != 2:
        raise DataError(f"{what}: X must be 2-D (samples, features), got shape {X.shape}")
    if len(X) == 0:
        raise DataError(f"{what}: holds no samples")
    if X.shape[1] == 0:
        raise DataError(f"{what}: X has no feature columns")
    if X.dtype.kind not in "fiu":  # numpy counts timedelta64 as an integer type
        raise DataError(f"{what}: X must be numeric (real integers or floats), got dtype {X.dtype}")
    if np.issubdtype(X.dtype, np.floating) or dtype is not None:
        _check_finite(X, what, None if dtype is None else np.dtype(dtype))


def _check_target_array(y: np.ndarray, n: int, what: str) -> None:
    if y.ndim == 0:
        raise DataError(f"{what}: y must hold one target per sample, got a single value")
    if len(y) != n:
        raise DataError(f"{what}: {n} samples in X but {len(y)} targets in y")
    if y.dtype.kind not in "biuf":  # not complex (its imaginary part would be dropped), not time
        raise DataError(f"{what}: y must be numeric (real integers, floats or bools), got dtype "
                        f"{y.dtype}")


def _label_range(y: np.ndarray, what: str) -> tuple[int, int]:
    """(min, max) of class labels, after checking they are integers >= 0 of shape (N,)."""
    if y.ndim != 1:
        raise DataError(f"{what}: cross-entropy needs integer class labels of shape (N,), got "
                        f"targets of shape {y.shape} (use --loss mse for float targets)")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise DataError(f"{what}: cross-entropy needs integer class labels, found "
                            f"non-integer values (use --loss mse for float targets)")
    lo, hi = int(y.min()), int(y.max())  # Python ints: no overflow for huge float labels
    if lo < 0:
        raise DataError(f"{what}: labels must be >= 0, found {lo}")
    return lo, hi


def check_targets(y: np.ndarray, n: int, loss: str, n_out: int, what: str, dtype) -> np.ndarray:
    """Validated targets: int labels for cross-entropy, float (n, n_out) for mse."""
    _check_target_array(y, n, what)
    if loss == "cross-entropy":
        _, hi = _label_range(y, what)
        if hi >= n_out:
            raise DataError(f"{what}: label {hi} does not fit the {n_out} outputs of --layers "
                            f"(labels must be < {n_out}; give --layers ...,{hi + 1})")
        return y.astype(np.intp)
    if y.ndim == 1:
        if n_out != 1:
            raise DataError(f"{what}: targets of shape ({n},) need 1 output, but --layers ends in "
                            f"{n_out}; give targets of shape ({n}, {n_out})")
        y = y.reshape(n, 1)
    if y.ndim != 2 or y.shape[1] != n_out:
        raise DataError(f"{what}: targets must have shape ({n}, {n_out}) for --layers ending in "
                        f"{n_out}, got {y.shape}")
    y = y.astype(dtype)
    if not np.isfinite(y).all():
        raise DataError(f"{what}: NaN or Inf in the targets")
    return y


def check_weights(w: np.ndarray, n: int, what: str, dtype=None) -> np.ndarray:
    """Validated sample weights: shape (n,), real, finite (also in the training dtype),
    >= 0 and not all zero; returned as float64."""
    if w.ndim != 1 or len(w) != n:
        raise DataError(f"{what}: w must hold one weight per sample, shape ({n},), got shape "
                        f"{w.shape}")
    if w.dtype.kind not in "biuf":
        raise DataError(f"{what}: w must be numeric (real integers or floats), got dtype {w.dtype}")
    _check_finite(w, f"{what}: weights w", dtype)
    w = np.asarray(w, dtype=np.float64)
    negative = np.flatnonzero(w < 0)
    if len(negative):
        raise DataError(f"{what}: weights w must be >= 0, found {w[negative[0]]:g} at row "
                        f"{negative[0]}")
    if not np.any(w > 0):
        raise DataError(f"{what}: all weights w are zero; at least one sample needs a weight > 0")
    return w


MAX_INFERRED_CLASSES = 100_000


def default_layers(X: np.ndarray, y: np.ndarray, loss: str, what: str) -> tuple[int, ...]:
    """input, 100, outputs — the outputs read off validated targets."""
    _check_target_array(y, len(X), what)
    if loss == "cross-entropy":
        _, hi = _label_range(y, what)
        if hi >= MAX_INFERRED_CLASSES:
            raise DataError(f"{what}: largest label is {hi}; give --layers explicitly if there "
                            f"really are {hi + 1} classes")
        n_out = max(hi + 1, 2)
    else:
        n_out = 1 if y.ndim == 1 else y.shape[1]
    return (X.shape[1], 100, n_out)
