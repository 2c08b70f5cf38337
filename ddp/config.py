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
import tomllib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__
from .errors import UsageError
from .files import check_input_file
from .model import ACTIVATIONS, LOSSES
from .validation import DTYPES, MAX_COUNT, MAX_LAYER, validate

# validate and the limits live in ddp.validation; they are importable from here too
__all__ = ["add_config_flags", "BUCKET_MB", "DTYPES", "FIELDS", "MAX_COUNT", "MAX_LAYER", "TRAJECTORY_KEYS", "WORKER_KEYS", "Config",
           "build_parser", "command_parser", "config_from_job", "job_config", "load_toml",
           "parse_layers", "resolve", "validate"]

BUCKET_MB = 4.0  # default gradient bucket size (see the README's Benchmarks section)


def _opt(help: str, metavar: str | None = None, **kw):
    """A field with its --help text and, optionally, the metavar shown there."""
    return field(metadata={"help": help, "metavar": metavar}, **kw)


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
    class_weight: str = _opt("cross-entropy: balanced weighs each training sample by n_samples / "
                             "(n_classes · count of its class), times its weight w if the .npz "
                             "has one", metavar="{none,balanced}", default="none")
    # model
    layers: tuple[int, ...] | None = _opt(
        "layer sizes including input and output, e.g. 784,256,10 (default: input,100,classes "
        "from the data)", metavar="N,N,...", default=None)
    activation: str = _opt("activation of the hidden layers", metavar="{" + ",".join(ACTIVATIONS) + "}",
                            default="relu")
    bias: bool = _opt("drop all biases (--no-bias)", default=True)
    loss: str = _opt("loss function", metavar="{" + ",".join(LOSSES) + "}", default="cross-entropy")
    dtype: str = _opt("floating-point type", metavar="{" + ",".join(DTYPES) + "}", default="float32")
    dropout: float = _opt("inverted dropout: drop each hidden unit with probability p in training "
                          "(kept ones scaled by 1/(1-p)); none at evaluation or prediction",
                          metavar="P", default=0.0)
    init: str | None = _opt("initial parameters from this .npz (W0, b0, W1, ...)", metavar="FILE.npz",
                            default=None)
    # optimisation
    lr: float = _opt("learning rate", default=0.1)
    momentum: float | None = _opt("sgd: momentum μ: v ← μ·v + g; θ ← θ − lr·v (default: 0.9)",
                                  default=None)
    l2: float = _opt("L2 penalty λ: adds ½·λ·Σ‖W‖² over the weight matrices", default=0.0)
    optimizer: str = _opt("the update rule: sgd (momentum, optionally Nesterov), adam or adamw "
                          "(as torch.optim)", metavar="{sgd,adam,adamw}", default="sgd")
    betas: str | None = _opt("adam/adamw: the moments' decay rates β₁,β₂, each in [0, 1) "
                             "(default: 0.9,0.999)", metavar="B1,B2", default=None)
    eps: float | None = _opt("adam/adamw: ε added to √v (default: 1e-8)", default=None)
    weight_decay: float | None = _opt("adamw: decoupled weight decay WD, θ ← θ − lr·WD·θ on the "
                                      "weight matrices (default: 0.01)", metavar="WD", default=None)
    nesterov: bool = _opt("sgd with --momentum > 0: Nesterov momentum, θ ← θ − lr·(g + μ·v)",
                          default=False)
    clip_norm: float | None = _opt("scale the averaged gradient (L2 included) to a global norm of "
                                   "at most C before the update (default: off)", metavar="C",
                                   default=None)
    batch_size: int = _opt("global batch size (split over all ranks)", default=32)
    steps: int | None = _opt("number of training steps (wins over --epochs)", default=None)
    epochs: int = _opt("number of passes over the training data", default=100)
    seed: int = _opt("seed for data generation, splits, shuffling and init", default=0)
    shuffle: bool = _opt("keep file order instead of a seeded shuffle each epoch", default=True)
    max_loss: float | None = _opt("stop as on a NaN loss (exit 3, the last good checkpoint kept) "
                                  "when the mean loss of a global batch exceeds X (default: off)",
                                  metavar="X", default=None)
    # learning-rate schedule and evaluation-driven decisions (ddp.schedule)
    lr_schedule: str = _opt("the rate over the run, after warmup: constant, step (× --lr-gamma "
                            "every --lr-step-every updates), cosine or linear (down to --lr-min "
                            "at the last update)", metavar="{constant,step,cosine,linear}",
                            default="constant")
    warmup_steps: int = _opt("the first W updates' rate rises linearly: × (t+1)/W", metavar="W",
                             default=0)
    lr_min: float = _opt("cosine, linear: the rate at the end", default=0.0)
    lr_step_every: int | None = _opt("step: updates between reductions of the rate", metavar="K",
                                     default=None)
    lr_gamma: float | None = _opt("step: the factor of each reduction (default: 0.1)", metavar="G",
                                  default=None)
    lr_plateau_patience: int | None = _opt(
        "multiply the rate by --lr-plateau-factor when the validation loss has not improved "
        "(relative 1e-4) for more than P evaluations, as ReduceLROnPlateau (default: off)",
        metavar="P", default=None)
    lr_plateau_factor: float | None = _opt("with --lr-plateau-patience: the factor, in (0, 1) "
                                           "(default: 0.1)", metavar="F", default=None)
    early_stopping: int | None = _opt("stop after N evaluations without a validation loss lower "
                                      "than the best by more than --min-delta; the model is the "
                                      "best one (default: off)", metavar="N", default=None)
    min_delta: float | None = _opt("with --early-stopping: the least improvement (default: 0)",
                                   metavar="D", default=None)
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
                         "Allreduce in --bucket-mb buckets), hierarchical (a shared window on "
                         "each host, local rank r Allreducing part r with local rank r of every "
                         "other host; the same number of ranks on every host); auto: shared when "
                         "every rank is on one host, hierarchical on hosts with the same number "
                         "(>= 2) of ranks each, else allreduce", metavar="{auto,shared,allreduce,hierarchical}",
                         default="auto")
    bucket_mb: float = _opt("mpi: sum gradients in buckets of about this many MB, each started "
                            "(non-blocking) as soon as backward has produced it, last layers first; "
                            "0: one Allreduce after backward", metavar="MB", default=BUCKET_MB)
    micro_batch: int | None = _opt("compute each shard in passes of at most M rows, summed into one "
                                   "gradient (memory for M rows, not the shard; default: one pass, "
                                   "ZeroMQ workers 4096 rows)", metavar="M", default=None)
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
    # the training service (ddp-coordinator --state-dir, no training flags)
    state_dir: str | None = _opt("ddp-coordinator: run the training service, keeping its queue and "
                                 "every job's config, checkpoints, model, summary and record in "
                                 "this directory (jobs come from ddp-job submit)", metavar="DIR",
                                 default=None)
    max_running: int = _opt("service: jobs that run at once, sharing the workers", default=1)
    client_keys: str | None = _opt("service: directory of the public keys (*.key) of the clients "
                                   "(ddp-job) allowed to submit and cancel jobs; with CURVE",
                                   metavar="DIR", default=None)
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
                   "activation", "bias", "loss", "dtype", "batch_size", "seed", "shuffle",
                   "class_weight", "dropout")
# keys a ZeroMQ worker needs beyond those: how it computes, not what (the sums are the
# same up to summation order)
WORKER_KEYS = ("micro_batch",)


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


def command_parser(prog: str, description: str) -> _Parser:
    """The parser of one command: no abbreviated flags, `description` shown as written."""
    return _Parser(prog=prog, description=description, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)


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
    p = command_parser(prog, description)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_flags(p, exclude)
    return p


def add_config_flags(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """--config and a flag for every Config field but those in `exclude`."""
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


def job_config(cfg: Config) -> dict[str, Any]:
    """What a ZeroMQ worker needs to read the same samples and build the same model:
    the keys that fix the data schedule and the model (validation data stays with
    the coordinator, which evaluates)."""
    d = cfg.to_dict()
    job = {k: d[k] for k in TRAJECTORY_KEYS + WORKER_KEYS}
    job["val_data"] = None
    return job


def config_from_job(job: Any, source: str = "the coordinator's job") -> Config:
    """A Config from a job description that came over the network, checked like a TOML file."""
    if not isinstance(job, dict) or set(job) != set(TRAJECTORY_KEYS + WORKER_KEYS):
        raise UsageError(f"{source} does not have the expected keys; is the coordinator the "
                         f"same version of ddp-train ({__version__})?")
    cfg = Config(**{k: _coerce(k, v, source) for k, v in job.items()})
    validate(cfg)
    return cfg
