"""How gradients meet under mpirun: one in-place Allreduce of one buffer per step.

`MPIComm` and `LocalComm` (one process, no MPI) share one small interface, so
the training loop never knows which one summed the gradients:

    rank, world_size, local_size   who we are
    allreduce_(buf, op)            in-place sum (or max) over ranks (buffer API, no pickling)
    bcast_(buf, root)              in-place broadcast from root
    agree(error) -> None           collective: raise everywhere if any rank failed
    abort(code)                    end every rank now
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ddp.errors import DDPError, PeerError

# Environment variables by which launchers tell a process it is one of several.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_size() -> int:
    """World size a launcher announced through the environment (1 if none)."""
    for var in _LAUNCHER_SIZE_VARS:
        try:
            return max(int(os.environ[var]), 1)
        except (KeyError, ValueError):
            continue
    return 1


def launched_rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return 0


class LocalComm:
    """A world of one process: every collective is the identity."""

    rank, world_size, local_size = 0, 1, 1

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

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class MPIComm:
    def __init__(self):
        from mpi4py import MPI  # only the roles import mpi4py

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = node.Get_size()
        node.Free()

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
        self.comm.Barrier()

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


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
    if comm.world_size == 1 and announced > 1:
        # e.g. Open MPI's mpirun starting an mpi4py linked to MPICH: every process would
        # train alone and they would all write the same files
        raise DDPError(f"the launcher started {announced} processes but MPI sees a world of 1: "
                       f"mpirun and mpi4py use different MPI libraries; use the mpirun that "
                       f"matches mpi4py (python -c 'from mpi4py import MPI; print(MPI.Get_library_version())')")
    return comm
