"""One training run from a resolved config to its summary: the threads, the setup, the
start-up lines, then the MPI loop or the ZeroMQ coordinator. ddp-train (ddp.cli) and
ddp.train (ddp.api) both run it; each turns its errors into what its caller expects
(an exit code and one line, or an exception)."""
from __future__ import annotations

import time
from typing import NamedTuple

from .config import Config
from .errors import DDPError, UsageError, missing_package
from .log import Log
from .monitor import open_monitor
from .signals import StopRequest
from .threads import choose_threads, host_cores, limit_threads


def check_zmq_run(cfg: Config, prog: str, launched: int) -> None:
    """Refuse a --backend zmq run that cannot work this way (`launched`: processes started)."""
    if launched > 1:
        raise UsageError("--backend zmq starts its own worker processes; run it without mpirun or srun")
    if prog == "ddp-coordinator" and not cfg.bind:
        raise UsageError("--bind is required: where workers connect, e.g. --bind tcp://127.0.0.1:5555")
    if cfg.workers == 0 and not cfg.bind:
        raise UsageError("--workers 0 starts no workers: give --bind so that workers can join")


class Threads(NamedTuple):
    """BLAS threads of this process and, with --backend zmq, of the workers it starts."""
    per_rank: int
    source: str          # why that many: said in the start-up line
    workers: int = 0     # zmq: worker processes to start here
    per_worker: int = 0


def choose_run_threads(cfg: Config, comm, log: Log, serving: bool) -> Threads:
    if cfg.backend != "zmq":
        threads, source = limit_threads(cfg.threads, comm.local_size, log.warn)
        return Threads(threads, source)
    workers = cfg.workers if cfg.workers is not None else (0 if serving else host_cores())
    threads, _ = limit_threads(cfg.threads, 1, log.warn, noun="coordinator")
    per_worker, source, _ = choose_threads(cfg.threads, workers, noun="worker")
    return Threads(threads, source, workers, per_worker)


def _who(cfg: Config, comm, threads: Threads) -> str:
    """Who computes, for the start-up line."""
    if cfg.backend == "zmq":
        n = threads.workers
        if not n:
            return f"coordinator, workers join on {cfg.bind}"
        return (f"coordinator with {n} local worker{'s' * (n != 1)} ({threads.per_worker} BLAS "
                f"thread{'s' * (threads.per_worker > 1)} each: {threads.source})")
    return (f"{comm.world_size} rank{'s' * (comm.world_size > 1)}, {threads.per_rank} BLAS "
            f"thread{'s' * (threads.per_rank > 1)} each ({threads.source})")


class Training:
    """Prepare, train and summarise one run of `cfg` on `comm`; raises DDPError.

    `monitor` (rank 0, when the config asks for one) and `setup` are kept for the
    caller, which closes the monitor with the run's exit code.
    """

    def __init__(self, prog: str, cfg: Config, comm, log: Log, stop: StopRequest,
                 wall_start: float, serving: bool = False):
        self.prog, self.cfg, self.comm, self.log, self.stop = prog, cfg, comm, log, stop
        self.wall_start, self.serving = wall_start, serving
        self.monitor = self.summary = self.setup = None

    def run(self) -> dict:
        """The run's summary (every rank has it)."""
        threads = choose_run_threads(self.cfg, self.comm, self.log, self.serving)
        setup, keys = self._prepare()
        self._say_start(setup, threads)
        return self._execute(setup, keys, threads)

    def _prepare(self):
        """(setup, CURVE keys or None), once every rank has them (or has said why not)."""
        from .setup import prepare

        cfg, error, setup, keys = self.cfg, None, None, None
        try:
            if cfg.backend == "zmq":
                from ddp.coordinator.access import preflight

                keys = preflight(cfg, self.log)
            setup = prepare(cfg)
            if self.comm.rank == 0:
                self.monitor = open_monitor(cfg, setup, cfg.backend, self.log, self.serving)
        except DDPError as e:
            error = e
        except ModuleNotFoundError as e:
            error = missing_package(e)
            if error is None:
                raise
        self.comm.agree(error)
        self.setup = setup
        return setup, keys

    def _say_start(self, setup, threads: Threads) -> None:
        """The start-up line, the resolved config and the warnings about it."""
        cfg, comm, log = self.cfg, self.comm, self.log
        log.info(f"{self.prog}: {_who(cfg, comm, threads)}, {len(setup.train)} training "
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

    def _execute(self, setup, keys, threads: Threads) -> dict:
        """Train under MPI or serve ZeroMQ workers; the run's summary."""
        if self.cfg.backend == "zmq":
            from ddp.coordinator.serve import serve

            summary = serve(setup, self.log, self.stop, keys, spawn=threads.workers,
                            worker_threads=threads.per_worker, monitor=self.monitor)
            summary["wall_seconds"] = time.perf_counter() - self.wall_start
        else:
            from ddp.coordinator.trainer import train

            summary = train(setup, self.comm, self.log, self.stop, self.wall_start, self.monitor)
        summary["threads_per_rank"] = threads.per_rank
        self.summary = summary
        return summary
