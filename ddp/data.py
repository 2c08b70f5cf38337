"""Data sets (built in, or read from .npz/.csv), splits, the data schedule and sharding;
the checks of what a data set holds are in ddp.datacheck.

The schedule is a pure function of (seed, epoch, step): each epoch is a
permutation of the training rows drawn from (seed, epoch); global batches are
consecutive runs of `batch_size` positions of it (the last short one kept); a
global batch is cut into contiguous, near-equal shards by rank. So which
samples a step sees never depends on the number of processes.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .datacheck import check_inputs, check_targets, default_layers
from .errors import DataError, UsageError
from .files import check_input_file
from .memory import check_array_fits

# the checks of a data set's content live in ddp.datacheck; callers find them here too
__all__ = ["Dataset", "BatchReader", "Schedule", "check_inputs", "check_targets", "default_layers",
           "digits", "fingerprint", "load", "load_csv", "load_npz", "load_table", "random_data",
           "read_csv_table", "rng_for", "shard_bounds", "spiral", "split", "standardization"]

# Independent random streams, all derived from the one --seed (4 is taken: the
# parameter init in ddp.model draws from [seed, 4]).
STREAM_SPIRAL, STREAM_RANDOM, STREAM_SPLIT, STREAM_EPOCH = 1, 2, 3, 5


def rng_for(seed: int, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *key])


@dataclass
class Dataset:
    """Inputs X (n, D), possibly memory-mapped, targets y, weights w (None: all 1), rows in use.

    `rows` selects the rows of X/y/w that belong to this split (None: all), so a
    train/validation split of a memory-mapped file copies nothing.
    """

    X: np.ndarray
    y: np.ndarray | None
    name: str
    rows: np.ndarray | None = None
    w: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.X) if self.rows is None else len(self.rows)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def subset(self, rows: np.ndarray) -> "Dataset":
        base = rows if self.rows is None else self.rows[rows]
        return Dataset(self.X, self.y, self.name, np.asarray(base, dtype=np.intp), self.w)

    def file_rows(self, positions) -> np.ndarray | slice:
        """Rows of X for positions in this split; a slice when they are a contiguous run."""
        if isinstance(positions, slice):
            if self.rows is None:
                return positions
            positions = self.rows[positions]
        elif self.rows is not None:
            positions = self.rows[positions]
        return positions


# --- built-in data sets -------------------------------------------------------


def spiral(points_per_class: int, seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The three-arm spiral of the cs231n notes: 2-D points, `classes` interleaved arms."""
    rng = rng_for(seed, STREAM_SPIRAL)
    n = points_per_class
    X = np.zeros((n * classes, 2))
    y = np.zeros(n * classes, dtype=np.int64)
    for j in range(classes):
        ix = slice(n * j, n * (j + 1))
        r = np.linspace(0.0, 1, n)
        t = np.linspace(j * 4, (j + 1) * 4, n) + rng.standard_normal(n) * 0.2
        X[ix] = np.c_[r * np.sin(t), r * np.cos(t)]
        y[ix] = j
    return X, y


def digits() -> tuple[np.ndarray, np.ndarray]:
    """1797 8×8 handwritten digits (UCI optdigits test set), pixels scaled to [0, 1]."""
    with resources.files("ddp.datasets").joinpath("digits.csv.gz").open("rb") as raw:
        table = np.loadtxt(gzip.open(raw), delimiter=",")
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


def random_data(spec: str, layers, loss: str, seed: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"--data {spec}: expected random:N with N a positive integer")
    if n <= 0:
        raise UsageError(f"--data {spec}: N must be a positive integer")
    if layers is None:
        raise UsageError(f"--data {spec} needs --layers to know the input and output sizes")
    check_array_fits((n, layers[0] + layers[-1]), np.dtype(dtype).itemsize + 8,
                     f"--data {spec} ({n:,} samples of {layers[0]} features)", "use fewer samples")
    rng = rng_for(seed, STREAM_RANDOM)
    X = rng.standard_normal((n, layers[0]), dtype=np.dtype(dtype))
    if loss == "cross-entropy":
        y = rng.integers(0, layers[-1], n)
    else:
        y = rng.standard_normal((n, layers[-1]), dtype=np.dtype(dtype))
    return X, y


# --- files --------------------------------------------------------------------


def _npz_member(path: str, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array of an .npz, memory-mapped when it is stored uncompressed (np.savez)."""
    info = zf.getinfo(name + ".npy")
    if info.flag_bits & 0x1:  # read raw, an encrypted member would be random numbers
        raise ValueError(f"array {name} is encrypted; save it with numpy.savez")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"bad zip entry for {name}")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if dtype.hasobject:
                raise ValueError(f"array {name} holds Python objects; only numeric arrays are read")
            offset = fh.tell()
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape,
                         order="F" if fortran else "C", offset=offset)
    with zf.open(info) as member:  # compressed: read into memory (no pickles)
        return np.lib.format.read_array(member, allow_pickle=False)


def load_npz(path: str, flag: str = "--data", need_y: bool = True):
    check_input_file(path, flag)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"{flag} {path}: no such file")
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{flag} {path}: not a readable .npz file ({e})")
    with zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        missing = [k for k in (("X", "y") if need_y else ("X",)) if k not in names]
        if missing:
            raise DataError(f"{flag} {path}: missing array {missing[0]!r} (it has: "
                            f"{', '.join(names) or 'nothing'}); expected X (N, D) and y (N,) or (N, K)")
        try:
            X = _npz_member(path, zf, "X")
            y = _npz_member(path, zf, "y") if "y" in names else None
        except Exception as e:  # corrupt header, truncated data, object arrays
            raise DataError(f"{flag} {path}: cannot read its arrays ({e})")
    if y is not None:
        y = np.array(y)  # targets are small; keep them in memory
    return X, y


def read_csv_table(path: str, flag: str = "--data") -> np.ndarray:
    """The numeric rows (float64, 2-D) of a CSV file with a header row."""
    check_input_file(path, flag)
    try:
        with warnings.catch_warnings():  # numpy warns on a header-only file: said below
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{flag} {path}: not a numeric CSV with a header row ({e})")
    if table.size == 0:
        raise DataError(f"{flag} {path}: holds no data rows (a CSV needs a header row, then one "
                        f"row of numbers per sample)")
    return table


def load_csv(path: str, flag: str = "--data", n_inputs: int | None = None):
    """(X, y) of a CSV with a header row; all columns numeric; the target is the last column.

    With `n_inputs` (a model's input width) the target column is optional: a table
    of exactly `n_inputs` columns is all inputs (y None), and the caller checks the
    width of X against its model.
    """
    table = read_csv_table(path, flag)
    if n_inputs is not None and table.shape[1] == n_inputs:
        return table, None
    if n_inputs is None and table.shape[1] < 2:
        raise DataError(f"{flag} {path}: needs at least one input column and the target column")
    return table[:, :-1], table[:, -1]


def load_table(spec: str, cfg, flag: str = "--data", need_y: bool = True,
               n_inputs: int | None = None):
    """(X, y) for a --data or --val-data spec.

    `need_y=False` lets an .npz go without y; `n_inputs` lets a CSV go without its
    target column (see `load_csv`). y is None when the file has no targets.
    """
    if spec == "spiral":
        n = cfg.samples or 100
        check_array_fits((3 * n, 3), 8, f"--data spiral --samples {n:,}", "use fewer --samples")
        return spiral(n, cfg.seed)
    if spec == "digits":
        return digits()
    if spec.startswith("random:"):
        return random_data(spec, cfg.layers, cfg.loss, cfg.seed, cfg.dtype)
    lower = spec.lower()
    if lower.endswith(".npz"):
        return load_npz(spec, flag, need_y)
    if lower.endswith(".csv") or lower.endswith(".csv.gz"):
        return load_csv(spec, flag, n_inputs)
    if not os.path.exists(spec):
        raise DataError(f"{flag} {spec}: no such file, and not one of spiral, digits, random:N")
    raise DataError(f"{flag} {spec}: unknown format; use a .npz (arrays X, y) or a .csv with a header")


def load(spec: str, cfg, flag: str = "--data") -> tuple[Dataset, tuple[int, ...]]:
    """Load, validate against the model's layers, return (dataset, layers)."""
    what = f"{flag} {spec}"
    X, y = load_table(spec, cfg, flag)
    if X.ndim != 2:
        raise DataError(f"{what}: X must be 2-D (samples, features), got shape {X.shape}")
    if y is None:
        raise DataError(f"{what}: has no targets y")
    layers = cfg.layers
    if layers is None:
        if len(X) == 0:
            raise DataError(f"{what}: holds no samples")
        layers = default_layers(X, np.asarray(y), cfg.loss, what)
    check_inputs(X, what, cfg.dtype)
    if X.shape[1] != layers[0]:
        raise DataError(f"{what}: samples have {X.shape[1]} features but --layers starts with "
                        f"{layers[0]} (give --layers {X.shape[1]},...)")
    if cfg.loss == "cross-entropy" and layers[-1] < 2:
        raise UsageError("--loss cross-entropy needs at least 2 outputs (last --layers size); "
                         "use --loss mse for a single output")
    y = check_targets(np.asarray(y), len(X), cfg.loss, layers[-1], what, cfg.dtype)
    return Dataset(X, y, spec), layers


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded hold-out: (train, validation); rows keep file order within each part."""
    n_val = int(round(fraction * len(data)))
    if n_val == 0 or n_val == len(data):
        raise UsageError(f"--val-fraction {fraction} of {len(data)} samples leaves "
                         f"{n_val} for validation and {len(data) - n_val} for training")
    perm = rng_for(seed, STREAM_SPLIT).permutation(len(data))
    return data.subset(np.sort(perm[n_val:])), data.subset(np.sort(perm[:n_val]))


def standardization(data: Dataset, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training rows (float64, chunked; std 0 → 1)."""
    total = np.zeros(data.n_features)
    total_sq = np.zeros(data.n_features)
    for start in range(0, len(data), chunk_rows):
        block = np.asarray(data.X[data.file_rows(slice(start, start + chunk_rows))], dtype=np.float64)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
    mean = total / len(data)
    std = np.sqrt(np.maximum(total_sq / len(data) - mean ** 2, 0.0))
    std[std < 1e-12] = 1.0
    return mean, std


# --- schedule and shards --------------------------------------------------------


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous near-equal shard [start, stop) of n items: the first n % world_size get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Schedule:
    n_train: int
    batch_size: int
    seed: int
    shuffle: bool = True

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray | None:
        """Positions of the training rows in this epoch's order (None: file order)."""
        if not self.shuffle:
            return None
        return rng_for(self.seed, STREAM_EPOCH, epoch).permutation(self.n_train)

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, start, stop) of the global batch of `step` within its epoch's order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.batch_size
        return epoch, start, min(start + self.batch_size, self.n_train)

    def batch_len(self, step: int) -> int:
        """Samples in `step`'s global batch (the last batch of an epoch may be short)."""
        _, start, stop = self.locate(step)
        return stop - start


class BatchReader:
    """Gathers one shard of a global batch into preallocated buffers.

    Rows are taken straight from X (memory-mapped or not) into a buffer of the
    training dtype, then standardized in place; with no shuffle, no cast and no
    standardization the shard is a view and nothing is copied.
    """

    def __init__(self, data: Dataset, schedule: Schedule, max_rows: int, dtype,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        self.data, self.schedule = data, schedule
        self.dtype = np.dtype(dtype)
        self.x_buf = np.empty((max_rows, data.n_features), self.dtype)
        self.mean = None if mean is None else mean.astype(self.dtype)
        self.inv_std = None if std is None else (1.0 / std).astype(self.dtype)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray | None:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.schedule.epoch_order(epoch)
        return self._order

    def shard(self, step: int, rank: int, world_size: int):
        """(x, y) of this rank's shard of `step`'s global batch."""
        return self.batch_part(step, *shard_bounds(self.schedule.batch_len(step), world_size, rank))

    def batch_part(self, step: int, lo: int, hi: int):
        """(x, y) of rows [lo, hi) of `step`'s global batch."""
        return self.rows(self.positions(step, lo, hi))

    def positions(self, step: int, lo: int, hi: int):
        """Positions in the split of rows [lo, hi) of `step`'s global batch."""
        epoch, start, _ = self.schedule.locate(step)
        order = self.order(epoch)
        return slice(start + lo, start + hi) if order is None else order[start + lo:start + hi]

    def weights(self, positions) -> np.ndarray | None:
        """The sample weights of the rows at `positions` (None: unweighted data)."""
        return None if self.data.w is None else self.data.w[self.data.file_rows(positions)]

    def rows(self, positions):
        data = self.data
        rows = data.file_rows(positions)
        y = data.y[rows]
        if isinstance(rows, slice):
            n = len(range(*rows.indices(len(data.X))))
            if data.X.dtype == self.dtype and self.mean is None:
                return data.X[rows], y
            x = self.x_buf[:n]
            x[...] = data.X[rows]
        else:
            x = self.x_buf[:len(rows)]
            if data.X.dtype == self.dtype and data.X.flags.aligned:
                # mode="clip": rows are in range by construction, and the default
                # mode="raise" copies through a temporary buffer when out= is given.
                # (take() on an unaligned array, as an .npz member often is, would
                # first copy the whole array: fancy indexing below reads only the rows.)
                np.take(data.X, rows, axis=0, out=x, mode="clip")
            else:
                x[...] = data.X[rows]
        if self.mean is not None:
            x -= self.mean
            x *= self.inv_std
        return x, y


def fingerprint(data: Dataset, mean: np.ndarray | None, std: np.ndarray | None,
                chunk_rows: int = 65536) -> str:
    """A hash of all a worker's shards are read from: the bytes of X, y and w, the rows in
    use, the standardization. Processes reading different samples get different ones."""
    h = hashlib.blake2b(digest_size=16)
    X, y = data.X, data.y
    h.update(f"{X.shape}{X.dtype.str}{y.shape}{y.dtype.str}".encode())
    for start in range(0, len(X), chunk_rows):
        h.update(np.ascontiguousarray(X[start:start + chunk_rows]).data)
    h.update(np.ascontiguousarray(y).data)
    for extra in (data.rows, mean, std) + (() if data.w is None else (data.w,)):
        h.update(b"-" if extra is None else np.ascontiguousarray(extra).data)
    return h.hexdigest()
