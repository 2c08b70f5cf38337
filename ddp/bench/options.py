"""ddp-bench's flags: the parser, their checks, and the Options every other part reads."""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass

from .. import __version__
from ..benchloops import parse_layers
from ..cluster import parse_link
from ..config import _Parser
from ..errors import UsageError
from ..threads import choose_threads

PROG = "ddp-bench"
PY = sys.executable
PROGRAMS = ("limit", "lean", "ddp", "torch", "zmq", "sgemm")
ACROSS_HOSTS = ("limit", "lean", "ddp")   # the MPI programs, which --hosts spreads
MAX_HOSTS = 250                            # the emulated cluster's subnet holds no more
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
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

With --variant NAME='FLAGS' (repeatable) ddp runs once per variant, as its own
program ddp:NAME in the same rotated schedule, with FLAGS after --train-args; the
ratios compare each variant with the other programs and with the first variant.

With --hosts K (needs root: it makes K network namespaces, removed when it ends)
limit, lean and ddp run with their ranks spread evenly over K emulated hosts on
this machine, each behind a link shaped as --link says (they still share this
machine's cores); torch, zmq and sgemm are skipped, saying why. Before the runs it
measures the link with a rank on each of 2 hosts: α, the time of an 8-byte
Allreduce, and the bandwidth bytes ÷ time of an 8 MiB and a gradient-sized one
(a ring Allreduce of N ranks sends 2·(N−1)/N·bytes per rank each way, at N = 2
the bytes themselves). The document records the bytes every host sent per run.

Exit codes: 0 every run succeeded; 1 a run failed or timed out (the table says
which, with its last line of stderr); 2 bad flags, or emulated hosts cannot be
made here; 130 Ctrl-C; 143 SIGTERM.
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
    hosts: int | None = None                  # emulated hosts the MPI programs spread over
    link: str | None = None                   # their links, as parse_link reads them
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (name, ddp-train flags)

    def threads_per_rank(self, ranks: int) -> int:
        """BLAS threads each rank of every program runs: --threads, else this host's
        cores ÷ ranks (emulated hosts share them too). The environment has no say:
        every program gets the same count."""
        return choose_threads(self.threads, ranks, env={})[0]

    def names(self) -> list[str]:
        """The programs as they run and are reported (ddp as ddp:NAME per variant)."""
        return program_names(self.programs, [name for name, _ in self.variants])

    def train_flags(self, name: str) -> tuple[str, ...]:
        """The extra ddp-train flags of program `name`: --train-args, then its variant's."""
        variant = name.partition(":")[2]
        return self.train_args + dict(self.variants).get(variant, ())


def program_names(programs, variants) -> list[str]:
    """`programs` with ddp replaced by ddp:NAME for each variant name, if any."""
    names = []
    for p in programs:
        names += [f"ddp:{v}" for v in variants] if p == "ddp" and variants else [p]
    return names


def base_program(name: str) -> str:
    """The program a reported name runs: ddp for ddp:NAME."""
    return name.partition(":")[0]


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
    p.add_argument("--ranks", type=_int_list, metavar="R,R,...",
                   help="rank (and zmq worker) counts to measure, in all (default: 1,2; "
                        "with --hosts K: K)")
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
    p.add_argument("--variant", action="append", default=[], metavar="NAME='FLAGS'",
                   help="run ddp once per variant, as program ddp:NAME with these extra flags "
                        "(repeatable; e.g. --variant 'one=--bucket-mb 0' --variant default=)")
    p.add_argument("--hosts", type=int, metavar="K",
                   help="spread the ranks of limit, lean and ddp evenly over K emulated hosts "
                        "(network namespaces: run as root); every --ranks a multiple of K")
    p.add_argument("--link", metavar="SPEC",
                   help="with --hosts: every host's link, e.g. 1gbit, 10gbit,0.5%% (loss), "
                        "unshaped (default)")
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
    ranks = tuple(dict.fromkeys(args.ranks or ([args.hosts] if args.hosts else [1, 2])))
    if args.batch < max(ranks):
        raise UsageError(f"--batch {args.batch} is smaller than {max(ranks)} ranks: every rank needs a sample")
    programs = tuple(p for p in PROGRAMS if p in args.programs)   # canonical order
    if ("ddp" in programs or "zmq" in programs) and args.samples < args.batch:
        raise UsageError(f"--samples {args.samples} is smaller than --batch {args.batch}")
    train_args, mpirun = _split_commands(args)
    if {"limit", "lean", "ddp"} & set(programs):
        _check_mpirun(mpirun)
    variants = _variants(args.variant, programs)
    link = _hosts(args, ranks, programs, mpirun)
    layers = tuple(dict.fromkeys(tuple(l) for l in args.layers)) if args.layers else DEFAULT_LAYERS
    return Options(ranks=ranks, layers=layers, batch=args.batch, steps=args.steps,
                   warmup=args.warmup, repeats=args.repeats, samples=args.samples,
                   programs=programs, train_args=train_args, mpirun=mpirun,
                   timeout=args.timeout, json=args.json, quiet=args.quiet, threads=args.threads,
                   hosts=args.hosts, link=link, variants=variants)


def _variants(texts: list[str], programs: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """--variant NAME='FLAGS' as (name, flags), names unique; only with the ddp program."""
    if texts and "ddp" not in programs:
        raise UsageError("--variant runs ddp-train variants: --programs must include ddp")
    variants = {}
    for text in texts:
        name, eq, flags = text.partition("=")
        if not eq or not _VARIANT_NAME.match(name):
            raise UsageError(f"--variant must look like NAME='FLAGS' (NAME of letters, digits, "
                             f"_ . -), got {text!r}")
        if name in variants:
            raise UsageError(f"--variant {name!r} is given twice")
        try:
            variants[name] = tuple(shlex.split(flags))
        except ValueError as e:
            raise UsageError(f"cannot split --variant {name}: {e}")
    return tuple(variants.items())


def _hosts(args: argparse.Namespace, ranks: tuple[int, ...], programs: tuple[str, ...],
           mpirun: tuple[str, ...]) -> str | None:
    """With --hosts: the link (its canonical text) after the checks of the placement."""
    if args.hosts is None:
        if args.link is not None:
            raise UsageError("--link shapes the links of emulated hosts: give --hosts K too")
        return None
    if not 2 <= args.hosts <= MAX_HOSTS:
        raise UsageError(f"--hosts must be in 2..{MAX_HOSTS} (a link joins two hosts), got {args.hosts}")
    link = parse_link(args.link if args.link is not None else "unshaped")
    uneven = [r for r in ranks if r % args.hosts]
    if uneven:
        raise UsageError(f"--ranks {uneven[0]} is not a multiple of --hosts {args.hosts}: "
                         "the ranks are spread evenly over the hosts")
    if not set(ACROSS_HOSTS) & set(programs):
        raise UsageError(f"--hosts runs {', '.join(ACROSS_HOSTS)} across the hosts: "
                         "--programs has none of them")
    if len(mpirun) != 1:
        raise UsageError("--hosts starts MPICH's mpiexec with the cluster's own flags: "
                         "--mpirun must be the command alone")
    return str(link)


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
