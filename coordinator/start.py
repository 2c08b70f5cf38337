"""Where a run begins: its outputs checked, then a checkpoint to resume (verified to
be this run's), --init, or the seed. The root of a run (MPI rank 0, the ZeroMQ
coordinator) does this alone; the exchange then shares the result."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ddp import checkpoint as ckpt
from ddp.config import FIELDS, TRAJECTORY_KEYS, Config
from ddp.errors import UsageError
from ddp.log import Log
from ddp.model import init_params_
from ddp.optim import SGD_MOMENTUM
from ddp.setup import Setup


def check_writable(cfg: Config) -> None:
    """Fail at start, not after hours of training, if an output cannot be written."""
    targets = [("--checkpoint-dir", cfg.checkpoint_dir, cfg.checkpoint_dir)]
    for flag, path in (("--output", cfg.output), ("--summary-json", cfg.summary_json)):
        if path:
            targets.append((flag, path, os.path.dirname(os.path.abspath(path))))
    for flag, path, directory in targets:
        if not path:
            continue
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})")


# the optimizer's own options, which a resumed run may change (with a warning)
_OPTIMIZER_KEYS = ("betas", "eps", "weight_decay", "nesterov", "clip_norm")


def _check_resumable(found: ckpt.Checkpoint, cfg: Config, params: np.ndarray, fingerprint: str,
                     log: Log) -> None:
    saved_cfg, path = found.meta.get("config", {}), found.path
    now = cfg.to_dict()
    # a key an older checkpoint lacks had its default then
    differ = [k for k in TRAJECTORY_KEYS if saved_cfg.get(k, FIELDS[k].default) != now.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} → {now.get(k)!r}" for k in differ)
        raise UsageError(f"checkpoint {path} was written by a different run ({detail}); "
                         f"use another --checkpoint-dir or --no-resume to start over")
    saved_fp = found.meta.get("data_fingerprint")
    if saved_fp is None:  # written before checkpoints carried it: a refusal would strand the run
        log.warn(f"checkpoint {path} has no data fingerprint (an older ddp-train wrote it): "
                 f"resuming without checking that --data {cfg.data} still holds the same "
                 f"samples; use --no-resume if it changed")
    elif saved_fp != fingerprint:
        raise UsageError(f"checkpoint {path} was written by a different run (the samples of "
                         f"--data {cfg.data} differ: data fingerprint {saved_fp!r} → "
                         f"{fingerprint!r}); use another --checkpoint-dir or --no-resume to "
                         f"start over")
    if found.params.shape != params.shape or found.params.dtype != params.dtype:
        raise UsageError(f"checkpoint {path} holds {found.params.dtype}[{found.params.size}] "
                         f"parameters, this model has {params.dtype}[{params.size}]; use another "
                         f"--checkpoint-dir or --no-resume to start over")
    changed = [k for k in ("lr", "momentum", "l2", *_OPTIMIZER_KEYS)
               if k in saved_cfg and _effective(saved_cfg, k) != _effective(now, k)]
    if changed:
        log.warn("resuming with changed " + ", ".join(
            f"{k} ({_effective(saved_cfg, k)} → {_effective(now, k)})" for k in changed))


def _effective(config: dict, key: str):
    """A config's value of `key` as the run uses it: SGD's momentum None is 0.9 (the
    default that checkpoints written before --optimizer name)."""
    value = config.get(key)
    if key == "momentum" and value is None and config.get("optimizer", "sgd") == "sgd":
        return SGD_MOMENTUM
    return value


def _check_optimizer_state(found: ckpt.Checkpoint, opt) -> None:
    """The checkpoint holds the state of this run's optimizer: the same kind and slots."""
    saved = found.optimizer
    if saved["kind"] != opt.kind or list(saved["slots"]) != list(opt.slot_names):
        raise UsageError(f"checkpoint {found.path} holds the state of --optimizer {saved['kind']} "
                         f"({', '.join(saved['slots'])}), this run uses --optimizer {opt.kind} "
                         f"({', '.join(opt.slot_names)}); give --optimizer {saved['kind']}, "
                         f"another --checkpoint-dir or --no-resume to start over")


def _resume_or_start_over(setup: Setup, series: ckpt.Series, log: Log,
                          params: np.ndarray) -> ckpt.Checkpoint | None:
    """The checkpoint to resume (checked against this run), or None after setting aside
    whatever the directory holds (--no-resume, or nothing in it verifies), so that every
    checkpoint left there from now on is this run's."""
    cfg = setup.cfg
    stale = ckpt.remove_stale_temporaries(cfg.checkpoint_dir)
    if stale:
        log.info(f"removed {len(stale)} temporary file{'s' * (len(stale) > 1)} that an "
                 f"interrupted checkpoint write left in {cfg.checkpoint_dir}")
    fingerprint = setup.fingerprint()  # hashed once; the checkpoints' meta and ZeroMQ reuse it
    found = ckpt.latest_checkpoint(cfg.checkpoint_dir, log.warn) if cfg.resume else None
    if found is not None:
        _check_resumable(found, cfg, params, fingerprint, log)
        series.continue_from(found)
        return found
    aside = series.set_aside()
    if aside is not None:
        where, steps = aside
        why = "--no-resume" if not cfg.resume else "none of them could be resumed"
        log.info(f"{why}: moved {len(steps)} earlier checkpoint{'s' * (len(steps) > 1)} "
                 f"(steps {steps[0]}–{steps[-1]}) to {where}; this run starts over")
    return None


def load_start(setup: Setup, log: Log, params: np.ndarray, opt,
               series: ckpt.Series | None, restore=None) -> int:
    """Fill `params` and the optimizer's state from a checkpoint, --init or the seed;
    the step to start from. `series` (with --checkpoint-dir) learns which checkpoints
    the run may prune; `restore(checkpoint)`, if given, takes the rest of a resumed
    checkpoint's state."""
    cfg = setup.cfg
    check_writable(cfg)
    found = _resume_or_start_over(setup, series, log, params) if series is not None else None
    if found is not None:
        _check_optimizer_state(found, opt)
        params[...], opt.state[...] = found.params, found.state
        opt.t = found.optimizer["t"]
        if restore is not None:
            restore(found)
        log.info(f"resuming from {found.path} at step {found.step}")
        return found.step
    if cfg.init:
        params[...] = ckpt.load_init(cfg.init, setup.layout, params.dtype)
    else:
        init_params_(params, setup.layout, cfg.activation, cfg.seed)
    return 0
