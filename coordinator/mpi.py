"""The processes of a run under mpirun, and how they were started.

`MPIComm` and `LocalComm` (one process, no MPI) share one small interface; the
exchange strategies (`coordinator.exchange`) build the step's sums on it:

    rank, world_size, local_size   who we are
    oversubscribed                 more ranks than cores on this host: waits yield the core
    allreduce_(buf, op)            in-place sum (or max) over ranks (buffer API, no pickling)
    wait_(requests)                complete non-blocking requests (yielding when oversubscribed)
    bcast_(buf, root)              in-place broadcast from root
    agree(error) -> None           collective: raise everywhere if any rank failed
    rank_reports(on_report, step)  each rank's progress at rank 0, off the step's path
    barrier()                      every rank has arrived
    host_split() -> (host, peers)  this host's ranks; this local rank's on every host (MPI only)
    abort(code)                    end every rank now
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

from ddp.errors import DDPError, PeerError
from ddp.threads import host_cores

# Environment variables by which MPI launchers tell a process it is one of several.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _env_int(names: tuple[str, ...]) -> int | None:
    for var in names:
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return None


def srun_tasks() -> int:
    """Tasks of the Slurm job step this process is one of (1 outside srun).

    SLURM_STEP_NUM_TASKS is set for the tasks srun starts; a batch script itself
    (step "batch") also sees SLURM_NTASKS and SLURM_PROCID, but it is one process.
    """
    if "SLURM_PROCID" not in os.environ:
        return 1
    return max(_env_int(("SLURM_STEP_NUM_TASKS",)) or 1, 1)


def launched_size() -> int:
    """World size a launcher announced through the environment (1 if none)."""
    return max(_env_int(_LAUNCHER_SIZE_VARS) or srun_tasks(), 1)


def launched_rank() -> int:
    rank = _env_int(_LAUNCHER_RANK_VARS)
    if rank is None and srun_tasks() > 1:
        rank = _env_int(("SLURM_PROCID",))
    return rank or 0


class LocalComm:
    """A world of one process: every collective is the identity."""

    rank, world_size, local_size = 0, 1, 1
    oversubscribed = False

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> None:
        pass

    def bcast_(self, buf: np.ndarray, root: int = 0) -> None:
        pass

    def agree(self, error: DDPError | None) -> None:
        if error is not None:
            error.agreed = True
            raise error

    def barrier(self) -> None:
        pass

    def rank_reports(self, on_report, start_step: int) -> "Reports":
        return Reports(on_report, start_step)

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class MPIComm:
    """MPI's world (or, from `host_split`, some of its ranks) behind the interface above."""

    def __init__(self, comm=None, oversubscribed: bool | None = None):
        from mpi4py import MPI  # only the roles import mpi4py

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = node.Get_size()
        node.Free()
        # more ranks than cores on this host: a rank that waits must give its core to
        # one that computes, instead of spinning in MPICH's progress loop
        self.oversubscribed = self.local_size > host_cores() if oversubscribed is None \
            else oversubscribed

    def host_split(self) -> tuple["MPIComm", "MPIComm"]:
        """(host, peers): the ranks on this host, and the ranks that hold this one's
        local rank on every host, ordered by host (the host of rank 0 first, so that
        it is rank 0 of every `peers`). Collective; `free()` both when done."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        leader = np.array([self.rank], dtype=np.int64)  # the host's lowest rank names it
        node.Bcast(leader, root=0)
        peers = self.comm.Split(color=node.Get_rank(), key=int(leader[0]))
        # waits on either yield the core when this host is oversubscribed, as here
        return MPIComm(node, self.oversubscribed), MPIComm(peers, self.oversubscribed)

    def free(self) -> None:
        """Release a communicator from `host_split` (collective over its ranks)."""
        self.comm.Free()

    def wait_(self, requests: list) -> None:
        """Complete `requests`. A rank that has a core of its own spins (the lowest
        latency); on an oversubscribed host it yields the core between tests, so that a
        rank still computing gets it instead of waiting for the scheduler's next tick."""
        if not self.oversubscribed:
            self.MPI.Request.Waitall(requests)
            return
        while not self.MPI.Request.Testall(requests):
            os.sched_yield()

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM if op == "sum" else self.MPI.MAX)

    def bcast_(self, buf: np.ndarray, root: int = 0) -> None:
        self.comm.Bcast(buf, root=root)

    def agree(self, error: DDPError | None) -> None:
        """Every rank learns whether any rank failed; the lowest failing rank's error
        is raised there (and printed by it), the others raise a quiet PeerError."""
        mine = np.array([self.rank if error is not None else self.world_size], dtype=np.int64)
        code = np.array([error.exit_code if error is not None else 0], dtype=np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, mine, op=self.MPI.MIN)
        self.comm.Allreduce(self.MPI.IN_PLACE, code, op=self.MPI.MAX)
        first = int(mine[0])
        if first == self.world_size:
            return
        if first == self.rank:
            error.agreed = True  # every rank knows: no abort needed
            raise error
        raise PeerError(int(code[0]))

    def barrier(self) -> None:
        if self.oversubscribed:
            self.wait_([self.comm.Ibarrier()])
        else:  # MPICH's blocking barrier has a shared-memory algorithm of its own
            self.comm.Barrier()

    def rank_reports(self, on_report, start_step: int) -> Reports:
        return RankReports(self, on_report, start_step) if self.world_size > 1 else \
            Reports(on_report, start_step)

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


class Reports:
    """Each rank's progress, off the step's path: the training loop only stores its
    step and compute seconds in `progress`; a thread passes them on twice a second.
    This one is a world of one: rank 0 reports to itself."""

    EVERY = 0.5  # seconds

    def __init__(self, on_report, start_step: int, rank: int = 0):
        self.rank = rank
        self.on_report = on_report
        self.progress = [start_step, 0.0]  # written by the training loop: step reached, compute s
        self.last = (start_step, 0.0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ddp-rank-reports", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.EVERY):
            self._report(0, *self._mine())

    def close(self, clean: bool = True) -> None:
        self.stopping.set()
        self.thread.join()
        if clean:
            self._report(0, *self._mine())

    def _mine(self) -> tuple[int, float]:
        """(step, mean compute seconds per step since the last report, NaN if none)."""
        step, t = self.progress
        mean = (t - self.last[1]) / (step - self.last[0]) if step > self.last[0] else float("nan")
        if step > self.last[0]:
            self.last = (step, t)
        return step, mean

    def _report(self, rank: int, step: int, mean: float) -> None:
        self.on_report(f"rank-{rank}", step, mean if mean == mean else None)


class RankReports(Reports):
    """Reports of every rank at rank 0: a thread on each rank sends [step, compute
    seconds] with a non-blocking send on a communicator of its own, and rank 0's
    thread passes them on. Ranks waiting in an Allreduce keep reporting, so a rank
    that hangs is named: its step falls behind, or its reports stop. `close()` is
    collective: every report is received before the communicator goes.
    """

    REPORT, DONE = 1, 2

    def __init__(self, comm: "MPIComm", on_report, start_step: int):
        self.MPI = comm.MPI
        self.comm = comm.comm.Dup()
        self.size = comm.world_size
        self.buf = np.zeros(2)
        self.req = self.MPI.REQUEST_NULL
        super().__init__(on_report, start_step, comm.rank)

    def _receive(self, status, tag: int) -> int:
        msg = np.empty(2)
        self.comm.Recv(msg, source=self.MPI.ANY_SOURCE, tag=tag, status=status)
        source = status.Get_source()
        if status.Get_tag() == self.REPORT:
            self._report(source, int(msg[0]), float(msg[1]))
        return source

    def _run(self) -> None:
        status = self.MPI.Status()
        while not self.stopping.wait(self.EVERY):
            if self.rank == 0:
                self._report(0, *self._mine())
                while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.REPORT):
                    self._receive(status, self.REPORT)
            elif self.req.Test():  # else the last report is still on its way: skip this one
                self.buf[:] = self._mine()
                self.req = self.comm.Isend(self.buf, dest=0, tag=self.REPORT)

    def close(self, clean: bool = True) -> None:
        """Collective when `clean`; otherwise (an error is ending the run) only stop the
        thread, since other ranks may never report again."""
        self.stopping.set()
        self.thread.join()
        if not clean:
            return
        if self.rank == 0:
            self._report(0, *self._mine())
            status, waiting = self.MPI.Status(), set(range(1, self.size))
            while waiting:  # reports from one rank arrive in order, its DONE last
                source = self._receive(status, self.MPI.ANY_TAG)
                if status.Get_tag() == self.DONE:
                    waiting.discard(source)
        else:
            self.req.Wait()
            self.comm.Send(self.buf, dest=0, tag=self.DONE)
        self.comm.Free()


def make_comm():
    """MPIComm when mpi4py is available (a plain run is a world of one), else LocalComm."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        if launched_size() > 1:
            raise DDPError("started by an MPI launcher but mpi4py is not installed: "
                           "pip install mpi4py (see the README on using a cluster's MPI)")
        return LocalComm()
    comm = MPIComm()
    announced = launched_size()
    if comm.world_size == 1 and srun_tasks() > 1 and _env_int(_LAUNCHER_SIZE_VARS) is None:
        # srun without an MPI plugin starts N copies of a one-rank job: each would train
        # alone and they would all write the same files
        raise DDPError(f"srun started {srun_tasks()} tasks but MPI sees a world of 1: srun "
                       f"needs the MPI plugin of this MPI; use srun --mpi=pmi2 (MPICH, as "
                       f"installed by pip) or srun --mpi=pmix (Open MPI)")
    if comm.world_size == 1 and announced > 1:
        # e.g. Open MPI's mpirun starting an mpi4py linked to MPICH: every process would
        # train alone and they would all write the same files
        raise DDPError(f"the launcher started {announced} processes but MPI sees a world of 1: "
                       f"mpirun and mpi4py use different MPI libraries; use the mpirun that "
                       f"matches mpi4py (python -c 'from mpi4py import MPI; print(MPI.Get_library_version())')")
    return comm
