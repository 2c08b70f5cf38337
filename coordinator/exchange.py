"""How one step's gradient sums meet and the parameters move: the exchange strategies.

The training loop never knows which one it has. Each step it lets the worker write
this process's shard sums into `exchange.buf` (the stats in the first `head` slots,
then the flat gradient), tells the exchange each time backward has finished a layer,
asks it to `finish()` (every process's sums have met: the summed stats come back),
and then to `apply_(opt, n)` (the optimizer moves the parameters with the gradient of
the mean loss over the global batch's n samples; with --clip-norm C, first scaled so
that its norm over every part is at most C). The optimizer is handed a gradient sum, or the part
[lo, hi) of one, and never sees a communicator.

    LocalExchange      one process: the sums are whole already (a world of one, and
                       the ZeroMQ coordinator, which adds the workers' sums itself)
    AllreduceExchange  MPI: in-place Allreduces in buckets started during backward,
                       then the same update on every rank
    SharedExchange     MPI ranks on one host: one shared window of gradient slots, one
                       copy of parameters and optimizer state; rank r sums part r of the
                       slots and updates part r of the parameters
    HierarchicalExchange  (coordinator.hierarchy) MPI across hosts: a shared window on
                       each host, one Allreduce per part between the hosts

Every exchange also sums any other buffer (`sum_`, for evaluation) and shares the
root's starting parameters and optimizer state with every process (`share_start`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddp.data import shard_bounds
from ddp.errors import UsageError
from ddp.optim import clip_

# The grad norm for the metrics under the shared window: every rank holds a part of the
# summed gradient, so the decision to measure it must be the same on every rank.
SHARED_NORM_EVERY = 16


def optimizer_step_(opt, params: np.ndarray, grad_sum: np.ndarray, n_samples: int, lo: int = 0,
                    total_sq=float) -> None:
    """`opt`'s update of params[lo:lo + len(grad_sum)] from the summed gradient; with
    --clip-norm, the averaged gradient is clipped first by its norm over every part:
    `total_sq(‖part‖²)` gives ‖g‖² (the part's own when it is the whole gradient)."""
    if opt.clip_norm is None:
        opt.step_(params, grad_sum, n_samples, lo)
        return
    g = opt.mean_grad_(params, grad_sum, n_samples, lo)
    clip_(g, total_sq(float(np.dot(g, g))), opt.clip_norm)
    opt.update_(params, g, lo)


class LocalExchange:
    """A world of one: this process's sums are the sums.

    Parameters
    ----------
    size : int
        Parameters in the model (the flat buffer's length).
    head : int
        Slots before the gradient in `buf` (the step's loss, count, ... statistics).
    dtype : numpy dtype
        Of parameters, gradients and optimizer state.
    """

    rank, world_size = 0, 1
    name = None  # as the summary's "exchange" names it

    def __init__(self, size: int, head: int, dtype):
        self.head = head
        self.buf = np.zeros(head + size, dtype=dtype)
        self.grad = self.buf[head:]  # the flat gradient sum, after the stats
        self.params = np.empty(size, dtype=dtype)

    def optimizer_state(self, slots: int) -> np.ndarray:
        """Room for `slots` arrays of per-parameter optimizer state."""
        return np.zeros((slots, len(self.params)), dtype=self.params.dtype)

    def layer_done(self, layer: int) -> None:
        """Backward has written layer `layer`'s gradient sums into `buf`."""

    def finish(self) -> np.ndarray:
        """The summed stats (the first `head` slots) once every process's sums met."""
        return self.buf[:self.head]

    def apply_(self, opt, n_samples: int, norm_due=None) -> float | None:
        """Move the parameters with the summed gradient of `n_samples` samples (`buf` is
        scratch afterwards). Returns ‖Σg‖ when `norm_due()` says the metrics want it."""
        g = self.grad
        norm = float(np.sqrt(np.dot(g, g))) if norm_due is not None and norm_due() else None
        optimizer_step_(opt, self.params, g, n_samples)
        return norm

    def sum_(self, buf: np.ndarray) -> None:
        """Sum `buf` over processes, in place."""

    def share_start(self, step: int, opt) -> int:
        """The root's starting step, parameters and optimizer state (its arrays and step
        count), on every process."""
        return step

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Bucket:
    """Elements [lo, hi) of the step's buffer, summed together once layer `after` has
    its gradients (None: once backward is over)."""

    lo: int
    hi: int
    after: int | None


def plan_buckets(layer_spans: list[tuple[int, int]], size: int, bucket_elems: int) -> list[Bucket]:
    """Group whole layers into buckets of at least `bucket_elems` elements, last layers
    first, the order in which backward produces them. `layer_spans[i]` is layer i's
    [lo, hi) in a buffer of `size` elements; what lies outside every layer (the loss
    and count slots) joins the last bucket, which starts when backward is over.
    bucket_elems <= 0 gives one bucket: a single Allreduce.
    """
    if bucket_elems <= 0:
        return [Bucket(0, size, None)]
    buckets, hi, elems = [], size, 0
    for i in range(len(layer_spans) - 1, 0, -1):  # layer 0 always ends the last bucket
        lo_i, hi_i = layer_spans[i]
        elems += hi_i - lo_i
        if elems >= bucket_elems:
            buckets.append(Bucket(lo_i, hi, i))
            hi, elems = lo_i, 0
    buckets.append(Bucket(0, hi, None))
    return buckets


class AllreduceExchange(LocalExchange):
    """One step's sum as non-blocking Allreduces, one per bucket, each started when
    backward has written the bucket's layers and all waited for before the update;
    every rank then applies the same update to its own copy of the parameters.
    Every later `layer_done` also tests the outstanding ones: without a progress thread
    MPICH advances a non-blocking collective only inside MPI calls."""

    name = "allreduce"

    def __init__(self, comm, size: int, head: int, dtype, buckets: list[Bucket]):
        super().__init__(size, head, dtype)
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        self.MPI, self.mpi = comm.MPI, comm.comm
        self.spin = not comm.oversubscribed
        self.views = [self.buf[b.lo:b.hi] for b in buckets]
        self.start_after = {b.after: k for k, b in enumerate(buckets) if b.after is not None}
        self.pending = []

    def layer_done(self, layer: int) -> None:
        k = self.start_after.get(layer)
        if k is not None:
            self.pending.append(self.mpi.Iallreduce(self.MPI.IN_PLACE, self.views[k], op=self.MPI.SUM))
        if self.pending:
            self.MPI.Request.Testall(self.pending)

    def finish(self) -> np.ndarray:
        if not self.pending and self.spin:
            self.mpi.Allreduce(self.MPI.IN_PLACE, self.views[-1], op=self.MPI.SUM)
        else:
            self.pending.append(self.mpi.Iallreduce(self.MPI.IN_PLACE, self.views[-1], op=self.MPI.SUM))
            self.comm.wait_(self.pending)
            self.pending.clear()
        return self.buf[:self.head]

    def sum_(self, buf: np.ndarray) -> None:
        self.comm.allreduce_(buf)

    def share_start(self, step: int, opt) -> int:
        box = np.array([step, opt.t], dtype=np.int64)
        self.comm.bcast_(box)
        self.comm.bcast_(self.params)
        self.comm.bcast_(opt.state)
        opt.t = int(box[1])
        return int(box[0])


class SharedExchange:
    """The step on one host, through shared memory instead of an Allreduce.

    Every rank writes its gradient sums into a slot of one shared window; the
    parameters and the optimizer state exist once, in another. After a barrier,
    rank r sums part r of every slot and applies the optimizer to part r of the
    parameters; a second barrier and every rank reads the new parameters. Each
    rank touches 1/N of the update: no buffer is copied and nothing is sent.

    `host` (default `comm`) is the ranks that share the windows; the hierarchical
    exchange (`coordinator.hierarchy`) gives each host's own, with `comm` the world.
    """

    name = "shared"

    def __init__(self, comm, size: int, head: int, dtype, state_slots: int, metrics: bool,
                 host=None):
        host = comm if host is None else host
        MPI = comm.MPI
        self.comm, self.host, self.rank, self.world_size = comm, host, comm.rank, comm.world_size
        self.head, self.metrics, self.steps = head, metrics, 0
        dtype, n_local = np.dtype(dtype), host.world_size
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each rank's slot on pages of its own
        self.win_slots = MPI.Win.Allocate_shared((head + size) * dtype.itemsize, dtype.itemsize,
                                                 info, host.comm)
        # parameters, optimizer state, each part's ‖Σg‖² (metrics) and ‖g‖² (--clip-norm):
        # one copy, in the segment of the host's rank 0
        n_model = (1 + state_slots) * size + 2 * n_local
        self.win_model = MPI.Win.Allocate_shared(n_model * dtype.itemsize if host.rank == 0 else 0,
                                                 dtype.itemsize, info, host.comm)
        info.Free()
        self.slots = [np.frombuffer(self.win_slots.Shared_query(q)[0], dtype, count=head + size)
                      for q in range(n_local)]
        model = np.frombuffer(self.win_model.Shared_query(0)[0], dtype, count=n_model)
        self.params = model[:size]
        self.state = model[size:(1 + state_slots) * size].reshape(state_slots, size)
        self.norms = model[(1 + state_slots) * size:][:n_local]
        self.clip_sq = model[(1 + state_slots) * size + n_local:]
        self.buf = self.slots[host.rank]
        self.buf[:] = 0
        self.grad = self.buf[head:]
        self.lo, self.hi = shard_bounds(size, n_local, host.rank)  # this rank's part
        self.totals = np.zeros(head, dtype=np.float64)

    def optimizer_state(self, slots: int) -> np.ndarray:
        return self.state

    def layer_done(self, layer: int) -> None:
        pass

    def finish(self) -> np.ndarray:
        """Every rank's gradients are in its slot; the stats are summed into `totals`."""
        self.host.barrier()
        self.sum_stats_()
        return self.totals

    def sum_stats_(self) -> None:
        """`totals`: the stats of every slot, added in the same order on every rank."""
        self.totals[:] = 0
        for slot in self.slots:
            self.totals += slot[:self.head]

    def sum_slots_(self, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) of the step's buffer summed over every slot, into this rank's
        own (no other rank reads that range of it); returned as a view."""
        acc = self.buf[lo:hi]
        for q, slot in enumerate(self.slots):
            if q != self.host.rank:
                acc += slot[lo:hi]
        return acc

    def apply_(self, opt, n_samples: int, norm_due=None) -> float | None:
        """Sum part `rank` of the slots and apply `opt` to that part of the parameters;
        when this returns, every rank's part is updated."""
        return self.update_part_(opt, n_samples, self.sum_slots_(self.head + self.lo, self.head + self.hi))

    def update_part_(self, opt, n_samples: int, acc: np.ndarray) -> float | None:
        """Apply `opt` to this rank's part of the parameters from `acc`, the part's summed
        gradient; a barrier, and every part is updated. The norm is measured every
        SHARED_NORM_EVERY steps alike on every rank, when metrics are on."""
        want_norm = self.metrics and self.steps % SHARED_NORM_EVERY == 0
        self.steps += 1
        if want_norm:
            self.norms[self.host.rank] = np.dot(acc, acc)
        optimizer_step_(opt, self.params, acc, n_samples, self.lo, self._total_sq)
        self.host.barrier()
        return float(np.sqrt(self.norms.sum())) if want_norm else None

    def _total_sq(self, part_sq: float) -> float:
        """‖g‖² of the whole averaged gradient from every rank's part: one barrier, then
        every rank adds the same numbers in the same order, so all clip alike."""
        self.clip_sq[self.host.rank] = part_sq
        self.host.barrier()
        return float(self.clip_sq.sum())

    def sum_(self, buf: np.ndarray) -> None:
        self.comm.allreduce_(buf)

    def share_start(self, step: int, opt) -> int:
        """Rank 0 wrote the one copy of parameters and state; every rank learns the step
        and the optimizer's step count."""
        box = np.array([step, opt.t], dtype=np.int64)
        self.comm.bcast_(box)
        self.host.barrier()
        self.steps, opt.t = int(box[0]), int(box[1])
        return int(box[0])

    def close(self) -> None:
        self.win_slots.Free()
        self.win_model.Free()


def make_exchange(comm, layout, cfg, head: int, state_slots: int):
    """The exchange for this world: one process, the shared window (every rank on one
    host, unless --exchange allreduce or hierarchical), the hierarchical exchange
    (--exchange hierarchical), or bucketed Allreduces (--bucket-mb)."""
    dtype = np.dtype(cfg.dtype)
    world = comm.world_size
    one_host = world > 1 and comm.local_size == world
    comm.agree(UsageError("--exchange shared needs every rank on one host; use --exchange auto")
               if cfg.exchange == "shared" and world > 1 and not one_host else None)
    if world == 1:
        return LocalExchange(layout.size, head, dtype)
    metrics = bool(cfg.metrics_port)
    if one_host and cfg.exchange in ("auto", "shared"):
        return SharedExchange(comm, layout.size, head, dtype, state_slots, metrics)
    buckets = plan_buckets([(head + lo, head + hi) for lo, hi in layout.layer_spans()],
                           head + layout.size, int(cfg.bucket_mb * 1e6) // dtype.itemsize)
    if cfg.exchange in ("hierarchical", "auto"):
        from .hierarchy import host_shape, make_hierarchical  # it builds on this module's classes
        hosts, fewest, most = host_shape(comm)
        # auto: measured faster than allreduce on 2 hosts x 2 ranks (README, Performance)
        if cfg.exchange == "hierarchical" or (hosts >= 2 and fewest == most >= 2):
            return make_hierarchical(comm, layout.size, head, dtype, state_slots, metrics, buckets)
    return AllreduceExchange(comm, layout.size, head, dtype, buckets)
