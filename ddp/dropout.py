"""Inverted dropout masks from a counter-based hash: unit j of hidden layer l for the
sample at row r of the data set at step t is kept when splitmix64 of the counter
(seed, t, l, r, j) is at least p·2⁶⁴, and a kept unit is scaled by 1/(1−p).

A mask is a pure function of those numbers, never of the rank or the shard, so the
trajectory does not depend on who computed which rows; each process hashes its own
rows only, with a few in-place integer operations on preallocated uint64 arrays.
"""
from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)   # splitmix64's increment (the golden ratio)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def splitmix64_(z: np.ndarray, tmp: np.ndarray) -> None:
    """z ← splitmix64's finalizer of z + γ (uint64, in place; `tmp` is z's shape)."""
    z += _GAMMA
    for shift, mult in ((30, _M1), (27, _M2)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        z ^= tmp
        z *= mult
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp


def _scalar_mix(*words: int) -> int:
    """One 64-bit key from several integers (seed, step, layer), chained through splitmix64."""
    z = np.zeros(1, np.uint64)
    tmp = np.empty(1, np.uint64)
    for word in words:
        z ^= np.uint64(word & _MASK64)
        splitmix64_(z, tmp)
    return int(z[0])


def sample_ids(data, positions) -> np.ndarray:
    """The data set's row numbers (int64) of the split's rows at `positions`: what
    names a sample whatever the shard it falls in."""
    rows = data.file_rows(positions)
    if isinstance(rows, slice):
        return np.arange(*rows.indices(len(data.X)), dtype=np.int64)
    return np.asarray(rows, dtype=np.int64)


class Dropout:
    """Masks for hidden layers of the given widths, for up to `max_rows` rows at once.

    Parameters
    ----------
    p : float
        The probability of dropping a unit, 0 < p < 1.
    seed : int
        The run's --seed.
    widths : sequence of int
        Units of each hidden layer.
    max_rows : int
        The most rows one call handles (the buffers are sized for them).
    dtype : numpy dtype
        The masks' type (the training dtype).
    """

    def __init__(self, p: float, seed: int, widths, max_rows: int, dtype):
        self.p, self.seed = float(p), int(seed)
        self.scale = 1.0 / (1.0 - self.p)
        # keep when the hash ≥ p·2⁶⁴: a fraction 1 − p of the 2⁶⁴ values
        self.threshold = np.uint64(min(int(self.p * 2.0 ** 64), _MASK64))
        self.masks = [np.empty((max_rows, w), dtype) for w in widths]
        self.units = [np.arange(w, dtype=np.uint64) for w in widths]
        widest = max(widths)
        self.hash = np.empty((max_rows, widest), np.uint64)
        self.tmp = np.empty((max_rows, widest), np.uint64)
        self.keep = np.empty((max_rows, widest), bool)

    def masks_(self, step: int, ids: np.ndarray) -> list[np.ndarray]:
        """Each hidden layer's mask (0 or 1/(1−p)) for the samples `ids` at `step`: views
        of internal buffers, valid until the next call."""
        n = len(ids)
        out = []
        for layer, buf in enumerate(self.masks):
            width = buf.shape[1]
            mask = buf[:n]
            self._hash_(step, layer, ids, width)
            keep = self.keep[:n, :width]
            np.greater_equal(self.hash[:n, :width], self.threshold, out=keep)
            np.multiply(keep, self.scale, out=mask, casting="unsafe")
            out.append(mask)
        return out

    def _hash_(self, step: int, layer: int, ids: np.ndarray, width: int) -> None:
        """hash[:n, :width] ← splitmix64(key + (id·width + unit)·γ) for this step and layer."""
        n = len(ids)
        h, tmp = self.hash[:n, :width], self.tmp[:n, :width]
        key = np.uint64(_scalar_mix(self.seed, step, layer))
        # the counter of unit j of sample r: r·width + j (distinct for every (r, j))
        np.multiply(ids.astype(np.uint64)[:, None], np.uint64(width), out=h)
        h += self.units[layer]
        h *= _GAMMA
        h += key
        splitmix64_(h, tmp)
