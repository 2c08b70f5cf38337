"""Checkpoints and model files: written atomically, read back only after validation.

A checkpoint `ckpt-00000500.npz` holds the flat parameters, each slot of optimizer
state under its name (SGD's `velocity`: what readers before Adam expect; Adam's
`exp_avg`, `exp_avg_sq`), a JSON `meta` string (step, epoch, position in it, config,
`optimizer`: kind, slot names, step count t; without it: SGD's velocity at t = step),
optional extra arrays `extra_<name>` (the best parameters under early stopping) and a
SHA-256 `checksum` over the parameters, the slots in order, the meta and the extras.
A model file holds `W0, b0, W1, …` and a JSON `config` string, so it is usable on its
own. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field

import numpy as np

from .atomic import _read_npz, atomic_savez, atomic_write, remove_stale_temporaries  # noqa: F401
from .errors import DataError, OutputError
from .files import check_input_file, check_output_target, kind
from .memory import check_model_fits
from .modelconfig import check_model_config
from .model import Layout

CHECKPOINT_FORMAT = "ddp-train-checkpoint/1"
MODEL_FORMAT = "ddp-train-model/1"
KEEP_CHECKPOINTS = 3
_NAME = re.compile(r"^ckpt-(\d{8,})\.npz$")
# --- checkpoints ----------------------------------------------------------------


# what a checkpoint without an "optimizer" entry holds
_OLD_OPTIMIZER = {"kind": "sgd", "slots": ["velocity"]}
_RESERVED = ("params", "meta", "checksum")


@dataclass
class Checkpoint:
    path: str
    step: int
    params: np.ndarray
    state: np.ndarray  # (slots, params.size), in the order of optimizer["slots"]
    meta: dict
    extra: dict = field(default_factory=dict)  # name → array, from the extra_<name> entries

    @property
    def optimizer(self) -> dict:
        """kind, slots (names) and t of the optimizer whose state this is."""
        return self.meta.get("optimizer") or dict(_OLD_OPTIMIZER, t=self.step)


EXTRA_PREFIX = "extra_"


def _checksum(params: np.ndarray, state: np.ndarray, meta_json: str,
              extra: dict | None = None) -> str:
    """Over the parameters, the state's slots in order (one slot: its flat array), the
    meta and the extra arrays by name (none: the checksum of a checkpoint without extras)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(params).tobytes())
    h.update(np.ascontiguousarray(state).tobytes())
    h.update(meta_json.encode())
    for name in sorted(extra or {}):
        h.update(name.encode())
        h.update(np.ascontiguousarray(extra[name]).tobytes())
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


def save_checkpoint(directory: str, step: int, params: np.ndarray, state: np.ndarray,
                    meta: dict, optimizer: dict, extra: dict | None = None) -> str:
    """Write `directory`/ckpt-STEP.npz atomically (nothing is pruned: see Series).
    `state` is the optimizer's (slots, size) arrays, `optimizer` its kind, slot names and t;
    `extra` arrays are stored as extra_<name>."""
    assert len(optimizer["slots"]) == len(state), "one name per slot of state"
    meta = dict(meta, format=CHECKPOINT_FORMAT, step=step, time=time.time(), optimizer=optimizer)
    meta_json = json.dumps(meta, sort_keys=True)
    path = checkpoint_path(directory, step)
    slots = dict(zip(optimizer["slots"], state))
    try:
        os.makedirs(directory, exist_ok=True)
        atomic_savez(path, {
            "params": params, **slots, "meta": np.array(meta_json),
            "checksum": np.array(_checksum(params, state, meta_json, extra)),
            **{EXTRA_PREFIX + name: a for name, a in (extra or {}).items()},
        })
    except OSError as e:
        raise OutputError(f"cannot write checkpoint {path}: {e.strerror or e}")
    return path


@dataclass
class Series:
    """The checkpoints of one run in its directory.

    Pruning deletes only what this run wrote, or, when it resumed, the checkpoints of
    the run it continues (those up to the step it resumed from): a run never deletes
    another run's work. A run that starts over sets the directory's checkpoints aside
    first (`set_aside`), so the newest checkpoint there is always its own.
    """

    directory: str
    keep: int = KEEP_CHECKPOINTS
    owned: list = field(default_factory=list)  # paths, oldest first

    def continue_from(self, found: Checkpoint) -> None:
        self.owned = [p for s, p in reversed(list_checkpoints(self.directory)) if s <= found.step]

    def set_aside(self) -> tuple[str, list[int]] | None:
        """Move every ckpt-*.npz into a new `previous-<UTC time>/` sub-directory;
        (that directory, the steps moved), or None when there were none."""
        found = list_checkpoints(self.directory)
        if not found:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1000):
            aside = os.path.join(self.directory, f"previous-{stamp}" + (f"-{n}" if n else ""))
            try:
                os.mkdir(aside)  # claims the name: two runs never share one
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"--checkpoint-dir {self.directory}: cannot create {aside} to "
                                  f"set the earlier checkpoints aside ({e.strerror or e})")
        else:
            raise OutputError(f"--checkpoint-dir {self.directory}: too many previous-{stamp}* "
                              f"directories")
        try:
            for _, path in found:
                os.rename(path, os.path.join(aside, os.path.basename(path)))
        except OSError as e:
            raise OutputError(f"--checkpoint-dir {self.directory}: cannot move {path} into "
                              f"{aside} ({e.strerror or e})")
        return aside, sorted(s for s, _ in found)

    def save(self, step: int, params: np.ndarray, state: np.ndarray, meta: dict,
             optimizer: dict, extra: dict | None = None) -> str:
        path = save_checkpoint(self.directory, step, params, state, meta, optimizer, extra)
        if path in self.owned:
            self.owned.remove(path)
        self.owned.append(path)
        while len(self.owned) > self.keep:
            old = self.owned.pop(0)
            try:
                os.unlink(old)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise OutputError(f"cannot remove old checkpoint {old}: {e.strerror or e}")
        return path


def read_checkpoint(path: str) -> Checkpoint:
    """A checkpoint whose checksum verifies, or ValueError saying what is wrong with it.

    Only integrity is checked here; whether it belongs to this run is the caller's question.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror or e})")
    if not stat.S_ISREG(mode):  # opening a FIFO would block the resume for ever
        raise ValueError(f"is {kind(mode)}, not a regular file")
    try:
        z = _read_npz(path)
    except ValueError as e:
        raise ValueError(f"unreadable ({e})")
    for key in _RESERVED:
        if key not in z:
            raise ValueError(f"missing {key!r}")
    params, meta_json, checksum = z["params"], str(z["meta"]), str(z["checksum"])
    try:
        meta = json.loads(meta_json)
    except (ValueError, RecursionError):
        raise ValueError("its meta entry is not JSON")
    if not isinstance(meta, dict):
        raise ValueError("its meta entry is not a JSON object")
    names = _slot_names(meta.get("optimizer", _OLD_OPTIMIZER))
    for name in names:
        if name not in z:
            raise ValueError(f"missing {name!r}")
    slots = [z[name] for name in names]
    if params.ndim != 1 or any(a.shape != params.shape or a.dtype != params.dtype for a in slots):
        raise ValueError("not a ddp-train checkpoint")
    state = np.stack(slots)
    extra = {k[len(EXTRA_PREFIX):]: a for k, a in z.items() if k.startswith(EXTRA_PREFIX)}
    if _checksum(params, state, meta_json, extra) != checksum:
        raise ValueError("checksum mismatch")
    if meta.get("format") != CHECKPOINT_FORMAT or not isinstance(meta.get("step"), int):
        raise ValueError("not a ddp-train checkpoint")
    return Checkpoint(path, meta["step"], params, state, meta, extra)


def _slot_names(opt) -> list[str]:
    """The slot names of a checkpoint's `optimizer` entry, checked: it is untrusted input."""
    if not isinstance(opt, dict):
        opt = {}
    names, t = opt.get("slots"), opt.get("t", 0 if opt is _OLD_OPTIMIZER else None)
    if not (isinstance(opt.get("kind"), str) and isinstance(names, list) and names
            and all(isinstance(n, str) and n not in _RESERVED and not n.startswith(EXTRA_PREFIX)
                    for n in names)
            and len(set(names)) == len(names) and type(t) is int and t >= 0):
        raise ValueError("its meta entry's optimizer is not kind, slots and step count")
    return names


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
    except ValueError as e:
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
