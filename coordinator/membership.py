"""Who takes part in the job: members, peers in the handshake, strikes and bans.

A peer says hello, is sent the job, answers ready with its data's fingerprint and is
admitted as a member; from then on it is heard (any message) and sent heartbeats. Every
message that is dropped is counted by reason; an invalid one is also a strike against its
peer, and a peer with STRIKES_BEFORE_BAN strikes is ignored from then on. The per-peer
tables of peers that are not members are bounded (MAX_TRACKED_PEERS, oldest out first).
"""
from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ddp import protocol
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.threads import share_of_host

from .transport import Router

STRIKES_BEFORE_BAN = 20     # invalid messages after which a peer is ignored
MAX_TRACKED_PEERS = 4096    # bound on per-peer bookkeeping of unknown peers


@dataclass
class Member:
    peer: bytes                # ZeroMQ routing id
    name: str                  # for log lines: "worker 3 (host pid 1234)"
    joined_step: int
    last_heard: float
    last_sent: float = 0.0
    tasks: set = field(default_factory=set)
    rows: int = 0              # rows of outstanding tasks
    misses: int = 0            # shard deadlines missed in a row
    host: str = ""             # the machine it runs on (an opaque id) and its cores
    cores: int = 1
    job: str = ""              # the protocol id of the job it is in ("": a service's idle worker)
    joined: bool = True        # False while it loads a service's job: not expected to answer


class Membership:
    """The members (in the order they joined), the peers between hello and ready, the
    strikes and bans; sends to peers through the router, noting when each member was
    last sent something (a heartbeat is due after `heartbeat` s of quiet)."""

    def __init__(self, router: Router, log: Log, monitor: Monitor | None, timeout: float):
        self.router, self.log, self.monitor = router, log, monitor
        self.timeout = timeout
        self.heartbeat = max(0.05, timeout / 6)
        self.members: dict[bytes, Member] = {}
        self.pending: OrderedDict[bytes, tuple[str, float, str, int]] = OrderedDict()
        # ↑ sent the job: name, when, host, cores
        self.strikes: OrderedDict[bytes, int] = OrderedDict()
        self.banned: OrderedDict[bytes, None] = OrderedDict()
        self.dropped: Counter = Counter()
        self.names = itertools.count(1)
        self.lost = 0

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, peer: bytes) -> bool:
        return peer in self.members

    def all(self) -> list[Member]:
        """The members, in the order they joined."""
        return list(self.members.values())

    def get(self, peer: bytes) -> Member | None:
        return self.members.get(peer)

    def send(self, peer: bytes, header: bytes, array: np.ndarray | None = None) -> bool:
        """Send without blocking; False when the peer is gone or not reading."""
        if not self.router.send(peer, header, array):
            return False
        member = self.members.get(peer)
        if member is not None:
            member.last_sent = time.monotonic()
        return True

    def reply(self, peer: bytes, type_: str, **fields) -> None:
        self.send(peer, protocol.encode(type_, **fields))

    def drop(self, reason: str) -> None:
        """Count a message that is dropped."""
        self.dropped[reason] += 1
        if self.monitor is not None:
            self.monitor.reject(reason)

    def strike(self, peer: bytes, reason: str) -> tuple[Member, str] | None:
        """Count an invalid message against its peer; (member, why) when that makes a member
        banned, for the caller to drop it (its rows must go elsewhere)."""
        self.drop(reason)
        n = self.strikes.pop(peer, 0) + 1
        self.strikes[peer] = n
        while len(self.strikes) > MAX_TRACKED_PEERS:
            self.strikes.popitem(last=False)
        if n < STRIKES_BEFORE_BAN:
            return None
        self.banned[peer] = None
        while len(self.banned) > MAX_TRACKED_PEERS:
            self.banned.popitem(last=False)
        member = self.members.get(peer)
        return None if member is None else (member, f"sent {n} invalid messages; ignoring it from now on")

    def heard_from(self, peer: bytes, kind: str) -> Member | None:
        """The member that sent a message of `kind`, now heard; None for a peer that is not
        one, which is counted and (unless it said bye) told to say hello again, as a worker
        of a coordinator that restarted must."""
        member = self.members.get(peer)
        if member is None:
            self.drop("unknown worker")
            if kind != "bye":
                self.reply(peer, "rejoin")
            return None
        member.last_heard = time.monotonic()
        return member

    def hello(self, peer: bytes, host: str = "", cores: int = 1) -> str:
        """A new peer in the handshake (not a member: the caller drops one first); its name."""
        name = f"worker {next(self.names)}"
        self.pending.pop(peer, None)
        self.pending[peer] = (name, time.monotonic(), host, cores)
        while len(self.pending) > MAX_TRACKED_PEERS:
            self.pending.popitem(last=False)
        return name

    def admit(self, peer: bytes, name: str, step: int, job_id: str, host: str = "",
              cores: int = 1) -> Member:
        now = time.monotonic()
        member = Member(peer, name, step, last_heard=now, last_sent=now, host=host, cores=cores,
                        job=job_id)
        self.members[peer] = member
        self.log.info(f"{name} joined ({len(self.members)} worker{'s' * (len(self.members) > 1)}); "
                      f"it takes a shard from the next step")
        self.reply(peer, "welcome", job=job_id, step=step)
        if self.monitor is not None:
            self.monitor.worker_joined(name, step)
            self.monitor.set_workers(len(self.members))
        self.share_host(host)
        return member

    def share_host(self, host: str) -> None:
        """Tell each member on `host` its share of the host's cores (cores ÷ the members
        there): workers that share a machine do not each take all its cores."""
        if not host:
            return
        there = [m for m in self.members.values() if m.host == host]
        for member in there:
            self.reply(member.peer, "threads", threads=share_of_host(member.cores, len(there)))

    def remove(self, member: Member, why: str, lost: bool = False) -> None:
        """Forget a member that left (`lost`: without saying so); log and count it."""
        del self.members[member.peer]
        self.share_host(member.host)
        self.log.info(f"{member.name} {why} ({len(self.members)} left)")
        if lost:
            self.lost += 1
        if self.monitor is not None:
            self.monitor.worker_left(member.name, why, lost)
            self.monitor.set_workers(len(self.members))

    def gone(self, now: float):
        """Yield (member, why) for each member that is silent past the timeout or whose
        connection closed, sending heartbeats (of the member's job) to the others that are
        due one. The caller drops each as it comes (which may drop others: those are
        skipped). A member loading a job's data is not expected to answer meanwhile."""
        probing = self.router.probe_due(now)
        for member in list(self.members.values()):
            if member.peer not in self.members:  # dropped meanwhile (a reassignment failed)
                continue
            if member.joined and now - member.last_heard > self.timeout:
                yield member, f"is lost (silent for {now - member.last_heard:.1f} s)"
            elif probing or now - member.last_sent > self.heartbeat:
                if not self.send(member.peer, protocol.encode("heartbeat", job=member.job)):
                    yield member, "is lost (connection closed)"

    def stop_all(self, reason: str) -> int:
        """Tell every member and pending peer to stop and forget them; how many were told."""
        told = 0
        for peer in list(self.members) + list(self.pending):
            told += self.send(peer, protocol.encode("stop", reason=reason))
        self.members.clear()
        self.pending.clear()
        return told
