"""ddp-bench: how fast ddp-train trains, measured against what this machine allows.

For every (layers, ranks) it runs, each as its own subprocess and all at float32
on the same global batch split over the ranks, with cores ÷ ranks BLAS threads:

    limit  the lean loop without the Allreduce: R independent processes, the ceiling
    lean   the leanest numpy + mpi4py loop (one flat buffer, one Allreduce a step)
    ddp    ddp-train itself under mpirun, from its summary's steady-state rate
    torch  PyTorch DistributedDataParallel (gloo), if torch is installed
    zmq    ddp-train --backend zmq with R local workers
    sgemm  (1 rank) numpy's matrix products at the exact shapes of one step

Absolute rates drift on a shared machine, so the programs run alternated, in an
order rotated every repeat, and the table shows medians and, for the ratios, the
median of per-repeat quotients (ddp_i / lean_i of the same repeat), which
cancels most of the drift. The loops live in ddp.benchloops.

Exit codes: 0 every run succeeded; 1 a run failed or timed out (the table says
which, with its last line of stderr); 2 bad flags; 130 Ctrl-C; 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from . import __version__
from .benchloops import LR, gemm_flops, parse_layers
from .errors import UsageError
from .log import human_bytes

PROG = "ddp-bench"
PY = sys.executable
PROGRAMS = ("limit", "lean", "ddp", "torch", "zmq", "sgemm")
RATIOS = (("ddp/limit", "ddp", "limit"), ("ddp/lean", "ddp", "lean"),
          ("ddp/torch", "ddp", "torch"), ("zmq/ddp", "zmq", "ddp"))
GEMM_RATIO = "ddp/sgemm"   # ddp-train's achieved GEMM FLOP/s ÷ numpy's, at 1 rank
TORCH_NOTE = "torch not installed: pip install torch==2.13.0"
SGEMM_MAX_SETS, SGEMM_MAX_WARMUP = 50, 5
DEFAULT_LAYERS = ((784, 256, 10), (784, 1024, 1024, 10))

DESCRIPTION = (__doc__ or "").split("\n\n", 1)[-1]


# --- options ----------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    ranks: tuple[int, ...]
    layers: tuple[tuple[int, ...], ...]
    batch: int
    steps: int
    warmup: int
    repeats: int
    samples: int
    programs: tuple[str, ...]
    train_args: tuple[str, ...]
    mpirun: tuple[str, ...]
    timeout: float
    json: bool
    quiet: bool
    threads: int | None = None


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (UsageError), not the usage text."""

    def error(self, message):
        raise UsageError(message)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers like 1,2, got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"rank counts must be ≥ 1, got {text!r}")
    return values


def _programs(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in PROGRAMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown program {', '.join(map(repr, unknown)) or repr(text)}; choose from {','.join(PROGRAMS)}")
    return names


def _default_mpirun() -> str | None:
    """The mpirun installed beside this Python (the mpich wheel), else the one on PATH."""
    return shutil.which("mpirun", path=os.path.dirname(PY)) or shutil.which("mpirun")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--ranks", type=_int_list, default=[1, 2], metavar="R,R,...",
                   help="rank (and zmq worker) counts to measure (default: 1,2)")
    p.add_argument("--layers", type=parse_layers, action="append", metavar="N,N,...",
                   help="layer sizes; repeat for several models "
                        "(default: 784,256,10 and 784,1024,1024,10)")
    p.add_argument("--batch", type=int, default=256, help="global batch, split over the ranks (default: 256)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per run (default: 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before them (default: 20)")
    p.add_argument("--repeats", type=int, default=5, help="runs of every program (default: 5)")
    p.add_argument("--samples", type=int, default=8192,
                   help="ddp-train's dataset, random:N; a multiple of --batch keeps every batch full "
                        "(default: 8192)")
    p.add_argument("--programs", type=_programs, default=list(PROGRAMS), metavar="P,P,...",
                   help=f"which to run, from {','.join(PROGRAMS)} (default: all)")
    p.add_argument("--train-args", default="", metavar="'FLAGS'",
                   help="extra ddp-train flags for the ddp and zmq runs, e.g. '--bucket-mb 4'")
    p.add_argument("--mpirun", metavar="CMD", help="MPI launcher, may include flags "
                   "(default: the mpirun beside this Python, else on PATH)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="BLAS threads per rank for every program (default: cores ÷ ranks)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default: 600)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (machine, options, every run, medians, ratios)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def parse_options(argv: list[str] | None) -> Options:
    args = build_parser().parse_args(argv)
    for name, low in (("batch", 1), ("steps", 1), ("warmup", 0), ("repeats", 1), ("samples", 1)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name} must be ≥ {low}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {args.threads}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    ranks = tuple(dict.fromkeys(args.ranks))
    if args.batch < max(ranks):
        raise UsageError(f"--batch {args.batch} is smaller than {max(ranks)} ranks: every rank needs a sample")
    programs = tuple(p for p in PROGRAMS if p in args.programs)   # canonical order
    if ("ddp" in programs or "zmq" in programs) and args.samples < args.batch:
        raise UsageError(f"--samples {args.samples} is smaller than --batch {args.batch}")
    try:
        train_args = tuple(shlex.split(args.train_args))
        mpirun = tuple(shlex.split(args.mpirun)) if args.mpirun is not None else ()
    except ValueError as e:
        raise UsageError(f"cannot split --train-args/--mpirun: {e}")
    if args.mpirun is None:
        found = _default_mpirun()
        mpirun = (found,) if found else ()
    if {"limit", "lean", "ddp"} & set(programs):
        if not mpirun:
            raise UsageError("no mpirun found: pip install mpich, or pass --mpirun CMD")
        if shutil.which(mpirun[0]) is None:
            raise UsageError(f"--mpirun: {mpirun[0]!r} not found")
    layers = tuple(dict.fromkeys(tuple(l) for l in args.layers)) if args.layers else DEFAULT_LAYERS
    return Options(ranks=ranks, layers=layers, batch=args.batch, steps=args.steps,
                   warmup=args.warmup, repeats=args.repeats, samples=args.samples,
                   programs=programs, train_args=train_args, mpirun=mpirun,
                   timeout=args.timeout, json=args.json, quiet=args.quiet, threads=args.threads)


# --- the machine ------------------------------------------------------------------


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(ranks: int, fixed: int | None = None) -> int:
    """BLAS threads each rank runs: `fixed` (--threads), else this host's cores ÷ ranks."""
    return fixed or max(1, cores() // ranks)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _first_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


# Run in a subprocess: importing mpi4py or torch here would tie this process to them.
_PROBE = r"""
import json, sys
info = {}
import numpy, threadpoolctl
info["numpy"] = numpy.__version__
info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "threading_layer",
                                        "num_threads", "filepath")}
                for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
try:
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    info["mpi4py"] = mpi4py.__version__
    info["mpi"] = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
except Exception as e:
    info["mpi"] = None
    info["mpi_error"] = f"{type(e).__name__}: {e}"
try:
    import torch
    info["torch"] = torch.__version__
except Exception as e:
    info["torch"] = None
    info["torch_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(info))
"""


def machine_info(timeout: float) -> dict:
    cpuinfo, meminfo = _read("/proc/cpuinfo"), _read("/proc/meminfo")
    mem_kib = _first_field(meminfo, "MemTotal")
    info = {
        "cpu": _first_field(cpuinfo, "model name") or platform.processor() or platform.machine(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ddp_train": __version__,
    }
    result = run_process([PY, "-c", _PROBE], env=dict(os.environ), timeout=min(timeout, 120))
    try:
        info.update(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        info.update({"numpy": None, "blas": [], "mpi": None, "torch": None,
                     "probe_error": last_line(result.stderr) or f"exit {result.returncode}"})
    return info


def machine_line(m: dict) -> str:
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, "
                     f"{b.get('threading_layer')})" for b in m.get("blas") or []) or "BLAS unknown"
    torch = f"torch {m['torch']}" if m.get("torch") else "torch not installed"
    mem = f"{m['memory_gib']} GiB" if m.get("memory_gib") else "memory unknown"
    return (f"machine: {m['cpu']}, {m['cores']} cores, {mem}; numpy {m.get('numpy')}, {blas}; "
            f"{m.get('mpi') or 'MPI unavailable'}; Python {m['python']}; {torch}")


# --- running one program ------------------------------------------------------------


@dataclass
class Process:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid: mpirun's proxy starts the ranks in sessions of
    their own, so killing mpirun's process group does not reach them."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: only the process group is reached
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM the process, its group and all its descendants (ddp-train then cleans up
    and exits); SIGKILL whatever is left after `grace` seconds. A second Ctrl-C or
    SIGTERM meanwhile waits until this is done, so it cannot leave ranks behind."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        _stop_tree(proc, grace)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _stop_tree(proc: subprocess.Popen, grace: float) -> None:
    victims = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _signal_all(victims, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    victims += descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _signal_all(victims, signal.SIGKILL)


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


class RunFailed(Exception):
    pass


def run_env(ranks: int, fixed: int | None = None) -> dict:
    threads = str(threads_per_rank(ranks, fixed))
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONUNBUFFERED="1")
    return env


def command(program: str, layers: tuple[int, ...], ranks: int, opts: Options, summary: str) -> list[str]:
    spec = ",".join(map(str, layers))
    threads = str(threads_per_rank(ranks, opts.threads))
    loop = ["--layers", spec, "--batch", str(opts.batch), "--steps", str(opts.steps),
            "--warmup", str(opts.warmup), "--threads", threads]
    # 1 rank runs under `mpirun -n 1` too, ddp-train included, so every MPI program starts
    # alike (against a plain process it made no difference beyond the run-to-run noise)
    mpirun = [*opts.mpirun, "-n", str(ranks)]
    # ddp-train's steady rate starts after min(20, total/5) steps: with the default
    # --warmup 20 that is exactly the loops' warm-up
    train = ["--data", f"random:{opts.samples}", "--layers", spec, "--batch-size", str(opts.batch),
             "--steps", str(opts.warmup + opts.steps), "--momentum", "0", "--lr", str(LR),
             "--dtype", "float32", "--progress", "never", "--summary-json", summary,
             "--threads", threads, *opts.train_args]
    if program == "limit":
        return [*mpirun, PY, "-m", "ddp.benchloops", "lean", "--no-comm", *loop]
    if program == "lean":
        return [*mpirun, PY, "-m", "ddp.benchloops", "lean", *loop]
    if program == "ddp":
        return [*mpirun, PY, "-m", "ddp", "train", *train]
    if program == "zmq":
        return [PY, "-m", "ddp", "train", "--backend", "zmq", "--workers", str(ranks), *train]
    if program == "torch":
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                "-m", "ddp.benchloops", "torch", *loop]
    if program == "sgemm":
        return [PY, "-m", "ddp.benchloops", "sgemm", "--layers", spec, "--batch", str(opts.batch),
                "--steps", str(min(opts.steps, SGEMM_MAX_SETS)),
                "--warmup", str(min(opts.warmup, SGEMM_MAX_WARMUP)), "--threads", threads]
    raise AssertionError(program)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def read_result(program: str, stdout: str, summary_path: str) -> dict:
    """The measurement of a finished run: a JSON line from the loops, or ddp-train's summary."""
    if program in ("ddp", "zmq"):
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
    else:
        result = None
        for line in reversed(stdout.splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "samples_per_second" in record:
                result = record
                break
        if result is None:
            raise RunFailed("no JSON result line on stdout")
    if not _positive(result.get("samples_per_second")):
        raise RunFailed(f"bad samples_per_second: {result.get('samples_per_second')!r}")
    return result


def run_program(program: str, layers, ranks: int, opts: Options, tmpdir: str, tag: str) -> dict:
    summary_path = os.path.join(tmpdir, f"{tag}.json")
    cmd = command(program, layers, ranks, opts, summary_path)
    record = {"program": program, "layers": list(layers), "ranks": ranks,
              "threads_per_rank_env": threads_per_rank(ranks, opts.threads), "command": shlex.join(cmd)}
    proc = run_process(cmd, run_env(ranks, opts.threads), opts.timeout)
    record.update(returncode=proc.returncode, wall_seconds=proc.seconds)
    if proc.timed_out:
        record.update(ok=False, error=f"timed out after {opts.timeout:g} s"
                      + (f"; last stderr: {last_line(proc.stderr)}" if last_line(proc.stderr) else ""))
        return record
    if proc.returncode != 0:
        record.update(ok=False, error=f"exit {proc.returncode}: "
                      f"{last_line(proc.stderr) or last_line(proc.stdout) or '(no output)'}")
        return record
    try:
        record["result"] = read_result(program, proc.stdout, summary_path)
    except RunFailed as e:
        record.update(ok=False, error=f"{e}; last stderr: {last_line(proc.stderr)}")
        return record
    record["ok"] = True
    record["samples_per_second"] = record["result"]["samples_per_second"]
    if program == "ddp":   # the GEMM rate ddp-train achieves: FLOPs of a step × steps/s
        record["gemm_flops_per_second"] = gemm_flops(list(layers), opts.batch) * \
            record["samples_per_second"] / opts.batch
    if program == "sgemm":
        record["flops_per_second"] = record["result"]["flops_per_second"]
    return record


# --- the schedule -------------------------------------------------------------------


def programs_for(ranks: int, programs: tuple[str, ...]) -> list[str]:
    return [p for p in programs if p != "sgemm" or ranks == 1]


def rotated(items: list, k: int) -> list:
    """The order of repeat k: shifted by k, so each program takes every slot in turn."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def schedule(opts: Options, skipped: dict) -> list[tuple[int, tuple[int, ...], int, str]]:
    """(repeat, layers, ranks, program) in the order they run."""
    jobs = []
    for repeat in range(opts.repeats):
        for layers in opts.layers:
            for ranks in opts.ranks:
                todo = [p for p in programs_for(ranks, opts.programs) if p not in skipped]
                jobs += [(repeat, layers, ranks, p) for p in rotated(todo, repeat)]
    return jobs


# --- medians and ratios -------------------------------------------------------------


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def ratio_stats(by_repeat_a: dict[int, float], by_repeat_b: dict[int, float]) -> dict:
    """Both views of a / b: the quotient of the medians, and the median of the per-repeat
    quotients (the pairs ran next to each other, so they share the machine's drift)."""
    pairs = [by_repeat_a[r] / by_repeat_b[r] for r in sorted(by_repeat_a)
             if r in by_repeat_b and by_repeat_b[r]]
    return {"of_medians": _ratio(_median(list(by_repeat_a.values())), _median(list(by_repeat_b.values()))),
            "pairwise": _median(pairs), "pairs": pairs}


def summarize(runs: list[dict], opts: Options, skipped: dict) -> list[dict]:
    combos = []
    for layers in opts.layers:
        for ranks in opts.ranks:
            mine = [r for r in runs if tuple(r["layers"]) == layers and r["ranks"] == ranks]

            def values(program: str, key: str = "samples_per_second") -> dict[int, float]:
                return {r["repeat"]: r[key] for r in mine
                        if r["program"] == program and r["ok"] and r.get(key) is not None}

            programs = {}
            for p in programs_for(ranks, opts.programs):
                of_p = [r for r in mine if r["program"] == p]
                entry = {"runs": sum(r["ok"] for r in of_p), "failed": sum(not r["ok"] for r in of_p),
                         "samples_per_second": _median(list(values(p).values()))}
                if p in skipped:
                    entry["skipped"] = skipped[p]
                if p == "ddp":
                    entry["allreduce_fraction"] = _median(
                        [r["result"].get("allreduce_fraction") for r in of_p if r["ok"]])
                    entry["gemm_flops_per_second"] = _median(list(values(p, "gemm_flops_per_second").values()))
                if p == "zmq":
                    entry["bytes_per_step"] = _median([r["result"].get("bytes_per_step") for r in of_p if r["ok"]])
                if p == "sgemm":
                    entry["flops_per_second"] = _median(list(values(p, "flops_per_second").values()))
                    entry["flops_per_second_1thread"] = _median(
                        [r["result"].get("flops_per_second_1thread") for r in of_p if r["ok"]])
                programs[p] = entry
            ratios = {name: ratio_stats(values(a), values(b)) for name, a, b in RATIOS
                      if a in programs and b in programs}
            if ranks == 1 and "ddp" in programs and "sgemm" in programs:
                ratios[GEMM_RATIO] = ratio_stats(values("ddp", "gemm_flops_per_second"),
                                                 values("sgemm", "flops_per_second"))
            combos.append({"layers": list(layers), "ranks": ranks,
                           "threads_per_rank": threads_per_rank(ranks, opts.threads),
                           "gemm_flops_per_step": gemm_flops(list(layers), opts.batch),
                           "programs": programs, "ratios": ratios})
    return combos


# --- the table ------------------------------------------------------------------------


def _spec(layers) -> str:
    return ",".join(map(str, layers))


def _rate_cell(entry: dict) -> str:
    if "skipped" in entry:
        return "skipped"
    if entry["samples_per_second"] is None:
        return "failed"
    cell = f"{entry['samples_per_second']:,.0f}"
    return cell + (f" ({entry['failed']} failed)" if entry["failed"] else "")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)



def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def format_table(doc: dict) -> str:
    opts, combos = doc["options"], doc["combinations"]
    shown = [p for p in PROGRAMS if p in opts["programs"] and p != "sgemm"]
    ratios = [name for name, a, b in RATIOS if a in shown and b in shown]
    out = [f"ddp-bench {doc['version']}: samples/s, median of {opts['repeats']} runs; ratios: median of "
           f"per-repeat pairs (a_i / b_i, same repeat). float32, global batch {opts['batch']}, "
           f"{opts['steps']} timed steps after {opts['warmup']} warm-up, "
           + (f"BLAS threads per rank = {opts['threads']}." if opts.get("threads") else
              f"BLAS threads per rank = {doc['machine']['cores']} cores ÷ ranks."), ""]
    if shown:
        out.append(_row(["layers", "ranks", *shown, *ratios]))
        out.append(_row(["---"] * (2 + len(shown) + len(ratios))))
        for c in combos:
            cells = [_spec(c["layers"]), str(c["ranks"])]
            cells += [_rate_cell(c["programs"][p]) for p in shown]
            cells += [_num(c["ratios"][name]["pairwise"], ".2f") for name in ratios]
            out.append(_row(cells))
        out.append("")
    ones = [c for c in combos if c["ranks"] == 1 and "sgemm" in c["programs"]]
    if ones:
        t = ones[0]["threads_per_rank"]
        plural = "s" * (t > 1)
        one_thread = t != 1  # at 1 thread the two sgemm columns would be one twice
        header = ["layers", "GEMM GFLOP/step", f"numpy sgemm GFLOP/s ({t} thread{plural})"]
        header += ["numpy sgemm GFLOP/s (1 thread)"] * one_thread
        with_ddp = "ddp" in ones[0]["programs"]
        if with_ddp:
            header += [f"ddp-train GEMM GFLOP/s ({t} thread{plural})", "ddp-train/numpy"]
        out += ["GEMMs of one step at 1 rank (forward a·W, dW = aᵀ·δ, δ·Wᵀ; 2·m·n·k FLOPs): "
                "numpy alone vs. achieved inside ddp-train (FLOPs per step × steps/s).", "",
                _row(header), _row(["---"] * len(header))]
        for c in ones:
            sg = c["programs"]["sgemm"]
            cells = [_spec(c["layers"]), f"{c['gemm_flops_per_step'] / 1e9:.3g}",
                     _num(sg["flops_per_second"] and sg["flops_per_second"] / 1e9, ".1f")]
            if one_thread:
                cells.append(_num(sg["flops_per_second_1thread"] and sg["flops_per_second_1thread"] / 1e9,
                                  ".1f"))
            if with_ddp:
                dd = c["programs"]["ddp"]["gemm_flops_per_second"]
                cells += [_num(dd and dd / 1e9, ".1f"), _num(c["ratios"][GEMM_RATIO]["pairwise"], ".2f")]
            out.append(_row(cells))
        out.append("")
    if "ddp" in shown:
        parts = [f"{_spec(c['layers'])} ×{c['ranks']} {_num(c['programs']['ddp']['allreduce_fraction'], '.1%')}"
                 for c in combos]
        out.append("ddp-train gradient exchange, share of step time: " + "; ".join(parts))
    if "zmq" in shown:
        parts = [f"{_spec(c['layers'])} ×{c['ranks']} {human_bytes(c['programs']['zmq']['bytes_per_step'], '-')}"
                 for c in combos]
        out.append("zmq bytes per step (sent + received by the coordinator): " + "; ".join(parts))
    for note in doc["skipped"].values():
        out.append(f"note: {note}")
    failures = [r for r in doc["runs"] if not r["ok"]]
    for r in failures:
        out.append(f"failed: {r['program']} {_spec(r['layers'])} ×{r['ranks']} "
                   f"(repeat {r['repeat'] + 1}): {r['error']}")
    out.append(machine_line(doc["machine"]))
    return "\n".join(out)


# --- main -------------------------------------------------------------------------------


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _progress(opts: Options, text: str) -> None:
    if not opts.quiet:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def run_bench(opts: Options) -> dict:
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
            what = f"[{i + 1}/{len(jobs)}] repeat {repeat + 1} {program:<5} {_spec(layers)} ×{ranks}:"
            if record["ok"]:
                _progress(opts, f"{what} {record['samples_per_second']:,.0f} samples/s "
                                f"({record['wall_seconds']:.1f} s)")
            else:
                _progress(opts, f"{what} FAILED: {record['error']}")
    options = asdict(opts)
    return {"version": __version__, "machine": machine, "options": options, "skipped": skipped,
            "runs": runs, "combinations": summarize(runs, opts, skipped),
            "failed_runs": sum(not r["ok"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e} (see --help)", file=sys.stderr)
        return 2
    except SystemExit as e:   # --help, --version
        return int(e.code or 0)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:   # not the main thread: leave SIGTERM alone
        previous = None
    try:
        doc = run_bench(opts)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the running program was stopped", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated; the running program was stopped", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if opts.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(doc))
    return 1 if doc["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
