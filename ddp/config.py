"""One config object for a training run.

`Config` is a frozen dataclass; every field is a command-line flag (underscores
become dashes) and a key of the optional `--config FILE.toml`. Flags override
the file, the file overrides the defaults. Unknown keys and wrong types are
errors that say how to fix them; the resolved config is logged once and saved
with checkpoints and the model.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import tomllib
from urllib.parse import urlsplit
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__
from .errors import UsageError
from .files import check_input_file, check_output_target
from .model import ACTIVATIONS, LOSSES

DTYPES = ("float32", "float64")


BUCKET_MB = 4.0  # default gradient bucket size (see the README's Benchmarks section)

# Upper bounds of numeric flags: far above any real use, low enough that nothing
# downstream overflows (int64 step counters, milliseconds for a poll, bytes of a bucket).
MAX_COUNT = 10 ** 15          # steps, epochs, batch size, samples, seed, intervals
MAX_LAYER = 2 ** 40           # units in one layer (the memory check refuses far less)
MAX_THREADS = 1024            # BLAS threads; also --workers, processes started on this host
MAX_BUCKET_MB = 1e6
MAX_SECONDS = 1e7             # --worker-timeout, --shard-timeout, --stall-timeout (115 days)


def _opt(help: str, flag: str | None = None, metavar: str | None = None, **kw):
    """Field metadata: the help text, an alternative flag spelling, a metavar."""
    return field(metadata={"help": help, "flag": flag, "metavar": metavar}, **kw)


@dataclass(frozen=True)
class Config:
    # data
    data: str = _opt("training data: spiral, digits, random:N, or a .npz/.csv file", metavar="SPEC",
                      default="spiral")
    samples: int | None = _opt("spiral: points per class (default: 100)", default=None)
    val_data: str | None = _opt("validation data (same forms as --data)", metavar="SPEC", default=None)
    val_fraction: float = _opt("hold out this seeded fraction of the data for validation", default=0.0)
    standardize: bool = _opt("scale inputs to zero mean, unit variance (stats from the training data)",
                             default=False)
    # model
    layers: tuple[int, ...] | None = _opt(
        "layer sizes including input and output, e.g. 784,256,10 (default: input,100,classes "
        "from the data)", metavar="N,N,...", default=None)
    activation: str = _opt("activation of the hidden layers", metavar="{" + ",".join(ACTIVATIONS) + "}",
                            default="relu")
    bias: bool = _opt("drop all biases (--no-bias)", default=True)
    loss: str = _opt("loss function", metavar="{" + ",".join(LOSSES) + "}", default="cross-entropy")
    dtype: str = _opt("floating-point type", metavar="{" + ",".join(DTYPES) + "}", default="float32")
    init: str | None = _opt("initial parameters from this .npz (W0, b0, W1, ...)", metavar="FILE.npz",
                            default=None)
    # optimisation
    lr: float = _opt("learning rate", default=0.1)
    momentum: float = _opt("momentum μ: v ← μ·v + g; θ ← θ − lr·v", default=0.9)
    l2: float = _opt("L2 penalty λ: adds ½·λ·Σ‖W‖² over the weight matrices", default=0.0)
    batch_size: int = _opt("global batch size (split over all ranks)", default=32)
    steps: int | None = _opt("number of SGD steps (wins over --epochs)", default=None)
    epochs: int = _opt("number of passes over the training data", default=100)
    seed: int = _opt("seed for data generation, splits, shuffling and init", default=0)
    shuffle: bool = _opt("keep file order instead of a seeded shuffle each epoch", default=True)
    max_loss: float | None = _opt("stop as on a NaN loss (exit 3, the last good checkpoint kept) "
                                  "when the mean loss of a global batch exceeds X (default: off)",
                                  metavar="X", default=None)
    # evaluation and output
    eval_every: int = _opt("evaluate on the validation data every K steps (0: at the end only)",
                           default=0)
    output: str | None = _opt("write the trained model to this .npz", metavar="FILE.npz", default=None)
    summary_json: str | None = _opt("write the run summary as JSON to this file", metavar="FILE.json",
                                    default=None)
    log_every: int | None = _opt("log a line every K steps (default: about 20 lines per run)",
                                 default=None)
    progress: str = _opt("progress bar (auto: only when stderr is a terminal)",
                          metavar="{auto,always,never}", default="auto")
    quiet: bool = _opt("print errors and the final line only (no config, log lines, warnings "
                       "or progress bar)", default=False)
    # checkpoints
    checkpoint_dir: str | None = _opt("write checkpoints here and resume from the newest valid one",
                                      metavar="DIR", default=None)
    checkpoint_every: int = _opt("steps between checkpoints", default=500)
    resume: bool = _opt("start over even if --checkpoint-dir holds a checkpoint (by default "
                        "the newest valid one is resumed)", default=True)
    # machine
    threads: int | None = _opt("BLAS threads per rank (default: cores on this host / local ranks)",
                               default=None)
    exchange: str = _opt("mpi: how gradients meet: shared (ranks on one host sum them in a shared "
                         "memory window, each updating 1/N of the parameters), allreduce (MPI "
                         "Allreduce in --bucket-mb buckets); auto: shared when every rank is on "
                         "one host", metavar="{auto,shared,allreduce}", default="auto")
    bucket_mb: float = _opt("mpi: sum gradients in buckets of about this many MB, each started "
                            "(non-blocking) as soon as backward has produced it, last layers first; "
                            "0: one Allreduce after backward", metavar="MB", default=BUCKET_MB)
    # ZeroMQ backend: a coordinator holds the model, workers compute shards
    backend: str = _opt("how gradients meet: mpi (mpirun, or one process) or zmq (a coordinator "
                        "and worker processes)", metavar="{mpi,zmq}", default="mpi")
    workers: int | None = _opt("zmq: worker processes to start on this host (default: ddp-train "
                               "one per core, ddp-coordinator none)", default=None)
    bind: str | None = _opt("zmq: serve workers on this endpoint, e.g. tcp://127.0.0.1:5555 "
                            "(default for ddp-train: a private ipc:// socket)", metavar="ENDPOINT",
                            default=None)
    min_workers: int = _opt("zmq: wait until this many workers are connected before a step",
                            default=1)
    worker_timeout: float = _opt("zmq: seconds of silence after which a worker counts as dead and "
                                 "its shard is recomputed by others", metavar="SECONDS", default=3.0)
    shard_timeout: float | None = _opt("zmq: the least time a shard may take before its rows are "
                                       "recomputed by another worker; the deadline is the larger of "
                                       "this and 10x the median of recent shards (default: "
                                       "--worker-timeout)", metavar="SECONDS", default=None)
    curve_secret: str | None = _opt("zmq: the coordinator's secret key (from ddp-keygen): encrypt "
                                    "and authenticate with CURVE", metavar="FILE", default=None)
    authorized_keys: str | None = _opt("zmq: directory of the public keys (*.key) of the workers "
                                       "allowed to join", metavar="DIR", default=None)
    insecure: bool = _opt("zmq: allow a non-loopback --bind without CURVE keys (anyone who can "
                          "reach the port can join and read the model)", default=False)
    # observability
    metrics_port: int | None = _opt("serve Prometheus /metrics, /healthz, /status and a live dashboard "
                                    "on this port (MPI: rank 0; default: none for ddp-train, 9108 for "
                                    "ddp-coordinator; 0: none)", metavar="PORT", default=None)
    metrics_addr: str = _opt("address --metrics-port listens on (0.0.0.0: every interface)",
                             metavar="ADDR", default="127.0.0.1")
    stall_timeout: float = _opt("seconds without a completed step after which /healthz answers 503",
                                metavar="SECONDS", default=60.0)
    log_jsonl: str | None = _opt("append one JSON object per logged step and per event (start, "
                                 "checkpoint, worker joined/left/failed, end) to this file",
                                 metavar="FILE.jsonl", default=None)
    pushgateway: str | None = _opt("when the run ends, push its outcome (exit code, duration, final "
                                   "loss) to this Prometheus Pushgateway, e.g. http://localhost:9091",
                                   metavar="URL", default=None)

    # --- derived values -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        """The resolved config as TOML that `--config` reads back."""
        lines = []
        for k, v in self.to_dict().items():
            if v is None:
                continue
            lines.append(f"{k} = {json.dumps(v)}")
        return "\n".join(lines)


FIELDS = {f.name: f for f in fields(Config)}
# keys that must match for a checkpoint to be resumed: they fix the data schedule and the model
TRAJECTORY_KEYS = ("data", "samples", "val_data", "val_fraction", "standardize", "layers",
                   "activation", "bias", "loss", "dtype", "batch_size", "seed", "shuffle")


def _base_type(f) -> str:
    """'int' | 'float' | 'str' | 'bool' | 'layers' from a field's annotation."""
    t = str(f.type)
    if f.name == "layers":
        return "layers"
    for name in ("bool", "int", "float", "str"):
        if t.startswith(name):
            return name
    raise AssertionError(f"unsupported config type {t}")


def parse_layers(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
        if any(isinstance(p, float) or isinstance(p, bool) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"--layers must be comma-separated integers like 784,256,10, got {value!r}")
    if len(sizes) < 2:
        raise UsageError(f"--layers needs at least an input and an output size, got {value!r}")
    if any(s <= 0 for s in sizes):
        raise UsageError(f"--layers sizes must be positive, got {value!r}")
    if max(sizes) > MAX_LAYER:
        raise UsageError(f"--layers sizes must be at most {MAX_LAYER:,}, got {max(sizes):,}")
    return sizes


def _coerce(name: str, value: Any, source: str) -> Any:
    """A value from TOML (already typed) checked against the field's type."""
    if value is None:
        return None
    kind = _base_type(FIELDS[name])
    if kind == "layers":
        return parse_layers(value)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise UsageError(f"{source}: {name} must be {'an' if kind == 'int' else 'a'} {kind}, "
                         f"got {value!r}")
    return float(value) if kind == "float" else value


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(FIELDS)}"
    return f"{source}: unknown key '{key}'{hint}"


def load_toml(path: str) -> dict[str, Any]:
    check_input_file(path, "--config", UsageError)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file")
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})")
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(_unknown_key_message(key, f"--config {path}"))
        out[name] = _coerce(name, value, f"--config {path}")
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def _flag_type(kind: str):
    def convert(text: str):
        if kind == "layers":
            return parse_layers(text)
        try:
            return {"int": int, "float": float, "str": str}[kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if kind == 'int' else 'a'} {kind}, "
                                             f"got {text!r}")
    convert.__name__ = kind
    return convert


def build_parser(prog: str, description: str, exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Flags for every Config field but those in `exclude`."""
    p = _Parser(prog=prog, description=description, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", metavar="FILE.toml", help="read any of these options from a TOML file "
                   "(keys with underscores: batch_size = 64); flags override it")
    for f in fields(Config):
        if f.name in exclude:
            continue
        kind, flag = _base_type(f), "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if kind == "bool":
            # both spellings exist; the one that changes the default is the documented one
            p.add_argument(flag, dest=f.name, action="store_true", default=None,
                           help=help_text if not f.default else argparse.SUPPRESS)
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           help=help_text if f.default else argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=f.name, type=_flag_type(kind), default=None,
                           metavar=f.metadata["metavar"] or kind.upper(),
                           help=help_text + ("" if f.default is None else f" (default: {f.default})"))
    return p


def resolve(args: argparse.Namespace) -> Config:
    """Defaults ← TOML file ← flags, then validation."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    for name in FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise UsageError(msg)

    for f in fields(Config):  # a NUL byte passes TOML and argv checks, then breaks os calls
        value = getattr(cfg, f.name)
        need(not (isinstance(value, str) and "\0" in value),
             f"--{f.name.replace('_', '-')} {value!r}: contains a NUL character")
    _check_bounds(cfg)

    need(cfg.activation in ACTIVATIONS,
         f"--activation {cfg.activation!r} is not one of: {', '.join(ACTIVATIONS)}")
    need(cfg.loss in LOSSES, f"--loss {cfg.loss!r} is not one of: {', '.join(LOSSES)}")
    need(cfg.dtype in DTYPES, f"--dtype {cfg.dtype!r} is not one of: {', '.join(DTYPES)}")
    need(cfg.progress in ("auto", "always", "never"),
         f"--progress {cfg.progress!r} is not one of: auto, always, never")
    need(cfg.lr > 0 and _finite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.l2 >= 0 and _finite(cfg.l2), f"--l2 must be >= 0, got {cfg.l2}")
    need(cfg.max_loss is None or (cfg.max_loss > 0 and _finite(cfg.max_loss)),
         f"--max-loss must be a positive finite number, got {cfg.max_loss}")
    need(cfg.batch_size > 0, f"--batch-size must be a positive integer, got {cfg.batch_size}")
    need(cfg.steps is None or cfg.steps > 0, f"--steps must be a positive integer, got {cfg.steps}")
    need(cfg.epochs > 0, f"--epochs must be a positive integer, got {cfg.epochs}")
    need(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    need(not (cfg.val_fraction > 0 and cfg.val_data),
         "give either --val-fraction or --val-data, not both")
    need(cfg.samples is None or cfg.samples > 0, f"--samples must be positive, got {cfg.samples}")
    need(cfg.eval_every >= 0, f"--eval-every must be >= 0, got {cfg.eval_every}")
    need(cfg.log_every is None or cfg.log_every > 0,
         f"--log-every must be a positive integer, got {cfg.log_every}")
    need(cfg.checkpoint_every > 0,
         f"--checkpoint-every must be a positive integer, got {cfg.checkpoint_every}")
    need(cfg.threads is None or cfg.threads > 0, f"--threads must be positive, got {cfg.threads}")
    need(cfg.exchange in ("auto", "shared", "allreduce"),
         f"--exchange {cfg.exchange!r} is not one of: auto, shared, allreduce")
    need(cfg.bucket_mb >= 0 and _finite(cfg.bucket_mb),
         f"--bucket-mb must be a number >= 0, got {cfg.bucket_mb}")
    need(cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}")
    need(cfg.backend in ("mpi", "zmq"), f"--backend {cfg.backend!r} is not one of: mpi, zmq")
    need(cfg.workers is None or cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    need(cfg.min_workers >= 1, f"--min-workers must be a positive integer, got {cfg.min_workers}")
    need(cfg.worker_timeout > 0 and _finite(cfg.worker_timeout),
         f"--worker-timeout must be a positive number of seconds, got {cfg.worker_timeout}")
    need(cfg.shard_timeout is None or (cfg.shard_timeout > 0 and _finite(cfg.shard_timeout)),
         f"--shard-timeout must be a positive number of seconds, got {cfg.shard_timeout}")
    need((cfg.curve_secret is None) == (cfg.authorized_keys is None),
         "--curve-secret and --authorized-keys go together (create them with ddp-keygen DIR)")
    if cfg.backend == "mpi":
        given = [f for f in ("workers", "bind", "shard_timeout", "curve_secret", "authorized_keys")
                 if getattr(cfg, f) is not None] + (["insecure"] if cfg.insecure else [])
        need(not given, f"--{given[0].replace('_', '-') if given else ''} applies to the ZeroMQ "
                        f"backend only; add --backend zmq")
    need(cfg.metrics_port is None or 0 <= cfg.metrics_port <= 65535,
         f"--metrics-port must be a port number (0-65535), got {cfg.metrics_port}")
    need(bool(cfg.metrics_addr.strip()), "--metrics-addr must not be empty (e.g. 127.0.0.1 or 0.0.0.0)")
    need(cfg.stall_timeout > 0 and _finite(cfg.stall_timeout),
         f"--stall-timeout must be a positive number of seconds, got {cfg.stall_timeout}")
    if cfg.pushgateway is not None:
        try:
            url = urlsplit(cfg.pushgateway)
            ok = url.scheme in ("http", "https") and bool(url.hostname) and not url.query
            url.port  # noqa: B018 (raises ValueError on a port out of range)
        except ValueError:  # e.g. an unclosed [ of an IPv6 address
            ok = False
        need(ok, f"--pushgateway {cfg.pushgateway!r}: expected a URL like http://localhost:9091")
    if cfg.init:  # before the data is loaded, not after
        check_input_file(cfg.init, "--init", UsageError)
    for name in ("output", "summary_json", "log_jsonl"):
        path = getattr(cfg, name)
        if path:
            flag = f"--{name.replace('_', '-')}"
            check_output_target(path, flag)
            parent = os.path.dirname(os.path.abspath(path))
            need(os.path.isdir(parent), f"{flag} {path}: directory {parent} does not exist")


_MAXIMA = {name: MAX_COUNT for name in ("samples", "batch_size", "steps", "epochs", "seed",
                                         "eval_every", "log_every", "checkpoint_every",
                                         "min_workers")}
_MAXIMA.update(threads=MAX_THREADS, workers=MAX_THREADS, bucket_mb=MAX_BUCKET_MB,
               worker_timeout=MAX_SECONDS, shard_timeout=MAX_SECONDS, stall_timeout=MAX_SECONDS)


def _check_bounds(cfg: Config) -> None:
    """Every bounded numeric flag within its documented maximum."""
    for name, most in _MAXIMA.items():
        value = getattr(cfg, name)
        if value is not None and value > most:
            shown = f"{most:,}" if isinstance(most, int) else f"{most:g}"
            raise UsageError(f"--{name.replace('_', '-')} must be at most {shown}, got {value:g}"
                             if isinstance(value, float) else
                             f"--{name.replace('_', '-')} must be at most {shown}, got {value}")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def job_config(cfg: Config) -> dict[str, Any]:
    """What a ZeroMQ worker needs to read the same samples and build the same model:
    the keys that fix the data schedule and the model (validation data stays with
    the coordinator, which evaluates)."""
    d = cfg.to_dict()
    job = {k: d[k] for k in TRAJECTORY_KEYS}
    job["val_data"] = None
    return job


def config_from_job(job: Any, source: str = "the coordinator's job") -> Config:
    """A Config from a job description that came over the network, checked like a TOML file."""
    if not isinstance(job, dict) or set(job) != set(TRAJECTORY_KEYS):
        raise UsageError(f"{source} does not have the expected keys; is the coordinator the "
                         f"same version of ddp-train ({__version__})?")
    cfg = Config(**{k: _coerce(k, v, source) for k, v in job.items()})
    validate(cfg)
    return cfg
