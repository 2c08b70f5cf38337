"""Entry points ddp-train and ddp-coordinator; the others are re-exported from their modules.

    ddp-train, ddp-coordinator  here
    ddp-predict                 ddp.predict
    ddp-worker                  ddp.worker_cli (the service itself: worker.service)
    ddp-job                     ddp.job_cli (the training service: coordinator.service)
    ddp-keygen                  ddp.keygen

Every error the user can cause ends as one line on stderr and a non-zero exit
(see ddp.errors for the codes); under mpirun exactly one rank prints it and
no rank is left waiting for the others.
"""
from __future__ import annotations

import json
import sys
import time
import traceback

from .command import INTERNAL_ERROR, console_script, print_error, write_result
from .config import Config, build_parser, load_toml, resolve
from .errors import (EXIT_INTERNAL, EXIT_OK, EXIT_SIGNAL_BASE, DDPError, PeerError, UsageError,
                     missing_package)
from .keygen import keygen_main, run_keygen
from .log import Log, stamped
from .model import quiet_float_warnings
from .predict import predict_main, run_predict
from .signals import StopRequest
from .session import Training, check_zmq_run
from .worker_cli import run_worker, worker_main

__all__ = ["run_train", "train_main", "coordinator_main", "run_predict", "predict_main",
           "run_worker", "worker_main", "run_keygen", "keygen_main"]

SERVICE_ONLY = ("state_dir", "max_running", "client_keys")  # ddp-coordinator's flags only

TRAIN_DESCRIPTION = """\
Train a multilayer perceptron (SGD, Adam or AdamW), data-parallel over the ranks
of `mpirun -n N ddp-train ...` (plain `ddp-train` is one process). Each rank
computes the gradient sums of its shard of every global batch; the sums meet in
Allreduces of --bucket-mb buckets started during backward or, for ranks on one
host, in a shared-memory window (across hosts, a window on each and an Allreduce
per part between them: --exchange hierarchical); every rank applies the same update.

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
gradient sums and applies the optimizer's step. Workers may join, leave or die at any
time; a shard that was lost is recomputed, so the result is that of an
undisturbed run. Takes every training flag of ddp-train.

With --state-dir DIR and no training flags it is the training service instead:
it stays up, keeps the workers that connect, and runs the jobs that ddp-job
submits (see ddp-job --help), keeping its queue and every job's files in DIR.

Exit codes: 0 done; 1 internal error; 2 bad input; 3 loss became NaN/Inf
or exceeded --max-loss; 4 cannot write a checkpoint, model or summary; 128+N
stopped by signal N before the last step (checkpoint written, workers told to
exit: run the same command to resume; the service: its running jobs
checkpointed, its workers left waiting)."""


def run_train(argv: list[str] | None = None, comm=None, prog: str = "ddp-train") -> int:
    """ddp-train (and ddp-coordinator); returns the exit code. `comm` defaults to MPI
    (a world of one without mpirun); --backend zmq uses no MPI at all."""
    wall_start = time.perf_counter()
    quiet_float_warnings()
    from ddp.coordinator.mpi import LocalComm, launched_rank, make_comm

    speaks = launched_rank() == 0 if comm is None else comm.rank == 0
    try:
        cfg, error = _parse(argv, prog, speaks)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    if cfg is not None and cfg.state_dir and error is None:
        from ddp.coordinator.service import run_service

        return run_service(cfg, prog)
    if cfg is not None and cfg.backend == "zmq":
        comm = LocalComm()
    if comm is None:
        try:
            comm = make_comm()
        except DDPError as e:
            if speaks:
                print_error(prog, e)
            return e.exit_code
    return _TrainRun(prog, cfg, comm, wall_start).run(error)


def _parse(argv, prog: str, speaks: bool) -> tuple[Config | None, UsageError | None]:
    """(config, error): the error (or None) for every rank to agree on before it is said;
    the config is None when the flags did not resolve to one, and is there when they did
    but cannot run this way (it still tells ddp-train --backend zmq to need no MPI)."""
    from ddp.coordinator.mpi import launched_size

    serving = prog == "ddp-coordinator"
    if serving:
        parser = build_parser(prog, COORDINATOR_DESCRIPTION, exclude=("backend",))
    else:
        parser = build_parser(prog, TRAIN_DESCRIPTION, exclude=SERVICE_ONLY)
    if not speaks:  # --help and --version text once, not once per rank
        parser.print_help = lambda file=None: None
    cfg = None
    try:
        args = parser.parse_args(argv)
        if serving:
            args.backend = "zmq"
        cfg = resolve(args)
        if cfg.state_dir:
            _check_service_flags(args)
        if cfg.backend == "zmq":
            check_zmq_run(cfg, prog, launched_size())
    except UsageError as e:
        return cfg, e
    return cfg, None


def _check_service_flags(args) -> None:
    """The service takes its jobs from ddp-job submit: no training flags beside --state-dir."""
    from .jobspec import JOB_KEYS

    given = [k for k in JOB_KEYS if getattr(args, k, None) is not None]
    if getattr(args, "config", None):
        given += [k for k in load_toml(args.config) if k in JOB_KEYS]
    if given:
        raise UsageError(f"--state-dir starts the training service, which takes its jobs from "
                         f"ddp-job submit: give --{given[0].replace('_', '-')} (and the other "
                         f"training flags) to ddp-job submit, or drop --state-dir to run one job")


class _TrainRun:
    """One ddp-train or ddp-coordinator run after parsing: prepare, train, summarise.

    Every failure becomes an exit code here, said once: by the rank it happened
    on, or by rank 0 when every rank met it alike; a failure on one rank of
    several aborts the others, which may be waiting for it in a collective.
    """

    def __init__(self, prog: str, cfg: Config | None, comm, wall_start: float):
        self.prog, self.cfg, self.comm, self.wall_start = prog, cfg, comm, wall_start
        self.serving = prog == "ddp-coordinator"
        self.log = Log(comm.rank, prog, level="error" if cfg is not None and cfg.quiet else "info")
        self.stop = StopRequest()
        self.training = Training(prog, cfg, comm, self.log, self.stop, wall_start, self.serving)

    def run(self, error: UsageError | None) -> int:
        code = EXIT_INTERNAL
        try:
            # from here a signal ends the process at once (even inside a blocking read),
            # until the training loop defers it to the end of a step
            self.stop.install()
            self.comm.agree(error)
            code = self._train()
        except PeerError as e:
            code = e.exit_code
        except KeyboardInterrupt as e:  # a signal before training started: nothing to save
            code = self._interrupted(e)
        except DDPError as e:
            code = self._failed(e)
        except Exception as e:
            code = self._crashed(e)
        finally:
            self.stop.restore()
            monitor = self.training.monitor
            if monitor is not None:
                monitor.close(code, self.training.summary)
        return code

    def _train(self) -> int:
        from ddp.coordinator.run import summary_text

        summary = self.training.run()
        code = EXIT_SIGNAL_BASE + summary["signal"] if summary["interrupted"] else EXIT_OK
        if self.comm.rank == 0:
            if self.cfg.summary_json:
                write_result(self.cfg.summary_json, "--summary-json", lambda fh: _dump(fh, summary),
                             binary=False)
            print(summary_text(summary), flush=True)
        return code

    def _interrupted(self, e: KeyboardInterrupt) -> int:
        code = EXIT_SIGNAL_BASE + getattr(e, "signum", 2)
        if self.comm.rank == 0:
            print(stamped(f"{self.prog}: interrupted by {e or 'SIGINT'} before training started"),
                  file=sys.stderr, flush=True)
        if self.comm.world_size > 1:  # the others may be waiting for this rank in a collective
            self.comm.abort(code)
        return code

    def _failed(self, e: DDPError) -> int:
        comm, code = self.comm, e.exit_code
        if e.agreed or comm.world_size == 1:  # raised on this rank only; the others know
            print_error(self.prog, e, comm.rank or None)
            return code
        if e.collective:  # raised on every rank alike: rank 0 speaks
            if comm.rank == 0:
                print_error(self.prog, e)
            return code
        print_error(self.prog, e, comm.rank)
        self._abort(code)
        return code

    def _crashed(self, e: Exception) -> int:
        comm = self.comm
        missing = missing_package(e)
        if missing is not None and comm.world_size == 1:
            print_error(self.prog, missing)
            return missing.exit_code
        traceback.print_exc()
        print_error(self.prog, INTERNAL_ERROR, comm.rank if comm.world_size > 1 else None)
        if comm.world_size > 1:
            self._abort(EXIT_INTERNAL)
        return EXIT_INTERNAL

    def _abort(self, code: int) -> None:
        """End every rank: this one failed alone and the others may wait for it."""
        if self.training.monitor is not None:
            self.training.monitor.close(code, None)
        self.comm.abort(code)


def _dump(fh, summary: dict) -> None:
    json.dump(summary, fh, indent=2, sort_keys=True)
    fh.write("\n")


train_main = console_script(run_train)
coordinator_main = console_script(run_train, prog="ddp-coordinator")
