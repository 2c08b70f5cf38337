"""Checks of a resolved `ddp.config.Config`: bounds, choices, combinations and paths.

Every failed check is a `UsageError` whose message names the flag and says what
it accepts. The checks run in a fixed order, so of several mistakes the same
one is reported first every time.
"""
from __future__ import annotations

import os
from dataclasses import fields
from urllib.parse import urlsplit

from .errors import UsageError
from .files import check_input_file, check_output_target
from .model import ACTIVATIONS, LOSSES
from .optim import OPTIMIZERS, parse_betas, sgd_momentum
from .schedule import SCHEDULES

DTYPES = ("float32", "float64")
EXCHANGES = ("auto", "shared", "allreduce", "hierarchical")  # --exchange under MPI

# Upper bounds of numeric flags: far above any real use, low enough that nothing
# downstream overflows (int64 step counters, milliseconds for a poll, bytes of a bucket).
MAX_COUNT = 10 ** 15          # steps, epochs, batch size, samples, seed, intervals
MAX_LAYER = 2 ** 40           # units in one layer (the memory check refuses far less)
MAX_THREADS = 1024            # BLAS threads; also --workers, processes started on this host
MAX_BUCKET_MB = 1e6
MAX_SECONDS = 1e7             # --worker-timeout, --shard-timeout, --stall-timeout (115 days)

_MAXIMA = {name: MAX_COUNT for name in ("samples", "batch_size", "steps", "epochs", "seed",
                                         "eval_every", "log_every", "checkpoint_every",
                                         "min_workers", "max_running", "warmup_steps",
                                         "lr_step_every", "lr_plateau_patience",
                                         "early_stopping", "micro_batch")}
_MAXIMA.update(threads=MAX_THREADS, workers=MAX_THREADS, bucket_mb=MAX_BUCKET_MB,
               worker_timeout=MAX_SECONDS, shard_timeout=MAX_SECONDS, stall_timeout=MAX_SECONDS)

# options that mean something only to the ZeroMQ backend (insecure, a bool, is checked apart)
_ZMQ_ONLY = ("workers", "bind", "shard_timeout", "curve_secret", "authorized_keys", "state_dir",
             "client_keys")


def validate(cfg) -> None:
    """Raise UsageError for the first value of `cfg` (a Config) that cannot be run."""
    _check_text(cfg)
    _check_bounds(cfg)
    _check_choices(cfg)
    _check_run(cfg)
    _check_schedule(cfg)
    _check_optimizer(cfg)
    _check_zmq(cfg)
    _check_observability(cfg)
    _check_paths(cfg)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _check_text(cfg) -> None:
    """No NUL byte: it passes TOML and argv checks, then breaks os calls."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        _need(not (isinstance(value, str) and "\0" in value),
              f"--{f.name.replace('_', '-')} {value!r}: contains a NUL character")


def _check_bounds(cfg) -> None:
    """Every bounded numeric flag within its documented maximum."""
    for name, most in _MAXIMA.items():
        value = getattr(cfg, name)
        if value is not None and value > most:
            shown = f"{most:,}" if isinstance(most, int) else f"{most:g}"
            raise UsageError(f"--{name.replace('_', '-')} must be at most {shown}, got {value:g}"
                             if isinstance(value, float) else
                             f"--{name.replace('_', '-')} must be at most {shown}, got {value}")


def _check_choices(cfg) -> None:
    _need(cfg.activation in ACTIVATIONS,
          f"--activation {cfg.activation!r} is not one of: {', '.join(ACTIVATIONS)}")
    _need(cfg.loss in LOSSES, f"--loss {cfg.loss!r} is not one of: {', '.join(LOSSES)}")
    _need(cfg.dtype in DTYPES, f"--dtype {cfg.dtype!r} is not one of: {', '.join(DTYPES)}")
    _need(cfg.progress in ("auto", "always", "never"),
          f"--progress {cfg.progress!r} is not one of: auto, always, never")


def _check_run(cfg) -> None:
    """The optimiser, the schedule, the intervals and the machine."""
    _need(cfg.lr > 0 and _finite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    _need(cfg.momentum is None or 0 <= cfg.momentum < 1,
          f"--momentum must be in [0, 1), got {cfg.momentum}")
    _need(cfg.l2 >= 0 and _finite(cfg.l2), f"--l2 must be >= 0, got {cfg.l2}")
    _need(cfg.max_loss is None or (cfg.max_loss > 0 and _finite(cfg.max_loss)),
          f"--max-loss must be a positive finite number, got {cfg.max_loss}")
    _need(cfg.batch_size > 0, f"--batch-size must be a positive integer, got {cfg.batch_size}")
    _need(cfg.steps is None or cfg.steps > 0, f"--steps must be a positive integer, got {cfg.steps}")
    _need(cfg.epochs > 0, f"--epochs must be a positive integer, got {cfg.epochs}")
    _need(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    _need(not (cfg.val_fraction > 0 and cfg.val_data),
          "give either --val-fraction or --val-data, not both")
    _need(cfg.samples is None or cfg.samples > 0, f"--samples must be positive, got {cfg.samples}")
    _need(cfg.eval_every >= 0, f"--eval-every must be >= 0, got {cfg.eval_every}")
    _need(cfg.log_every is None or cfg.log_every > 0,
          f"--log-every must be a positive integer, got {cfg.log_every}")
    _need(cfg.checkpoint_every > 0,
          f"--checkpoint-every must be a positive integer, got {cfg.checkpoint_every}")
    _need(cfg.threads is None or cfg.threads > 0, f"--threads must be positive, got {cfg.threads}")
    _need(cfg.exchange in EXCHANGES,
          f"--exchange {cfg.exchange!r} is not one of: {', '.join(EXCHANGES)}")
    _need(cfg.bucket_mb >= 0 and _finite(cfg.bucket_mb),
          f"--bucket-mb must be a number >= 0, got {cfg.bucket_mb}")
    _need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    _check_weights_and_passes(cfg)


def _check_weights_and_passes(cfg) -> None:
    """Sample weights, dropout and micro-batches."""
    _need(cfg.class_weight in ("none", "balanced"),
          f"--class-weight {cfg.class_weight!r} is not one of: none, balanced")
    _need(cfg.class_weight == "none" or cfg.loss == "cross-entropy",
          "--class-weight balanced needs class labels: it applies to --loss cross-entropy only")
    _need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}")
    _need(cfg.micro_batch is None or cfg.micro_batch > 0,
          f"--micro-batch must be a positive integer, got {cfg.micro_batch}")


def _check_schedule(cfg) -> None:
    """The learning-rate schedule, the plateau and early stopping (ddp.schedule)."""
    _need(cfg.lr_schedule in SCHEDULES,
          f"--lr-schedule {cfg.lr_schedule!r} is not one of: {', '.join(SCHEDULES)}")
    _need(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    _need(0 <= cfg.lr_min <= cfg.lr, f"--lr-min must be in [0, --lr {cfg.lr:g}], got {cfg.lr_min}")
    step = cfg.lr_schedule == "step"
    _need(step or (cfg.lr_step_every is None and cfg.lr_gamma is None),
          "--lr-step-every and --lr-gamma apply to --lr-schedule step only")
    _need(not step or cfg.lr_step_every is not None,
          "--lr-schedule step needs --lr-step-every K (updates between reductions)")
    _need(cfg.lr_step_every is None or cfg.lr_step_every >= 1,
          f"--lr-step-every must be a positive integer, got {cfg.lr_step_every}")
    _need(cfg.lr_gamma is None or 0 < cfg.lr_gamma <= 1,
          f"--lr-gamma must be in (0, 1], got {cfg.lr_gamma}")
    _need(cfg.lr_plateau_patience is None or cfg.lr_plateau_patience >= 1,
          f"--lr-plateau-patience must be a positive integer, got {cfg.lr_plateau_patience}")
    _need(cfg.lr_plateau_factor is None or cfg.lr_plateau_patience is not None,
          "--lr-plateau-factor goes with --lr-plateau-patience P")
    _need(cfg.lr_plateau_factor is None or 0 < cfg.lr_plateau_factor < 1,
          f"--lr-plateau-factor must be in (0, 1), got {cfg.lr_plateau_factor}")
    _need(cfg.early_stopping is None or cfg.early_stopping >= 1,
          f"--early-stopping must be a positive integer, got {cfg.early_stopping}")
    _need(cfg.min_delta is None or cfg.early_stopping is not None,
          "--min-delta goes with --early-stopping N")
    _need(cfg.min_delta is None or (cfg.min_delta >= 0 and _finite(cfg.min_delta)),
          f"--min-delta must be a number >= 0, got {cfg.min_delta}")
    for flag, given in (("--lr-plateau-patience", cfg.lr_plateau_patience is not None),
                        ("--early-stopping", cfg.early_stopping is not None)):
        _need(not given or cfg.val_data or cfg.val_fraction > 0,
              f"{flag} needs validation data: give --val-data or --val-fraction")
        _need(not given or cfg.eval_every > 0,
              f"{flag} decides at evaluations: give --eval-every K")


# options that mean something only to some optimizers, and those optimizers
_OPTIMIZER_ONLY = {"betas": ("adam", "adamw"), "eps": ("adam", "adamw"),
                   "weight_decay": ("adamw",), "nesterov": ("sgd",), "momentum": ("sgd",)}


def _check_optimizer(cfg) -> None:
    """The optimizer's name, its own options only with it, and their values."""
    _need(cfg.optimizer in OPTIMIZERS,
          f"--optimizer {cfg.optimizer!r} is not one of: {', '.join(OPTIMIZERS)}")
    for name, owners in _OPTIMIZER_ONLY.items():
        value = getattr(cfg, name)
        given = value is not None and value is not False
        _need(not given or cfg.optimizer in owners,
              f"--{name.replace('_', '-')} applies to --optimizer {' or '.join(owners)} only, "
              f"not {cfg.optimizer}")
    if cfg.betas is not None:
        try:
            parse_betas(cfg.betas)
        except ValueError:
            raise UsageError(f"--betas must be two numbers in [0, 1) like 0.9,0.999, "
                             f"got {cfg.betas!r}") from None
    _need(cfg.eps is None or (cfg.eps > 0 and _finite(cfg.eps)),
          f"--eps must be a positive number, got {cfg.eps}")
    _need(cfg.weight_decay is None or (cfg.weight_decay >= 0 and _finite(cfg.weight_decay)),
          f"--weight-decay must be a number >= 0, got {cfg.weight_decay}")
    _need(not cfg.nesterov or sgd_momentum(cfg) > 0, "--nesterov needs --momentum > 0")
    _need(cfg.clip_norm is None or (cfg.clip_norm > 0 and _finite(cfg.clip_norm)),
          f"--clip-norm must be a positive number, got {cfg.clip_norm}")


def _check_zmq(cfg) -> None:
    """The backend, and the ZeroMQ options only with --backend zmq."""
    _need(cfg.backend in ("mpi", "zmq"), f"--backend {cfg.backend!r} is not one of: mpi, zmq")
    _need(cfg.workers is None or cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _need(cfg.min_workers >= 1, f"--min-workers must be a positive integer, got {cfg.min_workers}")
    _need(cfg.worker_timeout > 0 and _finite(cfg.worker_timeout),
          f"--worker-timeout must be a positive number of seconds, got {cfg.worker_timeout}")
    _need(cfg.shard_timeout is None or (cfg.shard_timeout > 0 and _finite(cfg.shard_timeout)),
          f"--shard-timeout must be a positive number of seconds, got {cfg.shard_timeout}")
    _need((cfg.curve_secret is None) == (cfg.authorized_keys is None),
          "--curve-secret and --authorized-keys go together (create them with ddp-keygen DIR)")
    _need(cfg.max_running >= 1, f"--max-running must be a positive integer, got {cfg.max_running}")
    _need(cfg.client_keys is None or cfg.curve_secret is not None,
          "--client-keys needs CURVE: give --curve-secret and --authorized-keys too")
    _need(cfg.client_keys is None or cfg.state_dir is not None,
          "--client-keys applies to the training service only (with --state-dir)")
    if cfg.backend == "mpi":
        given = ([f for f in _ZMQ_ONLY if getattr(cfg, f) is not None]
                 + (["insecure"] if cfg.insecure else []))
        _need(not given, f"--{given[0].replace('_', '-') if given else ''} applies to the ZeroMQ "
                         f"backend only; add --backend zmq")


def _check_observability(cfg) -> None:
    _need(cfg.metrics_port is None or 0 <= cfg.metrics_port <= 65535,
          f"--metrics-port must be a port number (0-65535), got {cfg.metrics_port}")
    _need(bool(cfg.metrics_addr.strip()),
          "--metrics-addr must not be empty (e.g. 127.0.0.1 or 0.0.0.0)")
    _need(cfg.stall_timeout > 0 and _finite(cfg.stall_timeout),
          f"--stall-timeout must be a positive number of seconds, got {cfg.stall_timeout}")
    if cfg.pushgateway is not None:
        _need(_is_http_url(cfg.pushgateway),
              f"--pushgateway {cfg.pushgateway!r}: expected a URL like http://localhost:9091")


def _is_http_url(text: str) -> bool:
    try:
        url = urlsplit(text)
        ok = url.scheme in ("http", "https") and bool(url.hostname) and not url.query
        url.port  # noqa: B018 (raises ValueError on a port out of range)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        return False
    return ok


def _check_paths(cfg) -> None:
    """Input files readable and output files writable now, not after the data is loaded."""
    if cfg.init:
        check_input_file(cfg.init, "--init", UsageError)
    for name in ("output", "summary_json", "log_jsonl"):
        path = getattr(cfg, name)
        if path:
            flag = f"--{name.replace('_', '-')}"
            check_output_target(path, flag)
            parent = os.path.dirname(os.path.abspath(path))
            _need(os.path.isdir(parent), f"{flag} {path}: directory {parent} does not exist")
