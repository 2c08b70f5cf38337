"""What a job submitted to the training service is: the ddp-train training keys a
client may set, and their validation, the same on the client and on the service.

`ddp-job submit` reads its flags (and `--config FILE.toml`) with ddp-train's own parser
and sends only the keys that were given; the service checks them again as ddp-train
checks its flags (the same one-line errors), since nothing from the network is
trusted. Where the job's outputs go (checkpoints, model, summary, record) is the
service's to decide: under its state directory.
"""
from __future__ import annotations

import os
from typing import Any

from .config import FIELDS, Config, _coerce, _unknown_key_message, validate
from .errors import UsageError
from .files import check_input_file

# keys of the service itself, or of the machine that runs it: not a job's to set
SERVICE_KEYS = ("backend", "workers", "bind", "curve_secret", "authorized_keys", "client_keys",
                "insecure", "metrics_port", "metrics_addr", "pushgateway", "threads", "exchange",
                "bucket_mb", "checkpoint_dir", "output", "summary_json", "log_jsonl", "progress",
                "quiet", "stall_timeout", "state_dir", "max_running", "worker_timeout", "resume")
JOB_KEYS = tuple(name for name in FIELDS if name not in SERVICE_KEYS)
PATH_KEYS = ("data", "val_data", "init")        # read on the service's host (data: the workers' too)
BUILTIN_DATA = ("spiral", "digits")
MAX_NAME = 100
PRIORITIES = range(-1000, 1001)


def absolute_paths(values: dict[str, Any], cwd: str) -> dict[str, Any]:
    """The values with relative file paths made absolute against the client's `cwd`."""
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        if key != "init" and (value in BUILTIN_DATA or value.startswith("random:")):
            continue
        out[key] = os.path.normpath(os.path.join(cwd, value))
    return out


def run_config(values: Any, job_dir: str) -> Config:
    """The Config a job runs with: the submitted `values` checked as ddp-train checks its
    flags (UsageError with the same one-line message), and the outputs under `job_dir`."""
    if not isinstance(values, dict):
        raise UsageError("the job's config must be a table of ddp-train keys")
    clean = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in SERVICE_KEYS:
            raise UsageError(f"--{name.replace('_', '-')} is the service's to set, not a job's "
                             f"(the job's outputs are kept under the service's --state-dir)")
        if name not in FIELDS:
            raise UsageError(_unknown_key_message(str(key), "the job's config"))
        clean[name] = _coerce(name, value, "the job's config")
    for key in PATH_KEYS:
        if isinstance(clean.get(key), str) and clean[key] and not _builtin(key, clean[key]) \
                and not os.path.isabs(clean[key]):
            raise UsageError(f"--{key.replace('_', '-')} {clean[key]}: give an absolute path "
                             f"(the service reads it on its own host)")
    # resume=True: a job interrupted by a restart of the service goes on from its newest
    # checkpoint (a new job's directory holds none)
    cfg = Config(**clean, backend="zmq", progress="never", quiet=True, resume=True,
                 checkpoint_dir=os.path.join(job_dir, "checkpoints"),
                 output=os.path.join(job_dir, "model.npz"),
                 summary_json=os.path.join(job_dir, "summary.json"),
                 log_jsonl=os.path.join(job_dir, "log.jsonl"))
    validate(cfg)
    return cfg


def check_inputs(cfg: Config) -> None:
    """The job's files exist and are regular files (the same errors as ddp-train's):
    checked when the job is submitted, so that a typo is said at once."""
    for key, flag in (("data", "--data"), ("val_data", "--val-data"), ("init", "--init")):
        value = getattr(cfg, key)
        if value and not _builtin(key, value):
            check_input_file(value, flag, UsageError)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
        raise UsageError(f"--name must be printable text of at most {MAX_NAME} characters")
    return name


def check_priority(priority: Any) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool) or priority not in PRIORITIES:
        raise UsageError(f"--priority must be an integer from {PRIORITIES.start} to "
                         f"{PRIORITIES.stop - 1}, got {priority!r}")
    return priority


def _builtin(key: str, value: str) -> bool:
    return key != "init" and (value in BUILTIN_DATA or value.startswith("random:"))

