"""Entry points: ddp-train, ddp-coordinator, ddp-worker, ddp-keygen and ddp-predict.

Every error the user can cause ends as one line on stderr and a non-zero exit
(see ddp.errors for the codes); under mpirun exactly one rank prints it and
no rank is left waiting for the others.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from . import checkpoint as ckpt
from . import data as ddata
from . import __version__
from .config import MAX_COUNT, MAX_THREADS, Config, _Parser, build_parser, resolve
from .errors import (EXIT_INTERNAL, EXIT_OK, EXIT_SIGNAL_BASE, DDPError, OutputError, PeerError,
                     UsageError, missing_package)
from .files import check_output_target
from .log import Log, stamped
from .monitor import open_monitor
from .threads import choose_threads, host_cores, limit_threads
from .model import forward, loss_sum, quiet_float_warnings

TRAIN_DESCRIPTION = """\
Train a multilayer perceptron with minibatch SGD, data-parallel over the ranks
of `mpirun -n N ddp-train ...` (plain `ddp-train` is one process). Each rank
computes the gradient sums of its shard of every global batch; one Allreduce
per step makes them meet; every rank applies the same update.

Exit codes: 0 done; 1 internal error; 2 bad input; 3 loss became NaN/Inf
or exceeded --max-loss; 4 cannot write a checkpoint, model or summary; 128+N
interrupted by signal N before the last step (a checkpoint was written: run
the same command to resume).

With --backend zmq there is no MPI: this process becomes a ZeroMQ coordinator
and starts --workers worker processes (see ddp-coordinator, ddp-worker)."""

COORDINATOR_DESCRIPTION = """\
Run a training job as a ZeroMQ coordinator: it holds the model and the
optimizer, serves workers (ddp-worker --connect ENDPOINT) on --bind, cuts every
global batch into contiguous shards over the workers present, adds their
gradient sums and applies the SGD step. Workers may join, leave or die at any
time; a shard that was lost is recomputed, so the result is that of an
undisturbed run. Takes every training flag of ddp-train.

Exit codes: 0 done; 1 internal error; 2 bad input; 3 loss became NaN/Inf
or exceeded --max-loss; 4 cannot write a checkpoint, model or summary; 128+N
stopped by signal N before the last step (checkpoint written, workers told to
exit: run the same command to resume)."""


def _print_error(prog: str, err: BaseException, rank: int | None = None) -> None:
    where = f" (rank {rank})" if rank is not None else ""
    print(stamped(f"{prog}: error{where}: {err}"), file=sys.stderr, flush=True)


def _write_json(path: str, obj: dict) -> None:
    """Atomically and durably, as checkpoints are written."""
    check_output_target(path, "--summary-json", OutputError)  # it may have changed since the start

    def write(fh):
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")

    try:
        ckpt.atomic_write(path, write, binary=False)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}")


def run_train(argv: list[str] | None = None, comm=None, prog: str = "ddp-train") -> int:
    """ddp-train (and ddp-coordinator); returns the exit code. `comm` defaults to MPI
    (a world of one without mpirun); --backend zmq uses no MPI at all."""
    wall_start = time.perf_counter()
    quiet_float_warnings()
    from coordinator.mpi import LocalComm, launched_rank, launched_size, make_comm
    from coordinator.trainer import StopRequest, summary_text, train

    from .setup import prepare

    serving = prog == "ddp-coordinator"
    speaks = launched_rank() == 0 if comm is None else comm.rank == 0
    if serving:
        parser = build_parser(prog, COORDINATOR_DESCRIPTION, exclude=("backend",))
    else:
        parser = build_parser(prog, TRAIN_DESCRIPTION)
    if not speaks:  # --help and --version text once, not once per rank
        parser.print_help = lambda file=None: None
    cfg, error = None, None
    try:
        args = parser.parse_args(argv)
        if serving:
            args.backend = "zmq"
        cfg = resolve(args)
        if cfg.backend == "zmq":
            _check_zmq_run(cfg, prog, launched_size())
    except UsageError as e:
        error = e
    except SystemExit as e:  # --help
        return int(e.code or 0)

    if cfg is not None and cfg.backend == "zmq":
        comm = LocalComm()
    if comm is None:
        try:
            comm = make_comm()
        except DDPError as e:
            if speaks:
                _print_error(prog, e)
            return e.exit_code
    log = Log(comm.rank, prog, level="error" if cfg is not None and cfg.quiet else "info")
    stop = StopRequest()
    monitor = summary = None
    code = EXIT_INTERNAL
    try:
        # from here a signal ends the process at once (even inside a blocking read),
        # until the training loop defers it to the end of a step
        stop.install()
        comm.agree(error)
        zmq_workers = 0
        if cfg.backend == "zmq":
            zmq_workers = cfg.workers if cfg.workers is not None else (0 if serving else host_cores())
            threads, _ = limit_threads(cfg.threads, 1, log.warn, noun="coordinator")
            worker_threads, threads_from, _ = choose_threads(cfg.threads, zmq_workers, noun="worker")
        else:
            threads, threads_from = limit_threads(cfg.threads, comm.local_size, log.warn)
        error, setup, keys = None, None, None
        try:
            if cfg.backend == "zmq":
                from coordinator.access import preflight

                keys = preflight(cfg, log)
            setup = prepare(cfg)
            if comm.rank == 0:
                monitor = open_monitor(cfg, setup, cfg.backend, log, serving)
        except DDPError as e:
            error = e
        except ModuleNotFoundError as e:
            error = missing_package(e)
            if error is None:
                raise
        comm.agree(error)
        if cfg.backend == "zmq":
            who = (f"coordinator with {zmq_workers} local worker{'s' * (zmq_workers != 1)} "
                   f"({worker_threads} BLAS thread{'s' * (worker_threads > 1)} each: {threads_from})"
                   if zmq_workers else f"coordinator, workers join on {cfg.bind}")
        else:
            who = (f"{comm.world_size} rank{'s' * (comm.world_size > 1)}, {threads} BLAS "
                   f"thread{'s' * (threads > 1)} each ({threads_from})")
        log.info(f"{prog}: {who}, {len(setup.train)} training "
                 f"samples{'' if setup.val is None else f', {len(setup.val)} validation'}, "
                 f"{setup.layout.size:,} parameters; resolved config:")
        log.info("\n".join("  " + line for line in setup.cfg.to_toml().splitlines()))
        if comm.oversubscribed:
            cores = host_cores()
            log.warn(f"{comm.local_size} ranks share {cores} core{'s' * (cores != 1)} on this host: "
                     f"a rank that waits yields its core, but every step waits for the slowest "
                     f"rank; one rank per core (mpirun -n {cores}) is faster")
        if cfg.eval_every and setup.val is None:
            log.warn("--eval-every has no effect without --val-data or --val-fraction")
        if cfg.samples is not None and cfg.data != "spiral":
            log.warn("--samples only applies to --data spiral")
        if cfg.backend == "zmq":
            from coordinator.serve import serve

            summary, _ = serve(setup, log, stop, keys, spawn=zmq_workers, worker_threads=worker_threads,
                               monitor=monitor)
            summary["wall_seconds"] = time.perf_counter() - wall_start
        else:
            summary, _ = train(setup, comm, log, stop, wall_start, monitor)
        summary["threads_per_rank"] = threads
        code = EXIT_SIGNAL_BASE + summary["signal"] if summary["interrupted"] else EXIT_OK
        if comm.rank == 0:
            if setup.cfg.summary_json:
                _write_json(setup.cfg.summary_json, summary)
            print(summary_text(summary), flush=True)
        return code
    except PeerError as e:
        code = e.exit_code
        return code
    except KeyboardInterrupt as e:  # a signal before training started: nothing to save
        code = EXIT_SIGNAL_BASE + getattr(e, "signum", 2)
        if comm.rank == 0:
            print(stamped(f"{prog}: interrupted by {e or 'SIGINT'} before training started"),
                  file=sys.stderr, flush=True)
        if comm.world_size > 1:  # the others may be waiting for this rank in a collective
            comm.abort(code)
        return code
    except DDPError as e:
        code = e.exit_code
        if e.agreed or comm.world_size == 1:  # raised on this rank only; the others know
            _print_error(prog, e, comm.rank or None)
            return code
        if e.collective:  # raised on every rank alike: rank 0 speaks
            if comm.rank == 0:
                _print_error(prog, e)
            return code
        _print_error(prog, e, comm.rank)
        if monitor is not None:
            monitor.close(code, None)
        comm.abort(code)
        return code
    except Exception as e:
        missing = missing_package(e)
        if missing is not None and comm.world_size == 1:
            _print_error(prog, missing)
            code = missing.exit_code
            return code
        traceback.print_exc()
        _print_error(prog, "internal error (the traceback above is a bug report)",
                     comm.rank if comm.world_size > 1 else None)
        if comm.world_size > 1:
            if monitor is not None:
                monitor.close(EXIT_INTERNAL, None)
            comm.abort(EXIT_INTERNAL)
        return EXIT_INTERNAL
    finally:
        stop.restore()
        if monitor is not None:
            monitor.close(code, summary)


def _check_zmq_run(cfg: Config, prog: str, launched: int) -> None:
    if launched > 1:
        raise UsageError("--backend zmq starts its own worker processes; run it without mpirun or srun")
    if prog == "ddp-coordinator" and not cfg.bind:
        raise UsageError("--bind is required: where workers connect, e.g. --bind tcp://127.0.0.1:5555")
    if cfg.workers == 0 and not cfg.bind:
        raise UsageError("--workers 0 starts no workers: give --bind so that workers can join")


def train_main() -> None:
    sys.exit(run_train())


# --- ddp-predict -------------------------------------------------------------------

PREDICT_DESCRIPTION = """\
Apply a model written by `ddp-train --output` to a data set: prints loss and
accuracy when the data has targets and writes predictions (class indices for
cross-entropy, outputs for mse) to --output as .npy.

Exit codes: 0 done; 1 internal error; 2 bad input; 4 cannot write the output."""


DEFAULT_PREDICTIONS = "predictions.npy"


def _predictions_path(path: str) -> str:
    """--output as numpy.save names it (.npy added), refused unless a file can go there."""
    if not path.endswith(".npy"):
        path += ".npy"
    check_output_target(path, "--output")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {path}: directory {parent} does not exist")
    return path


def _predict_inputs(spec: str, n_features: int, model_cfg: dict):
    """(X, y or None) for ddp-predict: targets are optional here."""
    training = model_cfg.get("training", {})
    gen_cfg = Config(seed=int(training.get("seed", 0)), samples=training.get("samples"),
                     layers=tuple(model_cfg["layers"]), loss=model_cfg["loss"])
    lower = spec.lower()
    if lower.endswith(".npz"):
        return ddata.load_npz(spec, need_y=False)
    if lower.endswith(".csv") or lower.endswith(".csv.gz"):
        table = ddata.read_csv_table(spec)
        if table.shape[1] == n_features:
            return table, None
        return table[:, :-1], table[:, -1]
    return ddata.load_table(spec, gen_cfg)


def run_predict(argv: list[str] | None = None) -> int:
    prog = "ddp-predict"
    p = _Parser(prog=prog, description=PREDICT_DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="MODEL.npz", help="model file from ddp-train --output")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a .npz (X, optional y), a .csv (header; target last, optional) or spiral/digits")
    p.add_argument("--output", metavar="PREDS.npy",
                   help="write predictions here (default when the data has no targets: predictions.npy)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass")
    quiet_float_warnings()
    try:
        args = p.parse_args(argv)
        if not 0 < args.batch_size <= MAX_COUNT:
            raise UsageError(f"--batch-size must be a positive integer (at most {MAX_COUNT:,}), "
                             f"got {args.batch_size}")
        if args.output:  # refused now, not after the predictions were computed
            args.output = _predictions_path(args.output)
        model = ckpt.load_model(args.model)
        cfg = model.config
        dtype = model.params.dtype
        D, K = model.layout.layers[0], model.layout.layers[-1]
        X, y = _predict_inputs(args.data, D, cfg)
        what = f"--data {args.data}"
        ddata.check_inputs(X, what)
        if X.shape[1] != D:
            raise UsageError(f"{what}: samples have {X.shape[1]} features, the model expects {D}")
        if y is not None:
            y = ddata.check_targets(np.asarray(y), len(X), cfg["loss"], K, what, dtype)
        views = model.layout.views(model.params)
        std = cfg.get("standardize")
        mean = inv_std = None
        if std:
            mean = np.asarray(std["mean"], dtype=dtype)
            inv_std = 1.0 / np.asarray(std["std"], dtype=dtype)
        outputs, total_loss, correct = [], 0.0, 0
        for start in range(0, len(X), args.batch_size):
            x = np.asarray(X[start:start + args.batch_size], dtype=dtype)
            if mean is not None:
                x = (x - mean) * inv_std
            z = forward(views, cfg["activation"], x)
            pred = z.argmax(axis=1) if cfg["loss"] == "cross-entropy" else z
            outputs.append(pred)
            if y is not None:
                yb = y[start:start + args.batch_size]
                if cfg["loss"] == "cross-entropy":
                    correct += int(np.count_nonzero(pred == yb))
                total_loss += loss_sum(cfg["loss"], z, yb)
        preds = np.concatenate(outputs)
        if y is not None:
            line = f"{len(X)} samples: loss {total_loss / len(X):.6f}"
            if cfg["loss"] == "cross-entropy":
                line += f" accuracy {correct / len(X):.4f}"
            print(line, flush=True)
        out = args.output
        if out is None and y is None:  # nothing else to show: keep them, and say where
            out = DEFAULT_PREDICTIONS
            if os.path.lexists(out):
                raise UsageError(f"the data has no targets, so the predictions go to {out}, which "
                                 f"exists; give --output PATH (an existing file there is replaced)")
        if out:
            check_output_target(out, "--output", OutputError)  # it may have changed meanwhile
            try:
                ckpt.atomic_write(out, lambda fh: np.save(fh, preds))
            except OSError as e:
                raise OutputError(f"cannot write {out}: {e.strerror or e}")
            what = "class indices" if cfg["loss"] == "cross-entropy" else "outputs"
            print(f"predictions ({what}) for {len(X)} samples written to {os.path.abspath(out)}"
                  + ("" if args.output else " (no --output given)"), flush=True)
        return EXIT_OK
    except BaseException as e:
        return _exit_code(prog, e)


def _exit_code(prog: str, e: BaseException) -> int:
    """The exit code of a one-process command that ended with `e` (printed if an error)."""
    if isinstance(e, SystemExit):  # --help, --version
        return int(e.code or 0)
    e = missing_package(e) or e
    if isinstance(e, DDPError):
        _print_error(prog, e)
        return e.exit_code
    if not isinstance(e, Exception):
        raise e
    traceback.print_exception(e)
    _print_error(prog, "internal error (the traceback above is a bug report)")
    return EXIT_INTERNAL


def predict_main() -> None:
    sys.exit(run_predict())




# --- ddp-coordinator, ddp-worker, ddp-keygen ------------------------------------------


def coordinator_main() -> None:
    sys.exit(run_train(prog="ddp-coordinator"))


WORKER_DESCRIPTION = """\
Join a ddp-train job served by a ZeroMQ coordinator (ddp-coordinator, or
ddp-train --backend zmq --bind ...): receive the job description, load the same
data (its content must match the coordinator's), then compute the gradient sums
of the rows the coordinator hands out each step. Ctrl-C or SIGTERM leaves
cleanly; if the coordinator goes away the worker reconnects by itself.

Exit codes: 0 the job finished or the coordinator stopped; 1 internal error;
2 bad input, refused by the coordinator, or keys rejected; 5 no coordinator
answered within --retry-for; 128+N left on signal N."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def run_worker(argv: list[str] | None = None) -> int:
    from .signals import StopRequest

    prog = "ddp-worker"
    p = _Parser(prog=prog, description=WORKER_DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the coordinator's endpoint, e.g. tcp://10.0.0.5:5555")
    p.add_argument("--curve-secret", metavar="FILE", help="this worker's secret key (from ddp-keygen)")
    p.add_argument("--server-key", metavar="FILE", help="the coordinator's public key (coordinator.key)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="BLAS threads (default: the cores of this host)")
    p.add_argument("--retry-for", type=_positive_float, metavar="SECONDS",
                   help="give up (exit 5) when no coordinator answers for this long (default: never)")
    p.add_argument("--status", action="store_true",
                   help="print the coordinator's status as JSON and exit, instead of joining")
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    stop = StopRequest()
    quiet_float_warnings()
    try:
        args = p.parse_args(argv)
        if args.threads is not None and not 0 < args.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
        from worker.service import WorkerService, load_keys, query_status

        keys = load_keys(args.curve_secret, args.server_key)
        if args.status:
            print(json.dumps(query_status(args.connect, keys), indent=2, sort_keys=True), flush=True)
            return EXIT_OK
        log = Log(0, prog, level="warning" if args.quiet else "info")
        limit_threads(args.threads, 1, log.warn, noun="worker")
        stop.install(deferred=True)  # the service's loop checks it at every turn
        return WorkerService(args.connect, log, stop, keys, args.retry_for).run()
    except KeyboardInterrupt:
        return EXIT_SIGNAL_BASE + 2
    except BaseException as e:
        return _exit_code(prog, e)
    finally:
        stop.restore()


def worker_main() -> None:
    sys.exit(run_worker())


KEYGEN_DESCRIPTION = """\
Write CURVE key pairs for an authenticated, encrypted ZeroMQ job into DIR:

  DIR/coordinator.key_secret   the coordinator's --curve-secret (created once)
  DIR/coordinator.key          its public key: every worker's --server-key
  DIR/NAME.key_secret          a worker's --curve-secret (NAME: worker, or --name)
  DIR/authorized/NAME.key      the worker's public key: the coordinator's
                               --authorized-keys DIR/authorized lets it in

Existing files are never overwritten. Copy a worker's .key_secret only to that
worker; remove DIR/authorized/NAME.key to lock a worker out (on the next start)."""


def run_keygen(argv: list[str] | None = None) -> int:
    from . import keys as keyfiles

    prog = "ddp-keygen"
    p = _Parser(prog=prog, description=KEYGEN_DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("dir", metavar="DIR", help="directory for the keys (created if missing)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="a worker key pair with this name (repeatable; default: worker)")
    try:
        args = p.parse_args(argv)
        import zmq

        names = args.name or ["worker"]
        for name in names:
            if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
                raise UsageError(f"--name {name!r}: use letters, digits, '-', '_' and '.'")
            if name == "coordinator":
                raise UsageError("--name coordinator is reserved for the coordinator's own key")
        authorized = os.path.join(args.dir, "authorized")
        try:
            os.makedirs(authorized, exist_ok=True)
            os.chmod(args.dir, 0o700)
        except OSError as e:
            raise UsageError(f"{args.dir}: cannot create it ({e.strerror or e})")
        for name in names:
            if os.path.exists(os.path.join(args.dir, f"{name}.key_secret")):
                raise UsageError(f"{os.path.join(args.dir, name)}.key_secret exists; give another "
                                 f"--name to add a worker")
        written = []

        def pair(base: str, public_copy: str | None = None) -> None:
            public, secret = zmq.curve_keypair()
            keyfiles.write_keys(base + ".key_secret", public, secret)
            keyfiles.write_keys(base + ".key", public, None)
            written.extend([base + ".key_secret", base + ".key"])
            if public_copy:
                keyfiles.write_keys(public_copy, public, None)
                written.append(public_copy)

        try:
            coordinator = os.path.join(args.dir, "coordinator")
            if not os.path.exists(coordinator + ".key_secret"):
                pair(coordinator)
            for name in names:
                pair(os.path.join(args.dir, name), os.path.join(authorized, f"{name}.key"))
        except FileExistsError as e:
            raise UsageError(f"{e.filename} exists; remove it or give another --name")
        except OSError as e:
            raise OutputError(f"cannot write {getattr(e, 'filename', args.dir)}: {e.strerror or e}")
        for path in written:
            print(f"wrote {path}")
        return EXIT_OK
    except BaseException as e:
        return _exit_code(prog, e)


def keygen_main() -> None:
    sys.exit(run_keygen())
