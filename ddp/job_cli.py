"""ddp-job: the training service's client (submit, list, status, cancel, wait, fetch)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from . import __version__
from .command import console_script, exit_code, write_result
from .config import add_config_flags, command_parser, load_toml
from .errors import EXIT_OK, DDPError, UsageError
from .jobspec import JOB_KEYS, SERVICE_KEYS, absolute_paths
from .log import human_bytes

PROG = "ddp-job"
WAIT_POLL = 0.5         # seconds between two looks at a job that ddp-job wait waits for

DESCRIPTION = """\
Submit training jobs to a ddp-train service (ddp-coordinator --state-dir DIR),
watch them, cancel them and fetch their models, from this host or another.

  ddp-job submit --connect tcp://HOST:5555 --data digits --epochs 5   prints the job id
  ddp-job list / status ID / cancel ID / wait ID / fetch ID --output model.npz

Exit codes: 0 done; 2 bad input, an invalid job or a refused key; 5 no service
answered; ddp-job wait exits with the job's code (0 done, 2 failed, 3 diverged,
130 cancelled)."""


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the service's endpoint, e.g. tcp://10.0.0.5:5555")
    p.add_argument("--curve-secret", metavar="FILE", help="this client's secret key "
                   "(ddp-keygen DIR --client NAME)")
    p.add_argument("--server-key", metavar="FILE", help="the service's public key (coordinator.key)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the service's answer (default: 10)")


def _parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{submit,list,status,cancel,wait,fetch}")
    sub.required = True
    submit = sub.add_parser("submit", help="queue a job: any ddp-train training flag, or --config",
                            allow_abbrev=False)
    submit.error = p.error
    _connection(submit)
    submit.add_argument("--name", default="", help="a name to know the job by")
    submit.add_argument("--priority", type=int, default=0,
                        help="higher runs first (default 0); equal priorities in submission order")
    add_config_flags(submit, exclude=SERVICE_KEYS)
    for name, help_text in (("list", "every job on the service"), ("status", "one job")):
        cmd = sub.add_parser(name, help=help_text, allow_abbrev=False)
        _connection(cmd)
        if name == "status":
            cmd.add_argument("id", metavar="ID")
        cmd.add_argument("--json", action="store_true", help="print JSON")
    for name, help_text in (("cancel", "a running job checkpoints and stops; a queued one leaves"),
                            ("wait", "block until the job ends; exit with its code")):
        cmd = sub.add_parser(name, help=help_text, allow_abbrev=False)
        _connection(cmd)
        cmd.add_argument("id", metavar="ID")
    fetch = sub.add_parser("fetch", help="copy the trained model (or the summary) over the socket",
                           allow_abbrev=False)
    _connection(fetch)
    fetch.add_argument("id", metavar="ID")
    fetch.add_argument("--output", metavar="FILE", help="where to write it (default: print the "
                       "summary; a model needs --output)")
    fetch.add_argument("--summary", action="store_true", help="the run's summary JSON, not the model")
    for cmd in sub.choices.values():
        cmd.error = p.error  # one line, exit 2
    return p


class Client:
    """Requests to one service, answered or refused in one line."""

    def __init__(self, args):
        from ddp.worker.connection import load_keys

        if not args.timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        self.endpoint, self.timeout = args.connect, args.timeout
        self.keys = load_keys(args.curve_secret, args.server_key)

    def ask(self, op: str, **args) -> tuple[dict, bytes | None]:
        from ddp import protocol
        from ddp.worker.connection import Unreachable, ask

        frames = ask(self.endpoint, protocol.encode("request", op=op, args=args), self.keys,
                     self.timeout, who="client")
        try:
            msg = protocol.decode(frames[0], protocol.TO_CLIENT | {"refuse", "rejoin"},
                                  protocol.MAX_REPLY_HEADER)
        except protocol.ProtocolError as e:
            raise Unreachable(f"{self.endpoint} did not answer like a ddp-train service ({e})")
        if msg["type"] == "error":
            error = DDPError(msg["reason"])
            error.exit_code = msg["code"] if msg["code"] in (1, 2, 3, 4, 5) else 2
            raise error
        if msg["type"] != "reply":  # a one-job coordinator: it takes no requests
            raise UsageError(f"{self.endpoint} is a one-job coordinator, not a service (start it "
                             f"with ddp-coordinator --bind ENDPOINT --state-dir DIR)")
        return msg["result"], frames[1] if len(frames) > 1 else None


def _submitted_values(args) -> dict:
    """The keys the user gave (the TOML file, then the flags over it), paths made absolute."""
    values = load_toml(args.config) if args.config else {}
    for key in values:
        if key in SERVICE_KEYS:
            raise UsageError(f"--config {args.config}: {key} is the service's to set, not a job's")
    for name in JOB_KEYS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = list(value) if name == "layers" else value
    return absolute_paths(values, os.getcwd())


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _eta(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def row_line(row: dict) -> str:
    total = row["total_steps"]
    progress = f"{row['step']}/{total}" if total else f"{row['step']}/?"
    return (f"{row['id']:>4}  {row['state']:<9}  {progress:>13}  loss {_fmt(row['loss'])}  "
            f"acc {_fmt(row['accuracy'], '.3f')}  workers {row['workers']}  eta {_eta(row['eta_seconds'])}"
            f"  prio {row['priority']}  {row['name']}"
            + (f"  ({row['message']})" if row["message"] else ""))


def run_job(argv: list[str] | None = None) -> int:
    """ddp-job with `argv` (default: sys.argv[1:]); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        client = Client(args)
        if args.command == "submit":
            result, _ = client.ask("submit", config=_submitted_values(args), name=args.name,
                                   priority=args.priority)
            print(result["id"], flush=True)
            return EXIT_OK
        if args.command == "list":
            rows = client.ask("list")[0]["jobs"]
            print(json.dumps(rows, indent=2) if args.json else
                  "\n".join(row_line(r) for r in rows) or "no jobs", flush=True)
            return EXIT_OK
        if args.command in ("status", "cancel"):
            row = client.ask(args.command, id=args.id)[0]["job"]
            print(json.dumps(row, indent=2) if getattr(args, "json", False) else row_line(row), flush=True)
            return EXIT_OK
        if args.command == "wait":
            return _wait(client, args.id)
        return _fetch(client, args)
    except BaseException as e:
        return exit_code(PROG, e)


def _wait(client: Client, job_id: str) -> int:
    last = None
    while True:
        row = client.ask("status", id=job_id)[0]["job"]
        if row["wait_exit_code"] is not None:
            print(row_line(row), flush=True)
            return row["wait_exit_code"]
        if (row["state"], row["step"] // max(1, (row["total_steps"] or 1) // 10)) != last:
            last = (row["state"], row["step"] // max(1, (row["total_steps"] or 1) // 10))
            print(row_line(row), file=sys.stderr, flush=True)
        time.sleep(WAIT_POLL)


def _fetch(client: Client, args) -> int:
    what = "summary" if args.summary else "model"
    if what == "model" and not args.output:
        raise UsageError("fetch of a model needs --output FILE.npz")
    result, data = client.ask("fetch", id=args.id, what=what)
    if data is None or len(data) != result.get("bytes") or \
            hashlib.sha256(data).hexdigest() != result.get("sha256"):
        raise DDPError(f"the service's {what} of job {args.id} arrived incomplete; fetch it again")
    if args.output:
        write_result(args.output, "--output", lambda fh: fh.write(data))
        print(f"wrote {args.output} ({human_bytes(len(data))})", flush=True)
    else:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return EXIT_OK


job_main = console_script(run_job)
