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
from .. import cluster
from ..errors import UsageError
from .hosts import emulated_hosts
from .machine import machine_info
from .options import PROG, Options, layers_text, parse_options
from .run import run_program
from .summary import schedule, summarize
from .table import format_table

TORCH_NOTE = "torch not installed: pip install torch==2.13.0"
# what --hosts cannot spread over emulated hosts, and why: their numbers would sit in
# rows of ranks on K hosts while measuring one, and their ratios compare unlike runs
ONE_HOST_NOTES = {
    "torch": "torch not run under --hosts: torch.distributed.run starts every rank on one host",
    "zmq": "zmq not run under --hosts: ddp-train --backend zmq --workers R starts its workers on one host",
    "sgemm": "sgemm not run under --hosts: it times one process, and --hosts puts 2 or more ranks in a run",
}


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


def _skipped(opts: Options, machine: dict) -> dict:
    """{program: why it does not run} of the programs asked for."""
    skipped = {}
    if "torch" in opts.programs and not machine.get("torch"):
        skipped["torch"] = TORCH_NOTE
    if opts.hosts:
        skipped.update({p: note for p, note in ONE_HOST_NOTES.items() if p in opts.programs})
    return skipped


def _report_link(opts: Options, hosts: dict) -> None:
    link = hosts["measured"]
    if link["ok"]:
        _progress(opts, f"{hosts['hosts']} emulated hosts, link {hosts['link']}: "
                        f"α {link['alpha_seconds'] * 1e6:.1f} µs, "
                        f"{link['bandwidth_bytes_per_second'] * 8 / 1e9:.3g} Gbit/s at 8 MiB")
    else:
        _progress(opts, f"{hosts['hosts']} emulated hosts: the link measurement FAILED: {link['error']}")


def run_bench(opts: Options) -> dict:
    """Run every program of the schedule once per repeat (under --hosts, on the
    emulated hosts, after measuring their link); the whole document (machine,
    options, skipped programs, hosts and link, every run, the summary per combination)."""
    machine = machine_info(opts.timeout)
    skipped = _skipped(opts, machine)
    jobs = schedule(opts, skipped)
    runs, described = [], None
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmpdir, emulated_hosts(opts) as hosts:
        if hosts:
            described = {**hosts.describe(), "measured": hosts.measure_link(opts)}
            _report_link(opts, described)
        for i, (repeat, layers, ranks, program) in enumerate(jobs):
            record = run_program(program, layers, ranks, opts, tmpdir, f"run{i}", hosts)
            record["repeat"] = repeat
            runs.append(record)
            _report_run(opts, record, i, len(jobs))
    return document(machine, opts, skipped, runs, described)


def document(machine: dict, opts: Options, skipped: dict, runs: list[dict],
             hosts: dict | None = None) -> dict:
    """What --json prints and the table is made of: the raw runs and their summary;
    under --hosts also `hosts`: the cluster and its link's measurement."""
    doc = {"version": __version__, "machine": machine, "options": asdict(opts), "skipped": skipped,
           "runs": runs, "combinations": summarize(runs, opts, skipped),
           "failed_runs": sum(not r["ok"] for r in runs)}
    if hosts is not None:
        doc["hosts"] = hosts
        doc["failed_runs"] += not hosts["measured"]["ok"]
    return doc


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
    reason = opts.hosts and cluster.unavailable(loss=bool(cluster.parse_link(opts.link).loss))
    if reason:
        print(f"{PROG}: error: --hosts: no emulated hosts here: {reason}", file=sys.stderr)
        return 2
    try:
        with _sigterm_raises():
            doc = run_bench(opts)
    except cluster.ClusterError as e:
        print(f"{PROG}: error: --hosts: the emulated hosts failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running program was stopped", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated; the running program was stopped", file=sys.stderr)
        return 143
    return print_report(doc, opts.json)
