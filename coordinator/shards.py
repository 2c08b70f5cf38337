"""One step's shards: who computes which rows, by when, and the exact sum of what came back.

The step's global batch is cut into contiguous shards over the members present (by sample
index, as MPI cuts it over ranks), each a task sent with the current parameters. A task
whose worker leaves, dies, answers with something invalid or misses its deadline is handed
to another worker under a new task id, so that a late answer to the old one is recognised
as stale and never summed. The results are added in shard order: the sum does not depend
on who computed what or in which order results arrived.
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ddp import data as ddata
from ddp import protocol
from ddp.errors import DivergedError
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.protocol import ProtocolError

from .membership import Member, Membership

# A shard's deadline: DEADLINE_FACTOR × the median turnaround (task sent → result in) of the
# last RECENT_SHARDS shards, and never less than --shard-timeout (default: --worker-timeout,
# the silence that already counts as dead). A peer that heartbeats but never answers (or
# whose compute thread hung) would otherwise hold the step for ever. Until one shard was
# measured (start-up: BLAS, page cache) the deadline is FIRST_SHARD_DEADLINE.
DEADLINE_FACTOR = 10
RECENT_SHARDS = 64
FIRST_SHARD_DEADLINE = 60.0
MISSES_BEFORE_DROP = 3      # deadlines missed in a row after which a worker is dropped


@dataclass
class Task:
    id: int
    lo: int
    hi: int
    peer: bytes | None = None
    sent: float = 0.0              # monotonic time it was sent to its peer
    result: tuple | None = None    # (gradient sum view, frame, loss sum, correct, weight sum)
    diverged: int = 0              # times a worker reported a non-finite loss for these rows


class Deadline:
    """How long a shard may take: from the turnarounds measured here (not the peers' claims)."""

    def __init__(self, floor: float):
        self.floor = floor
        self.turnarounds: deque = deque(maxlen=RECENT_SHARDS)  # seconds

    def record(self, seconds: float) -> None:
        self.turnarounds.append(seconds)

    def seconds(self) -> float:
        """Seconds a shard may take before its rows are recomputed by another worker."""
        if not self.turnarounds:
            return max(self.floor, FIRST_SHARD_DEADLINE)
        return max(self.floor, DEADLINE_FACTOR * statistics.median(self.turnarounds))


class Shards:
    """The current step's tasks over the members; a lost member's rows go to the others."""

    def __init__(self, members: Membership, log: Log, monitor: Monitor | None, job_id: str,
                 dtype: np.dtype, size: int, deadline: Deadline):
        self.members, self.log, self.monitor = members, log, monitor
        self.job_id, self.dtype, self.P = job_id, dtype, size
        self.deadline = deadline
        self.task_ids = itertools.count(1)
        self.tasks: dict[int, Task] = {}
        self.step = 0
        self.params_buf = None
        self.step_compute = 0.0  # the slowest shard's compute seconds in the current step
        self.timeouts = 0
        self.weight_sum = 0.0  # Σ weights of the step's rows, set by sum_
        self.recovering_since: float | None = None  # when rows of this step were first reassigned

    def start(self, step: int, params: np.ndarray, n: int) -> None:
        """Cut `step`'s n rows over the members (never more shards than rows) and send them."""
        # Sent zero-copy: the update writes into this buffer only after every shard of the
        # step came back. A copy still queued then for a stalled worker may go out half
        # updated, but it belongs to a finished step, so its answer is dropped as stale.
        self.params_buf = params.view(self.dtype)
        members = self.members.all()[:n]
        self.tasks = {}
        for i, member in enumerate(members):
            lo, hi = ddata.shard_bounds(n, len(members), i)
            task = Task(next(self.task_ids), lo, hi)
            self.tasks[task.id] = task
        for task, member in zip(list(self.tasks.values()), members):
            if member.peer in self.members:
                self.assign(task, member)
            else:
                self.reassign(task)

    def all_back(self) -> bool:
        return all(t.result is not None for t in self.tasks.values())

    def assign(self, task: Task, member: Member) -> None:
        task.peer = member.peer
        task.sent = time.monotonic()
        member.tasks.add(task.id)
        member.rows += task.hi - task.lo
        header = protocol.encode("task", job=self.job_id, step=self.step, task=task.id,
                                 lo=task.lo, hi=task.hi)
        if not self.members.send(member.peer, header, self.params_buf):
            self.drop_member(member, "is lost (unreachable)", lost=True)

    def assign_unassigned(self, member: Member) -> None:
        """Rows left without a worker go to a newcomer at once."""
        for task in self.tasks.values():
            if task.peer is None and task.result is None:
                self.assign(task, member)

    def reassign(self, task: Task, avoid: bytes | None = None) -> None:
        """Give a task's rows to the least busy member (another than `avoid` if possible)
        under a new task id, so a late answer to the old one is recognised as stale."""
        old = self.tasks.pop(task.id)
        member = self.members.get(old.peer) if old.peer is not None else None
        if member is not None and old.id in member.tasks:  # still outstanding there
            member.tasks.discard(old.id)
            member.rows -= old.hi - old.lo
        new = Task(next(self.task_ids), old.lo, old.hi, diverged=old.diverged)
        self.tasks[new.id] = new
        everyone = self.members.all()
        candidates = [m for m in everyone if m.peer != avoid] or everyone
        if candidates:
            self.assign(new, min(candidates, key=lambda m: m.rows))

    def drop_member(self, member: Member, why: str, lost: bool = False) -> None:
        """A member is gone: forget it and give its outstanding rows to the others."""
        orphans = [self.tasks[t] for t in sorted(member.tasks) if t in self.tasks]
        what = ""
        if orphans:
            rows = ", ".join(f"[{t.lo}, {t.hi})" for t in orphans)
            what = f"; rows {rows} of step {self.step + 1} go to other workers"
            if self.recovering_since is None:
                self.recovering_since = time.monotonic()
        self.members.remove(member, f"{why}{what}", lost)
        for task in orphans:
            self.reassign(task)

    def strike(self, peer: bytes, reason: str) -> None:
        """An invalid message from `peer`; a member banned by it is dropped."""
        banned = self.members.strike(peer, reason)
        if banned is not None:
            self.drop_member(*banned)

    def result(self, member: Member, msg: dict, frames: list) -> None:
        """A member's answer to a task ("grads" or "diverged"), validated before it is kept."""
        task = self.tasks.get(msg["task"])
        if msg["step"] != self.step or task is None or task.peer != member.peer:
            return self.members.drop("stale")
        if task.result is not None:
            return self.members.drop("duplicate")
        if msg["type"] == "diverged":
            task.diverged += 1
            if task.diverged >= 2:  # confirmed by a second computation
                raise DivergedError(f"loss became NaN/Inf at step {self.step + 1} (rows "
                                    f"[{task.lo}, {task.hi}) of the batch); lower --lr or check the data")
            return self.reassign(task, avoid=member.peer)
        n = task.hi - task.lo
        try:
            if msg["n"] != n or msg["correct"] > n or msg["weight"] < 0:
                raise ProtocolError(f"counts n={msg['n']} correct={msg['correct']} "
                                    f"weight={msg['weight']} for {n} rows")
            grad = protocol.array_from_frame(frames[2].buffer, self.dtype, self.P)
        except ProtocolError:
            self.strike(member.peer, "invalid result")
            if member.peer in self.members:
                self.reassign(task, avoid=member.peer)
            return
        task.result = (grad, frames[2], float(msg["loss"]), int(msg["correct"]), float(msg["weight"]))
        self.deadline.record(time.monotonic() - task.sent)
        member.misses = 0
        seconds = max(0.0, msg["seconds"])
        self.step_compute = max(self.step_compute, seconds)
        if self.monitor is not None:
            self.monitor.worker_report(member.name, self.step + 1, seconds)
        member.tasks.discard(task.id)
        member.rows -= n

    def check_deadlines(self, now: float) -> None:
        """Hand the rows of every overdue shard to another worker under a new task id, so
        the late answer, if it ever comes, is dropped as stale and never summed."""
        allowed = None
        for task in list(self.tasks.values()):
            if task.result is not None or task.peer is None or task.id not in self.tasks:
                continue
            allowed = allowed or self.deadline.seconds()
            member = self.members.get(task.peer)
            if member is None or now - task.sent <= allowed:
                continue
            self.timeouts += 1
            member.misses += 1
            if self.monitor is not None:
                self.monitor.shard_timeout()
            what = (f"rows [{task.lo}, {task.hi}) of step {self.step + 1} not back after "
                    f"{now - task.sent:.1f} s (deadline {allowed:.1f} s)")
            if member.misses >= MISSES_BEFORE_DROP:
                self.drop_member(member, f"missed {member.misses} shard deadlines in a row "
                                         f"({what})", lost=True)
                continue
            if self.recovering_since is None:
                self.recovering_since = now
            others = [m for m in self.members.all() if m.peer != member.peer]
            if others:
                self.log.info(f"{member.name}: {what}; recomputed by another worker")
                self.reassign(task, avoid=member.peer)
            else:  # nobody else to give them to: keep waiting, one more deadline
                self.log.info(f"{member.name}: {what}; no other worker to recompute them")
                task.sent = now

    def sum_(self, grad_sum: np.ndarray):
        """Add the results in shard order into grad_sum; (loss, correct), or (None, None)
        after sending back for recomputation the shards whose sums are not finite. The
        weight sum, added in the same order, is left in `weight_sum`."""
        done = sorted(self.tasks.values(), key=lambda t: t.lo)
        add_in_order_(grad_sum, [t.result[0] for t in done])
        if not all_finite(grad_sum):
            bad = [t for t in done if not all_finite(t.result[0])]
            if bad:  # finite sums can overflow only together; a non-finite one is invalid
                for task in bad:
                    self.strike(task.peer, "non-finite gradients")
                    task.result = None
                    task.diverged += 1
                    if task.diverged >= 2:
                        raise DivergedError(f"gradients became NaN/Inf at step {self.step + 1}; "
                                            f"lower --lr or check the data")
                    self.reassign(task, avoid=task.peer)
                return None, None
            raise DivergedError(f"gradients overflowed at step {self.step + 1}; lower --lr")
        loss = sum(t.result[2] for t in done)
        correct = sum(t.result[3] for t in done)
        self.weight_sum = sum(t.result[4] for t in done)
        for task in done:
            task.result = (None, None, *task.result[2:])  # release the frames
        return loss, correct


def add_in_order_(out: np.ndarray, parts: list[np.ndarray]) -> None:
    """out = ((parts[0] + parts[1]) + parts[2]) + ...: one fixed order, so the sum is the
    same bits whoever computed which part."""
    if len(parts) == 1:
        np.copyto(out, parts[0])
    else:
        np.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out += part


def all_finite(a: np.ndarray) -> bool:
    """Σa² is a sum of non-negative terms: finite exactly when every term is, unless
    the squares overflow, which the exact (slower) check then rules out."""
    return bool(np.isfinite(np.dot(a, a))) or bool(np.isfinite(a).all())
