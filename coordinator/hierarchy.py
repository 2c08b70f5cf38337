"""The hierarchical exchange: the ranks of a host meet in its shared window, the hosts
in one Allreduce per part (the two-level scheme of Horovod's hierarchical allreduce).

Every host has H ranks and one copy of the parameters and optimizer state, in a
shared window as under `SharedExchange`. Local rank r owns part r of the flat
gradient. It sums part r over its host's slots, then Allreduces that host sum with
local rank r of every other host (a communicator per local rank), so it holds part
r of the sum over every rank; it applies the optimizer to part r of its host's
parameters, and after a barrier the host's ranks read the new ones. Every host sums
the same parts and applies the same update, so every host ends the step with the
same parameters. A host's link carries the whole gradient once each way, as
MPICH's node-aware Allreduce also does; what the hierarchy saves is inside the host:
its ranks copy nothing to each other and each updates 1/H of the parameters.

The sums start during backward, bucket by bucket (`--bucket-mb`): when backward has
written a bucket, each rank enters a non-blocking barrier of its host; once every
rank of the host has (tested in later `layer_done` calls and in `finish`), rank r
sums its share of the bucket (the bucket ∩ part r) and starts its Allreduce.
"""
from __future__ import annotations

import numpy as np

from ddp.errors import UsageError

from .exchange import Bucket, SharedExchange


class HierarchicalExchange(SharedExchange):
    """One step across hosts: a shared window inside each host, an Allreduce of each
    part across hosts, each part's update by its local rank.

    Parameters
    ----------
    comm : MPIComm
        The world.
    host, peers : MPIComm
        This host's ranks, and the ranks with this local rank on every host, rank 0's
        host first (`MPIComm.host_split`).
    size, head, dtype, state_slots, metrics
        As `SharedExchange`.
    buckets : list of Bucket
        What backward writes together, in the order it writes it (`plan_buckets`).
    """

    name = "hierarchical"

    def __init__(self, comm, host, peers, size: int, head: int, dtype, state_slots: int,
                 metrics: bool, buckets: list[Bucket]):
        super().__init__(comm, size, head, dtype, state_slots, metrics, host)
        self.peers, self.MPI = peers, comm.MPI
        lo, hi = head + self.lo, head + self.hi  # this rank's part, in the step's buffer
        self.shares = [(max(b.lo, lo), min(b.hi, hi)) for b in buckets]
        self.start_after = {b.after: k for k, b in enumerate(buckets) if b.after is not None}
        self.written = []  # (bucket, its host barrier): written here, maybe not yet elsewhere
        self.sending = []  # the Allreduces across hosts under way

    def layer_done(self, layer: int) -> None:
        k = self.start_after.get(layer)
        if k is not None:
            self.written.append((k, self.host.comm.Ibarrier()))
        # MPICH advances non-blocking collectives only inside MPI calls: test them
        while self.written and self.written[0][1].Test():
            self._send(self.written.pop(0)[0])
        if self.sending:
            self.MPI.Request.Testall(self.sending)

    def _send(self, k: int) -> None:
        """Every rank of the host has written bucket k: sum this rank's share of it over
        the slots, and start its Allreduce with the other hosts."""
        lo, hi = self.shares[k]
        if lo < hi:
            acc = self.sum_slots_(lo, hi)
            self.sending.append(self.peers.comm.Iallreduce(self.MPI.IN_PLACE, acc, op=self.MPI.SUM))

    def finish(self) -> np.ndarray:
        """This rank's part summed over every rank; the stats of every rank in `totals`."""
        self.host.barrier()  # the host's backward is over: the last bucket is written
        self.host.wait_([req for _, req in self.written])  # complete: they came before the barrier
        for k, _ in self.written:
            self._send(k)
        self.written.clear()
        self._send(len(self.shares) - 1)
        self.sum_stats_()
        self.sending.append(self.peers.comm.Iallreduce(self.MPI.IN_PLACE, self.totals,
                                                       op=self.MPI.SUM))
        self.peers.wait_(self.sending)
        self.sending.clear()
        return self.totals

    def apply_(self, opt, n_samples: int, norm_due=None) -> float | None:
        """Apply `opt` to this rank's part of its host's parameters (summed by `finish`)."""
        return self.update_part_(opt, n_samples, self.buf[self.head + self.lo:self.head + self.hi])

    def share_start(self, step: int, opt) -> int:
        """Rank 0 wrote the starting point into its host's window; each local rank brings
        its part of the parameters and optimizer state to the same part on every host."""
        step = super().share_start(step, opt)
        part = slice(self.lo, self.hi)
        self.peers.bcast_(self.params[part])
        for row in self.state:
            self.peers.bcast_(row[part])
        self.host.barrier()
        return step

    def close(self) -> None:
        super().close()
        self.host.free()
        self.peers.free()


def host_shape(comm) -> tuple[int, int, int]:
    """(hosts, fewest, most ranks on a host) of this world; hosts counts those with
    the most. Collective."""
    sizes = np.array([comm.local_size, -comm.local_size], dtype=np.int64)
    comm.allreduce_(sizes, op="max")
    most, fewest = int(sizes[0]), -int(sizes[1])
    return comm.world_size // most, fewest, most


def make_hierarchical(comm, size: int, head: int, dtype, state_slots: int, metrics: bool,
                      buckets: list[Bucket]) -> HierarchicalExchange:
    """The hierarchical exchange, or a UsageError on every rank when the hosts do not
    run the same number of ranks (part r would have no peer on some host)."""
    _, fewest, most = host_shape(comm)
    comm.agree(UsageError(f"--exchange hierarchical needs the same number of ranks on every "
                          f"host, these have {fewest} to {most}; use --exchange allreduce")
               if fewest != most else None)
    host, peers = comm.host_split()
    return HierarchicalExchange(comm, host, peers, size, head, dtype, state_slots, metrics, buckets)
