"""Sample weights: the optional `w` array of an .npz, and the weights that
--class-weight balanced derives from label frequencies.

A weighted batch's loss and gradient are Σ wᵢ·ℓᵢ / Σ wᵢ; with no weights every
wᵢ is 1 and the weights are None throughout (nothing is multiplied).
"""
from __future__ import annotations

import zipfile
from dataclasses import replace

import numpy as np

from . import data as ddata
from .datacheck import check_weights
from .errors import DataError

CLASS_WEIGHTS = ("none", "balanced")


def file_weights(spec: str, n: int, flag: str, dtype) -> np.ndarray | None:
    """The checked `w` (float64, (n,)) of an .npz data set; None for other data or no `w`."""
    if not spec.lower().endswith(".npz"):
        return None
    what = f"{flag} {spec}"
    try:
        with zipfile.ZipFile(spec) as zf:
            if "w.npy" not in zf.namelist():
                return None
            w = np.array(ddata._npz_member(spec, zf, "w"))
    except Exception as e:  # the file was readable a moment ago: a corrupt w member
        raise DataError(f"{what}: cannot read its weights w ({e})")
    return check_weights(w, n, what, dtype)


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """n_samples / (n_classes · count(class)) per sample, as scikit-learn's
    class_weight="balanced" (n_classes: the classes present in `y`)."""
    counts = np.bincount(y)
    present = np.count_nonzero(counts)
    per_class = np.zeros(len(counts))
    per_class[counts > 0] = len(y) / (present * counts[counts > 0])
    return per_class[y]


def with_weights(data: ddata.Dataset, spec: str, flag: str, dtype) -> ddata.Dataset:
    """`data` with the weights its file holds (if any)."""
    return replace(data, w=file_weights(spec, len(data.X), flag, dtype))


def with_class_weights(train: ddata.Dataset) -> ddata.Dataset:
    """The training rows weighted by --class-weight balanced (counted on these rows),
    times the file's own weights where it has them. The result is indexed by file row,
    like `w`, so the rows outside this split get weight 0."""
    rows = np.arange(len(train.X)) if train.rows is None else train.rows
    w = np.zeros(len(train.X))
    w[rows] = balanced_weights(np.asarray(train.y[rows]))
    if train.w is not None:
        w *= train.w
    return replace(train, w=w)


def check_some_weight(data: ddata.Dataset, what: str) -> None:
    """A split whose rows all weigh 0 would divide by a zero weight sum at every step."""
    w = data.w
    if w is not None and not np.any((w if data.rows is None else w[data.rows]) > 0):
        raise DataError(f"{what}: every sample of this split has weight 0 in w")
