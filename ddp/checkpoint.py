"""Checkpoints and model files: written atomically, read back only after validation.

A checkpoint `ckpt-00000500.npz` holds the flat parameter and momentum buffers,
a JSON `meta` string (step, epoch, position in the epoch, resolved config) and
a SHA-256 `checksum` over all three. A model file holds `W0, b0, W1, …` and a
JSON `config` string, so it is usable on its own. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import DataError, OutputError
from .files import check_input_file, check_output_target
from .memory import check_model_fits
from .modelconfig import check_model_config
from .model import Layout

CHECKPOINT_FORMAT = "ddp-train-checkpoint/1"
MODEL_FORMAT = "ddp-train-model/1"
KEEP_CHECKPOINTS = 3
_NAME = re.compile(r"^ckpt-(\d{8,})\.npz$")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that `path` is either the old file or the complete new one.

    Temporary file in the same directory, fsync, rename over the target, fsync
    the directory (so the rename itself survives a crash).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz, refusing object arrays (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --- checkpoints ----------------------------------------------------------------


@dataclass
class Checkpoint:
    path: str
    step: int
    params: np.ndarray
    velocity: np.ndarray
    meta: dict


def _checksum(params: np.ndarray, velocity: np.ndarray, meta_json: str) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(params).tobytes())
    h.update(np.ascontiguousarray(velocity).tobytes())
    h.update(meta_json.encode())
    return h.hexdigest()


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:08d}.npz")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint files in `directory`, newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DataError(f"--checkpoint-dir {directory}: cannot list it ({e.strerror or e})")
    found = [(int(m.group(1)), os.path.join(directory, n)) for n in names if (m := _NAME.match(n))]
    return sorted(found, reverse=True)


def save_checkpoint(directory: str, step: int, params: np.ndarray, velocity: np.ndarray,
                    meta: dict, keep: int = KEEP_CHECKPOINTS) -> str:
    meta = dict(meta, format=CHECKPOINT_FORMAT, step=step, time=time.time())
    meta_json = json.dumps(meta, sort_keys=True)
    path = checkpoint_path(directory, step)
    try:
        os.makedirs(directory, exist_ok=True)
        atomic_savez(path, {
            "params": params, "velocity": velocity, "meta": np.array(meta_json),
            "checksum": np.array(_checksum(params, velocity, meta_json)),
        })
        for _, old in list_checkpoints(directory)[keep:]:
            os.unlink(old)
    except OSError as e:
        raise OutputError(f"cannot write checkpoint {path}: {e.strerror or e}")
    return path


def read_checkpoint(path: str) -> Checkpoint:
    """A checkpoint whose checksum verifies, or ValueError saying what is wrong with it.

    Only integrity is checked here; whether it belongs to this run is the caller's question.
    """
    try:
        z = _read_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"unreadable ({e})")
    for key in ("params", "velocity", "meta", "checksum"):
        if key not in z:
            raise ValueError(f"missing {key!r}")
    params, velocity = z["params"], z["velocity"]
    meta_json, checksum = str(z["meta"]), str(z["checksum"])
    if _checksum(params, velocity, meta_json) != checksum:
        raise ValueError("checksum mismatch")
    try:
        meta = json.loads(meta_json)
    except ValueError:
        raise ValueError("its meta entry is not JSON")
    if meta.get("format") != CHECKPOINT_FORMAT or not isinstance(meta.get("step"), int) \
            or params.ndim != 1 or params.shape != velocity.shape:
        raise ValueError("not a ddp-train checkpoint")
    return Checkpoint(path, meta["step"], params, velocity, meta)


def latest_checkpoint(directory: str, warn) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt or partial ones are skipped with a warning."""
    for _, path in list_checkpoints(directory):
        try:
            return read_checkpoint(path)
        except ValueError as e:
            warn(f"skipping checkpoint {path}: {e}")
    return None


# --- model files -------------------------------------------------------------------


def save_model(path: str, layout: Layout, params: np.ndarray, model_config: dict) -> None:
    arrays = layout.arrays(params)
    arrays["config"] = np.array(json.dumps(dict(model_config, format=MODEL_FORMAT), sort_keys=True))
    check_output_target(path, "--output", OutputError)  # it may have changed since the start
    try:
        atomic_savez(path, arrays)
    except OSError as e:
        raise OutputError(f"cannot write model {path}: {e.strerror or e}")


def _open_param_file(path: str, flag: str) -> dict[str, np.ndarray]:
    check_input_file(path, flag)
    try:
        return _read_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{flag} {path}: not a readable .npz file ({e})")


def params_from_arrays(arrays: dict[str, np.ndarray], layout: Layout, dtype, what: str) -> np.ndarray:
    """Pack W0, b0, … into a flat buffer after checking every name, shape and value."""
    flat = np.zeros(layout.size, dtype=dtype)
    expected = {name for name, _, _ in layout.entries}
    extra = sorted(k for k in arrays if re.fullmatch(r"[Wb]\d+", k) and k not in expected)
    if extra:
        hint = " (the file has biases; drop --no-bias)" if any(k.startswith("b") for k in extra) else ""
        raise DataError(f"{what}: has {', '.join(extra)}, which --layers "
                        f"{','.join(map(str, layout.layers))} does not{hint}")
    for name, offset, shape in layout.entries:
        if name not in arrays:
            raise DataError(f"{what}: missing array {name} of shape {shape} for --layers "
                            f"{','.join(map(str, layout.layers))}")
        a = arrays[name]
        if a.shape != shape:
            raise DataError(f"{what}: {name} has shape {a.shape}, --layers "
                            f"{','.join(map(str, layout.layers))} needs {shape}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise DataError(f"{what}: {name} must be numeric, got dtype {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            flat[offset:offset + a.size] = a.ravel()
        if not np.isfinite(flat[offset:offset + a.size]).all():
            raise DataError(f"{what}: {name} holds NaN or Inf (as {flat.dtype})")
    return flat


def load_init(path: str, layout: Layout, dtype) -> np.ndarray:
    return params_from_arrays(_open_param_file(path, "--init"), layout, dtype, f"--init {path}")


@dataclass
class ModelFile:
    layout: Layout
    params: np.ndarray
    config: dict


def load_model(path: str, flag: str = "--model") -> ModelFile:
    arrays = _open_param_file(path, flag)
    what = f"{flag} {path}"
    if "config" not in arrays:
        raise DataError(f"{what}: has no 'config' entry; is it a model written by ddp-train --output?")
    try:
        config = json.loads(str(arrays["config"]))
    except (ValueError, RecursionError) as e:
        raise DataError(f"{what}: its 'config' entry is not JSON ({str(e)[:60]})")
    layers, bias = check_model_config(config, what)
    layout = Layout(layers, bias)
    dtype = np.dtype(config.get("dtype", "float64"))
    check_model_fits(layers, bias, dtype.itemsize, 1, what)  # before the flat buffer exists
    return ModelFile(layout, params_from_arrays(arrays, layout, dtype, what), config)
