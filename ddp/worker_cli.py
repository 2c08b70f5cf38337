"""ddp-worker: join a job served by a ZeroMQ coordinator (the service is worker.service)."""
from __future__ import annotations

import argparse
import json

from . import __version__
from .command import console_script, exit_code
from .config import command_parser
from .errors import EXIT_OK, EXIT_SIGNAL_BASE, UsageError
from .log import Log
from .model import quiet_float_warnings
from .threads import limit_threads
from .validation import MAX_THREADS

PROG = "ddp-worker"

WORKER_DESCRIPTION = """\
Join a ddp-train job served by a ZeroMQ coordinator (ddp-coordinator, or
ddp-train --backend zmq --bind ...): receive the job description, load the same
data (its content must match the coordinator's), then compute the gradient sums
of the rows the coordinator hands out each step. Ctrl-C or SIGTERM leaves
cleanly; if the coordinator goes away the worker reconnects by itself.

Exit codes: 0 the job finished or the coordinator stopped; 1 internal error;
2 bad input, refused by the coordinator, or keys rejected; 5 no coordinator
answered within --retry-for; 128+N left on signal N."""


def _parser():
    p = command_parser(PROG, WORKER_DESCRIPTION)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the coordinator's endpoint, e.g. tcp://10.0.0.5:5555")
    p.add_argument("--curve-secret", metavar="FILE", help="this worker's secret key (from ddp-keygen)")
    p.add_argument("--server-key", metavar="FILE", help="the coordinator's public key (coordinator.key)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="BLAS threads (default: this worker's share of the host's cores: "
                        "cores ÷ the workers the coordinator knows on this host)")
    p.add_argument("--retry-for", type=_positive_float, metavar="SECONDS",
                   help="give up (exit 5) when no coordinator answers for this long (default: never)")
    p.add_argument("--status", action="store_true",
                   help="print the coordinator's status as JSON and exit, instead of joining")
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    return p


def run_worker(argv: list[str] | None = None) -> int:
    """ddp-worker with `argv` (default: sys.argv[1:]); returns the exit code."""
    from .signals import StopRequest

    parser = _parser()
    stop = StopRequest()
    quiet_float_warnings()
    try:
        args = parser.parse_args(argv)
        if args.threads is not None and not 0 < args.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
        from ddp.worker.connection import load_keys, query_status
        from ddp.worker.service import WorkerService

        keys = load_keys(args.curve_secret, args.server_key)
        if args.status:
            print(json.dumps(query_status(args.connect, keys), indent=2, sort_keys=True), flush=True)
            return EXIT_OK
        log = Log(0, PROG, level="warning" if args.quiet else "info")
        _, source = limit_threads(args.threads, 1, log.warn, noun="worker")
        # the host's cores until the coordinator says how many workers share them, unless
        # --threads or OMP_NUM_THREADS (or the like) fixed the count
        pinned = source == "--threads" or "=" in source  # "--threads" or "OMP_NUM_THREADS=2"
        stop.install(deferred=True)  # the service's loop checks it at every turn
        return WorkerService(args.connect, log, stop, keys, args.retry_for, pinned).run()
    except KeyboardInterrupt:
        return EXIT_SIGNAL_BASE + 2
    except BaseException as e:
        return exit_code(PROG, e)
    finally:
        stop.restore()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


worker_main = console_script(run_worker)
