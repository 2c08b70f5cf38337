"""The training service's workers: one pool, shared by the jobs that run.

Every worker connected to the service is a member of the pool's `Membership` (its
strikes, bans and heartbeats are the pool's). A member is idle (`job` ""), loading a
job's data (`joined` False) or in a job. `JobMembers` is one job's view of the pool:
the members in that job, with the interface `Shards` uses, so a job's steps are cut,
checked and summed exactly as the one-job coordinator does it.
"""
from __future__ import annotations

import time

from ddp.log import Log
from ddp.monitor import Monitor

from .membership import Member, Membership


class JobMembers:
    """The pool's members that are in one job (its protocol id `wire`)."""

    def __init__(self, pool: Membership, wire: str, log: Log, monitor: Monitor | None):
        self.pool, self.wire, self.log, self.monitor = pool, wire, log, monitor

    def all(self) -> list[Member]:
        """The job's members, in the order they joined the pool."""
        return [m for m in self.pool.members.values() if m.job == self.wire and m.joined]

    def joining(self) -> list[Member]:
        return [m for m in self.pool.members.values() if m.job == self.wire and not m.joined]

    def get(self, peer: bytes) -> Member | None:
        member = self.pool.members.get(peer)
        return member if member is not None and member.job == self.wire and member.joined else None

    def __contains__(self, peer: bytes) -> bool:
        return self.get(peer) is not None

    def __len__(self) -> int:
        return len(self.all())

    def __bool__(self) -> bool:
        return any(m.job == self.wire and m.joined for m in self.pool.members.values())

    def send(self, peer: bytes, header: bytes, array=None) -> bool:
        return self.pool.send(peer, header, array)

    def reply(self, peer: bytes, type_: str, **fields) -> None:
        self.pool.reply(peer, type_, **fields)

    def drop(self, reason: str) -> None:
        self.pool.drop(reason)
        if self.monitor is not None:
            self.monitor.reject(reason)

    def strike(self, peer: bytes, reason: str):
        return self.pool.strike(peer, reason)

    def invite(self, member: Member, config: dict, fingerprint: str) -> None:
        """Send a pool member this job: it loads the data (or has it) and answers ready."""
        member.job, member.joined = self.wire, False
        member.tasks, member.rows, member.misses = set(), 0, 0
        self.pool.reply(member.peer, "job", job=self.wire, config=config, fingerprint=fingerprint,
                        heartbeat=self.pool.heartbeat, timeout=self.pool.timeout, pool=True)

    def admit(self, member: Member, step: int) -> None:
        """A member whose data matched: it computes shards from the next step on."""
        member.joined, member.joined_step = True, step
        member.last_heard = time.monotonic()
        self.log.info(f"{member.name} joined ({len(self)} worker{'s' * (len(self) > 1)})")
        self.pool.reply(member.peer, "welcome", job=self.wire, step=step)
        if self.monitor is not None:
            self.monitor.worker_joined(member.name, step)
            self.monitor.set_workers(len(self))

    def release(self, member: Member, why: str) -> None:
        """Back to the pool, idle (it holds no task of this job)."""
        was_in = member.joined
        member.job, member.joined = "", True
        member.last_heard = time.monotonic()
        self.pool.reply(member.peer, "idle", heartbeat=self.pool.heartbeat, timeout=self.pool.timeout)
        if was_in:
            self.log.info(f"{member.name} {why} ({len(self)} left)")
            if self.monitor is not None:
                self.monitor.worker_left(member.name, why, False)
                self.monitor.set_workers(len(self))

    def release_all(self, shards, why: str) -> None:
        """Every member and joiner back to the pool; their tasks of `shards` forgotten."""
        for member in self.joining() + self.all():
            if shards is not None:
                for task in member.tasks:
                    shards.tasks.pop(task, None)
            member.tasks.clear()
            self.release(member, why)

    def movable(self) -> list[Member]:
        """Members that hold no task of the step: they may move to another job now."""
        return [m for m in self.joining() + self.all() if not m.tasks]

    def size(self) -> int:
        return len(self.all()) + len(self.joining())

    def remove(self, member: Member, why: str, lost: bool = False) -> None:
        """A member that is gone from the service (left, lost, banned)."""
        if member.peer in self.pool.members:
            self.pool.remove(member, why, lost)
        if self.monitor is not None:
            self.monitor.worker_left(member.name, why, lost)
            self.monitor.set_workers(len(self))


def enter(pool: Membership, peer: bytes, host: str, cores: int) -> Member:
    """A worker that said hello joins the pool, idle, and is told to wait."""
    now = time.monotonic()
    name = f"worker {next(pool.names)}"
    member = Member(peer, name, 0, last_heard=now, last_sent=now, host=host, cores=cores)
    pool.members[peer] = member
    pool.log.info(f"{name} connected ({len(pool)} worker{'s' * (len(pool) > 1)} in the pool)")
    pool.reply(peer, "idle", heartbeat=pool.heartbeat, timeout=pool.timeout)
    pool.share_host(host)
    return member


def targets(jobs: list, workers: int) -> list[int]:
    """How many workers each running job gets (jobs in queue order): its min_workers
    first, as far as there are workers, then the rest dealt out one by one."""
    share = [0] * len(jobs)
    left = workers
    for i, job in enumerate(jobs):
        share[i] = min(job.cfg.min_workers, left)
        left -= share[i]
    i = 0
    while left > 0 and jobs:
        share[i % len(jobs)] += 1
        left -= 1
        i += 1
    return share

