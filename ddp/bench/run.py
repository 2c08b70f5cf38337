"""Running one program: its command line and environment, the process tree it
starts (stopped whole on a timeout or an interrupt), and its measurement."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import time
from dataclasses import dataclass

from ..benchloops import LR, gemm_flops
from ..proc import stop_tree
from ..threads import thread_env
from .options import PY, Options, base_program, layers_text

SGEMM_MAX_SETS, SGEMM_MAX_WARMUP = 50, 5


@dataclass
class Process:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


class RunFailed(Exception):
    pass


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_process(cmd: list[str], env: dict, timeout: float) -> Process:
    """Run cmd in a session of its own; on timeout, Ctrl-C or SIGTERM stop it and every
    process it started (the interrupt is re-raised)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Process(proc.returncode, out, err, time.perf_counter() - t0)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        out, err = _drain(proc)
        return Process(proc.returncode, out, err, time.perf_counter() - t0, timed_out=True)
    except BaseException:
        stop_tree(proc, grace=1.0)
        _drain(proc)
        raise


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
    """What a stopped process wrote, unless something it started still holds the pipes."""
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return "", "(no output: a process it started still holds its pipes)"


# --- the command of each program ---------------------------------------------------------


def run_env(ranks: int, opts: Options) -> dict:
    """This environment with the BLAS threads of `ranks` ranks set for every library."""
    env = dict(os.environ)
    env.update(thread_env(opts.threads_per_rank(ranks)), PYTHONUNBUFFERED="1")
    return env


def _loop_args(layers, ranks: int, opts: Options) -> list[str]:
    """The flags of the reference loops (ddp.benchloops)."""
    return ["--layers", layers_text(layers), "--batch", str(opts.batch), "--steps", str(opts.steps),
            "--warmup", str(opts.warmup), "--threads", str(opts.threads_per_rank(ranks))]


def _train_args(layers, ranks: int, opts: Options, summary: str, extra: tuple[str, ...]) -> list[str]:
    """ddp-train's flags for the same job as the loops', then `extra`. Its steady rate
    starts after min(20, total/5) steps: with the default --warmup 20 that is exactly
    the loops' warm-up."""
    # the loops' plain SGD, unless the extra flags pick another optimizer (--momentum is sgd's)
    momentum = ["--momentum", "0"] if _optimizer(extra) == "sgd" else []
    return ["--data", f"random:{opts.samples}", "--layers", layers_text(layers),
            "--batch-size", str(opts.batch), "--steps", str(opts.warmup + opts.steps), *momentum,
            "--lr", str(LR), "--dtype", "float32", "--progress", "never", "--summary-json", summary,
            "--threads", str(opts.threads_per_rank(ranks)), *extra]


def _optimizer(train_args: list[str]) -> str:
    """The --optimizer that ddp-train's extra flags choose (the last one given), or sgd."""
    chosen = "sgd"
    for i, arg in enumerate(train_args):
        if arg == "--optimizer" and i + 1 < len(train_args):
            chosen = train_args[i + 1]
        elif arg.startswith("--optimizer="):
            chosen = arg.split("=", 1)[1]
    return chosen


def command(name: str, layers: tuple[int, ...], ranks: int, opts: Options, summary: str,
            hosts=None) -> list[str]:
    """The command line that runs program `name` (ddp:NAME: a variant of ddp) at these
    layers and ranks; the MPI programs across `hosts` (EmulatedHosts) if given."""
    loop = _loop_args(layers, ranks, opts)
    program = base_program(name)

    def mpi(argv: list[str]) -> list[str]:
        # 1 rank runs under `mpirun -n 1` too, ddp-train included, so every MPI program
        # starts alike (against a plain process it made no difference beyond the noise)
        return hosts.command(ranks, argv) if hosts else [*opts.mpirun, "-n", str(ranks), *argv]

    if program == "limit":
        return mpi([PY, "-m", "ddp.benchloops", "lean", "--no-comm", *loop])
    if program == "lean":
        return mpi([PY, "-m", "ddp.benchloops", "lean", *loop])
    if program == "ddp":
        return mpi([PY, "-m", "ddp", "train",
                    *_train_args(layers, ranks, opts, summary, opts.train_flags(name))])
    if program == "zmq":
        return [PY, "-m", "ddp", "train", "--backend", "zmq", "--workers", str(ranks),
                *_train_args(layers, ranks, opts, summary, opts.train_args)]
    if program == "torch":
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                "-m", "ddp.benchloops", "torch", *loop]
    if program == "sgemm":
        return [PY, "-m", "ddp.benchloops", "sgemm", "--layers", layers_text(layers),
                "--batch", str(opts.batch), "--steps", str(min(opts.steps, SGEMM_MAX_SETS)),
                "--warmup", str(min(opts.warmup, SGEMM_MAX_WARMUP)),
                "--threads", str(opts.threads_per_rank(ranks))]
    raise AssertionError(program)


# --- what a finished run measured -----------------------------------------------------


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def read_result(program: str, stdout: str, summary_path: str) -> dict:
    """The measurement of a finished run: a JSON line from the loops, or ddp-train's summary."""
    if program in ("ddp", "zmq"):
        result = _train_result(program, summary_path)
    else:
        result = loop_result(stdout)
    if not _positive(result.get("samples_per_second")):
        raise RunFailed(f"bad samples_per_second: {result.get('samples_per_second')!r}")
    return result


def _train_result(program: str, summary_path: str) -> dict:
    """ddp-train's --summary-json: its steady-state rate and what the table shows of it."""
    try:
        with open(summary_path) as fh:
            summary = json.load(fh)
    except (OSError, ValueError) as e:
        raise RunFailed(f"no summary JSON from ddp-train: {e}")
    steady = summary.get("steady") or {}
    result = {
        "samples_per_second": steady.get("samples_per_second") or summary.get("samples_per_second"),
        "steady_from_step": steady.get("from_step"),
        "steady_steps": steady.get("steps"),
        "samples_per_second_all_steps": summary.get("samples_per_second"),
        "world_size": summary.get("world_size"),
        "threads_per_rank": summary.get("threads_per_rank"),
        "final_loss": summary.get("final_loss"),
    }
    if program == "ddp":
        result["allreduce_fraction"] = summary.get("allreduce_fraction")
        result["exchange"] = summary.get("exchange")
    else:
        result["bytes_per_step"] = summary.get("bytes_per_step")
    return result


def loop_result(stdout: str, key: str = "samples_per_second") -> dict:
    """The last JSON line on stdout that holds `key`."""
    for line in reversed(stdout.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and key in record:
            return record
    raise RunFailed("no JSON result line on stdout")


def failure(proc: Process, timeout: float) -> str | None:
    """Why a run that did not exit 0 failed, in one line; None if it did."""
    if proc.timed_out:
        return f"timed out after {timeout:g} s" + \
            (f"; last stderr: {last_line(proc.stderr)}" if last_line(proc.stderr) else "")
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {last_line(proc.stderr) or last_line(proc.stdout) or '(no output)'}"
    return None


def run_program(name: str, layers, ranks: int, opts: Options, tmpdir: str, tag: str,
                hosts=None) -> dict:
    """Run program `name` once (across `hosts`, EmulatedHosts, if given); its record:
    the command, exit, wall time, the bytes every host sent and received, and, if it
    succeeded, its rates (else `ok` False and the `error`)."""
    summary_path = os.path.join(tmpdir, f"{tag}.json")
    cmd = command(name, layers, ranks, opts, summary_path, hosts)
    program = base_program(name)
    record = {"program": name, "layers": list(layers), "ranks": ranks,
              "threads_per_rank_env": opts.threads_per_rank(ranks), "command": shlex.join(cmd)}
    before = hosts.counters() if hosts else None
    proc = run_process(cmd, run_env(ranks, opts), opts.timeout)
    record.update(returncode=proc.returncode, wall_seconds=proc.seconds)
    if hosts:
        record["host_bytes"] = hosts.bytes_since(before)
    error = failure(proc, opts.timeout)
    if error is None:
        try:
            record["result"] = read_result(program, proc.stdout, summary_path)
        except RunFailed as e:
            error = f"{e}; last stderr: {last_line(proc.stderr)}"
    if error is not None:
        record.update(ok=False, error=error)
        return record
    record["ok"] = True
    record["samples_per_second"] = record["result"]["samples_per_second"]
    if program == "ddp":   # the GEMM rate ddp-train achieves: FLOPs of a step × steps/s
        record["gemm_flops_per_second"] = gemm_flops(list(layers), opts.batch) * \
            record["samples_per_second"] / opts.batch
    if program == "sgemm":
        record["flops_per_second"] = record["result"]["flops_per_second"]
    return record
