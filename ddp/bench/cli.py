"""ddp-bench's main: parse the flags, run the schedule with progress lines, print the
table or the JSON document, and turn Ctrl-C and SIGTERM into exits 130 and 143."""
from __future__ import annotations

import json
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict

from .. import __version__
from ..errors import UsageError
from .machine import machine_info
from .options import PROG, Options, layers_text, parse_options
from .run import run_program
from .summary import schedule, summarize
from .table import format_table

TORCH_NOTE = "torch not installed: pip install torch==2.13.0"


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _progress(opts: Options, text: str) -> None:
    if not opts.quiet:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _report_run(opts: Options, record: dict, i: int, total: int) -> None:
    what = (f"[{i + 1}/{total}] repeat {record['repeat'] + 1} {record['program']:<5} "
            f"{layers_text(record['layers'])} ×{record['ranks']}:")
    if record["ok"]:
        _progress(opts, f"{what} {record['samples_per_second']:,.0f} samples/s "
                        f"({record['wall_seconds']:.1f} s)")
    else:
        _progress(opts, f"{what} FAILED: {record['error']}")


def run_bench(opts: Options) -> dict:
    """Run every program of the schedule once per repeat; the whole document (machine,
    options, skipped programs, every run, the summary per combination)."""
    machine = machine_info(opts.timeout)
    skipped = {}
    if "torch" in opts.programs and not machine.get("torch"):
        skipped["torch"] = TORCH_NOTE
    jobs = schedule(opts, skipped)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmpdir:
        for i, (repeat, layers, ranks, program) in enumerate(jobs):
            record = run_program(program, layers, ranks, opts, tmpdir, f"run{i}")
            record["repeat"] = repeat
            runs.append(record)
            _report_run(opts, record, i, len(jobs))
    return document(machine, opts, skipped, runs)


def document(machine: dict, opts: Options, skipped: dict, runs: list[dict]) -> dict:
    """What --json prints and the table is made of: the raw runs and their summary."""
    return {"version": __version__, "machine": machine, "options": asdict(opts), "skipped": skipped,
            "runs": runs, "combinations": summarize(runs, opts, skipped),
            "failed_runs": sum(not r["ok"] for r in runs)}


def print_report(doc: dict, as_json: bool) -> int:
    """Print the document (JSON) or its table on stdout; the exit code: 1 if a run failed."""
    print(json.dumps(doc, indent=2) if as_json else format_table(doc))
    return 1 if doc["failed_runs"] else 0


@contextmanager
def _sigterm_raises():
    """SIGTERM raises _Terminated inside the block, so the running program is stopped
    as on Ctrl-C (outside the main thread SIGTERM is left alone)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:   # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:   # --help, --version
        return int(e.code or 0)
    try:
        with _sigterm_raises():
            doc = run_bench(opts)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running program was stopped", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated; the running program was stopped", file=sys.stderr)
        return 143
    return print_report(doc, opts.json)
