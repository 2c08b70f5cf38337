"""ddp-bench's flags: the parser, their checks, and the Options every other part reads."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
from dataclasses import dataclass

from .. import __version__
from ..benchloops import parse_layers
from ..config import _Parser
from ..errors import UsageError
from ..threads import choose_threads

PROG = "ddp-bench"
PY = sys.executable
PROGRAMS = ("limit", "lean", "ddp", "torch", "zmq", "sgemm")
DEFAULT_LAYERS = ((784, 256, 10), (784, 1024, 1024, 10))

# --help: what the programs are and how to read the table
DESCRIPTION = """\
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


@dataclass(frozen=True)
class Options:
    """What to run (programs × layers × ranks, repeats times) and how (batch, steps,
    threads, launcher, timeout), and how to report it."""

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

    def threads_per_rank(self, ranks: int) -> int:
        """BLAS threads each rank of every program runs: --threads, else this host's
        cores ÷ ranks. The environment has no say: every program gets the same count."""
        return choose_threads(self.threads, ranks, env={})[0]


def layers_text(layers) -> str:
    """Layer sizes as --layers takes them: 784,256,10."""
    return ",".join(map(str, layers))


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
    """The checked Options of argv; UsageError (one line, like the parser's own) if
    a value is out of range or a program cannot be started."""
    args = build_parser().parse_args(argv)
    try:
        return _options(args)
    except UsageError as e:
        raise UsageError(f"{e} (see --help)") from None


def _options(args: argparse.Namespace) -> Options:
    _check_numbers(args)
    ranks = tuple(dict.fromkeys(args.ranks))
    if args.batch < max(ranks):
        raise UsageError(f"--batch {args.batch} is smaller than {max(ranks)} ranks: every rank needs a sample")
    programs = tuple(p for p in PROGRAMS if p in args.programs)   # canonical order
    if ("ddp" in programs or "zmq" in programs) and args.samples < args.batch:
        raise UsageError(f"--samples {args.samples} is smaller than --batch {args.batch}")
    train_args, mpirun = _split_commands(args)
    if {"limit", "lean", "ddp"} & set(programs):
        _check_mpirun(mpirun)
    layers = tuple(dict.fromkeys(tuple(l) for l in args.layers)) if args.layers else DEFAULT_LAYERS
    return Options(ranks=ranks, layers=layers, batch=args.batch, steps=args.steps,
                   warmup=args.warmup, repeats=args.repeats, samples=args.samples,
                   programs=programs, train_args=train_args, mpirun=mpirun,
                   timeout=args.timeout, json=args.json, quiet=args.quiet, threads=args.threads)


def _check_numbers(args: argparse.Namespace) -> None:
    for name, low in (("batch", 1), ("steps", 1), ("warmup", 0), ("repeats", 1), ("samples", 1)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name} must be ≥ {low}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {args.threads}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")


def _split_commands(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(--train-args, --mpirun) as argument lists; mpirun defaults to the one found."""
    try:
        train_args = tuple(shlex.split(args.train_args))
        mpirun = tuple(shlex.split(args.mpirun)) if args.mpirun is not None else ()
    except ValueError as e:
        raise UsageError(f"cannot split --train-args/--mpirun: {e}")
    if args.mpirun is None:
        found = _default_mpirun()
        mpirun = (found,) if found else ()
    return train_args, mpirun


def _check_mpirun(mpirun: tuple[str, ...]) -> None:
    if not mpirun:
        raise UsageError("no mpirun found: pip install mpich, or pass --mpirun CMD")
    if shutil.which(mpirun[0]) is None:
        raise UsageError(f"--mpirun: {mpirun[0]!r} not found")
