"""Fuzzing a real ZeroMQ coordinator while it trains with two real workers.

Raw DEALER sockets (many routing ids) send junk of every kind, another sends frames far
above MAXMSGSIZE, and a "member" does the real handshake, gets admitted and answers its
tasks with garbage. The run must finish with exactly the parameters of an undisturbed
single-process run, count what it dropped, and keep its memory bounded.
"""
from __future__ import annotations

import json
import random
import re
import threading
import time

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from helpers import read_json, rss_mb, train
from ddp import protocol
from ddp.model import Layout
from zmq_helpers import HELLO, SMALL, ipc, max_param_diff, procs, served  # noqa: F401, F811 (fixtures)

STEPS = 1000
ARGS = [*SMALL, "--steps", str(STEPS), "--log-every", "1"]
assert SMALL[SMALL.index("--dtype") + 1] == "float64"
P = Layout(tuple(int(n) for n in SMALL[SMALL.index("--layers") + 1].split(",")), True).size
MAXMSG = P * 8          # bytes of a parameter-sized float64 array: the largest valid frame
ABOVE_LIMIT = MAXMSG + 65536  # above the coordinator's MAXMSGSIZE (the largest valid frame plus
                              # some slack for the CURVE overhead): libzmq drops the connection
BATCH = int(SMALL[SMALL.index("--batch-size") + 1])
RSS_BOUND_MB = 64
BRAKE_STEPS = 300       # the member holds its tasks this close to the end until fuzzing is over
OTHER_JOB = "f" * 16


# --- small tools ------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """The peak VmRSS of a process, sampled every few milliseconds."""

    def __init__(self, pid: int, every: float = 0.004):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0.0
        self.samples = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            r = rss_mb(self.pid)
            if r is not None:
                self.peak = max(self.peak, r)
                self.samples += 1
            self.halt.wait(self.every)

    def stop(self) -> float:
        self.halt.set()
        self.join(5)
        return self.peak


class Sockets:
    """Every socket a thread opens, closed with linger 0 at the end whatever happens."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.ctx, self.endpoint = ctx, endpoint
        self.open: list = []

    def dealer(self, routing_id: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 10_000)      # a blocked send fails the test, never hangs
        s.setsockopt(zmq.RECONNECT_IVL, 10)
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.connect(self.endpoint)
        self.open.append(s)
        return s

    def close(self, s) -> None:
        if s in self.open:
            self.open.remove(s)
        s.close(linger=0)

    def close_all(self) -> None:
        for s in list(self.open):
            self.close(s)


def recv_msg(sock, timeout: float):
    """(decoded header, frames) of the coordinator's next message, or None after `timeout` s.
    Everything the coordinator sends must be valid protocol."""
    if timeout <= 0 or not sock.poll(int(timeout * 1000)):
        return None
    frames = sock.recv_multipart()
    msg = protocol.decode(frames[0], protocol.FROM_COORDINATOR, protocol.MAX_REPLY_HEADER)
    assert (len(frames) == 2) == (msg["type"] in protocol.ARRAY_TYPES), (msg, len(frames))
    return msg, frames


def wait_for_type(sock, type_: str, timeout: float):
    """The next message of `type_` (others are skipped), or None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        got = recv_msg(sock, left)
        if got is None:
            return None
        if got[0]["type"] == type_:
            return got


def status_of(sockets: Sockets, timeout: float = 10.0) -> dict:
    s = sockets.dealer()
    try:
        s.send(protocol.encode("status"))
        got = wait_for_type(s, "status_reply", timeout)
        assert got is not None, "the coordinator did not answer a status request"
        return got[0]["status"]
    finally:
        sockets.close(s)


def hexid(rng: random.Random, n: int = 16) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


# finite, wrong gradient sums: if any of them were ever applied, the parameters would be off
_GARBAGE = [np.random.default_rng(i).normal(0, 100, P).astype("<f8").tobytes() for i in range(4)]


def garbage(rng: random.Random, nbytes: int = MAXMSG) -> bytes:
    return rng.choice(_GARBAGE)[:nbytes] if nbytes <= MAXMSG else rng.choice(_GARBAGE) + bytes(
        nbytes - MAXMSG)


def small(rng: random.Random) -> bytes:
    """An array frame where its size does not matter (the header is refused first)."""
    return rng.randbytes(rng.choice([0, 8, 100])) if rng.random() < 0.9 else garbage(rng)


def with_nan(rng: random.Random, kind: str = "nan") -> bytes:
    a = np.frombuffer(garbage(rng), "<f8").copy()
    bad = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    if rng.random() < 0.5:
        a[rng.randrange(a.size)] = bad       # one bad element among finite ones
    else:
        a[:] = bad
    return a.tobytes()


# --- raw junk (no membership) -----------------------------------------------------------


class Junk:
    """Messages that a coordinator must drop and count in `dropped`: strike() ones are
    malformed (a strike against the peer), no_strike() ones are well formed but for another
    job or from a peer that is not a member."""

    def __init__(self, rng: random.Random, job: str):
        self.rng, self.job = rng, job

    def valid_header(self, job: str | None = None) -> tuple[str, dict]:
        r = self.rng
        job = job or self.job
        type_ = r.choice(["ready", "grads", "diverged", "heartbeat", "bye"])
        fields = {
            "ready": {"job": job, "fingerprint": hexid(r, 32)},
            "grads": {"job": job, "step": r.randrange(STEPS), "task": r.randrange(1, 10**6),
                      "n": r.randrange(64), "loss": r.random() * 10, "correct": r.randrange(64),
                      "weight": r.random() * 64, "seconds": r.random()},
            "diverged": {"job": job, "step": r.randrange(STEPS), "task": r.randrange(1, 10**6)},
            "heartbeat": {"job": job},
            "bye": {"job": job},
        }[type_]
        return type_, fields

    def strike(self) -> list:
        """A malformed message (one strike)."""
        r = self.rng
        kind = r.randrange(12)
        if kind == 0:  # random bytes, one to three frames
            sizes = [0, 1, 7, 100, 1000, 4096, 5000]
            return [r.randbytes(r.choice(sizes)) for _ in range(r.randint(1, 3))]
        if kind == 1:  # a truncated valid header (with its array frame if it has one)
            type_, fields = self.valid_header()
            raw = protocol.encode(type_, **fields)
            frames = [raw[:r.randrange(len(raw))]]
            return frames + ([small(r)] if type_ in protocol.ARRAY_TYPES else [])
        if kind == 2:  # valid JSON, wrong field types
            type_, fields = self.valid_header()
            name = r.choice(sorted(fields))
            if name in ("job", "fingerprint"):  # not a lowercase hex string of 1-64 characters
                bad = [True, None, 7, [1], {"a": 1}, "", "ABC", "xyz", "f" * 65, "12 3"]
            elif name == "loss":                 # not a finite number
                bad = [True, False, None, "1.0", [1.0], {"a": 1}]
            else:                                # not an int in [0, 2**53)
                bad = [True, False, None, "7", [1], {"a": 1}, -1, 1 << 53, 2.5, 1.0, 10**30]
            fields[name] = r.choice(bad)
            return self.json_msg(type_, fields)
        if kind == 3:  # missing field
            type_, fields = self.valid_header()
            fields.pop(r.choice(sorted(fields)))
            return self.json_msg(type_, fields)
        if kind == 4:  # unknown extra field
            type_, fields = self.valid_header()
            fields[r.choice(["extra", "v2", "pickle", "__class__"])] = r.choice([1, "x", None])
            return self.json_msg(type_, fields)
        if kind == 5:  # JSON constants / overflowing numbers
            raw = protocol.encode("grads", job=self.job, step=1, task=1, n=1, loss=0.5, correct=0,
                                  weight=1.0, seconds=0.01)
            const = r.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
            field = r.choice([b'"loss":0.5', b'"step":1', b'"n":1'])
            raw = raw.replace(field, field.split(b":")[0] + b":" + const)
            assert const in raw
            return [raw, small(r)]
        if kind == 6:  # wrong / missing / bool version, unknown or coordinator-only type
            msg = {"v": 1, "type": "heartbeat", "job": self.job}
            what = r.randrange(4)
            if what == 0:
                msg["v"] = r.choice([0, 2, True, "1", None, -1])
            elif what == 1:
                del msg["v"]
            elif what == 2:
                msg["type"] = r.choice(["job", "welcome", "task", "stop", "rejoin", "refuse",
                                        "status_reply", "HELLO", "", None, 5])
            else:
                msg["type"] = "".join(r.choice("abcxyz_") for _ in range(r.randint(1, 30)))
            return [json.dumps(msg).encode()]
        if kind == 7:  # not an object, or not UTF-8
            return [r.choice([b"[]", b"null", b"1", b'"hello"', b"\xff\xfe\xfd",
                              b'{"v":1,"type":"he\xffllo"}', b"[" * 4000 + b"]" * 4000,
                              b"{" * 3000])]
        if kind == 8:  # array frame where none belongs / missing where one does
            if r.random() < 0.5:
                return [protocol.encode("heartbeat", job=self.job), small(r)]
            return [protocol.encode("grads", job=self.job, step=1, task=1, n=1, loss=0.1, correct=1,
                                    weight=1.0, seconds=0.01)]
        if kind == 9:  # too many frames
            head = protocol.encode("grads", job=self.job, step=1, task=1, n=1, loss=0.1, correct=1,
                                   weight=1.0, seconds=0.01)
            return [head] + [r.randbytes(r.randrange(64)) for _ in range(r.randint(3, 40))]
        if kind == 10:  # a header above MAX_HEADER, up to the size of a valid array frame
            size = r.choice([protocol.MAX_HEADER + 1, 20_000, MAXMSG])
            raw = protocol.encode("heartbeat", job=self.job)
            return [raw[:-1] + b" " * (size - len(raw)) + b"}"]
        # kind 11: an empty frame, or a lone array frame
        return [r.choice([b"", b"", b"", garbage(r)])]

    def json_msg(self, type_: str, fields: dict) -> list:
        frames = [json.dumps({"v": 1, "type": type_, **fields}).encode()]
        if type_ in protocol.ARRAY_TYPES:
            frames.append(small(self.rng))
        return frames

    def no_strike(self) -> list:
        """A well-formed message that is still dropped (counted, no strike): another job,
        or a job message from a peer that is not a member."""
        r = self.rng
        other = r.random() < 0.5
        type_, fields = self.valid_header(job=hexid(r, r.choice([8, 16, 64])) if other else None)
        if other and fields["job"] == self.job:
            fields["job"] = OTHER_JOB
        if type_ == "ready" and not other:  # would be an "unexpected" strike: make it another job
            fields["job"] = OTHER_JOB
        frames = [protocol.encode(type_, **fields)]
        if type_ == "grads":
            frames.append(small(r) if r.random() < 0.8 else r.choice(
                [garbage(r), with_nan(r), garbage(r, MAXMSG - 8), garbage(r, MAXMSG // 2)]))
        return frames

    def unexpected_ready(self) -> list:
        """`ready` from a peer that never said hello: one strike ("unexpected")."""
        return [protocol.encode("ready", job=self.job, fingerprint=hexid(self.rng, 32))]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0          # messages sent by the fuzzers
        self.counted = 0       # of them, those the coordinator must count in `dropped`
        self.oversized = 0     # frames above MAXMSGSIZE sent
        self.disconnects = 0   # connections libzmq dropped because of them
        self.notes: list[str] = []

    def add(self, sent: int = 0, counted: int = 0):
        with self.lock:
            self.sent += sent
            self.counted += counted


def raw_fuzzer(sockets: Sockets, job: str, stats: Stats, seed: int, quota: int, errors: list):
    """Sessions of junk, each from a new DEALER with a new routing id; each session stays
    below the ban threshold and ends with a status round trip (so all it sent was handled)."""
    rng = random.Random(seed)
    junk = Junk(rng, job)
    sent = 0
    try:
        while sent < quota:
            rid = None if rng.random() < 0.3 else bytes([rng.randrange(1, 256)]) + rng.randbytes(
                rng.randrange(0, 60))
            s = sockets.dealer(rid)
            strikes = rng.randint(0, 19)
            msgs = [(junk.strike(), True) for _ in range(strikes - 1)]
            if strikes:
                msgs.append((junk.unexpected_ready(), True))
            msgs += [(junk.no_strike(), True) for _ in range(rng.randint(5, 30))]
            msgs += [([protocol.encode("status")], False) for _ in range(rng.randint(0, 2))]
            rng.shuffle(msgs)
            for frames, counted in msgs:
                s.send_multipart(frames)
            stats.add(len(msgs), sum(c for _, c in msgs))
            sent += len(msgs)
            # every status after the junk is still answered: fewer than 20 strikes
            s.send(protocol.encode("status"))
            replies = 0
            deadline = time.monotonic() + 15
            while replies < 1 + sum(1 for _, c in msgs if not c):
                got = recv_msg(s, deadline - time.monotonic())
                assert got is not None, f"no status reply after {strikes} strikes"
                assert got[0]["type"] in ("status_reply", "rejoin"), got[0]
                replies += got[0]["type"] == "status_reply"
            stats.add(1)
            sockets.close(s)
    except BaseException as e:  # reported by the test
        errors.append(e)


def ban_fuzzer(sockets: Sockets, job: str, stats: Stats, seed: int, errors: list, banned: list):
    """A peer is still answered after 19 invalid messages and ignored from the 20th on."""
    rng = random.Random(seed)
    junk = Junk(rng, job)
    try:
        for i in range(3):
            s = sockets.dealer(b"ban-%d-" % i + rng.randbytes(8))
            for _ in range(19):
                s.send_multipart(junk.strike())
            s.send(protocol.encode("status"))
            assert wait_for_type(s, "status_reply", 15) is not None, "banned before 20 strikes"
            s.send_multipart(junk.strike())
            stats.add(21, 20)
            # from now on nothing is answered, not even a valid hello or status
            later = [[protocol.encode("status")], [protocol.encode("hello", **HELLO)],
                     [protocol.encode("heartbeat", job=job)],
                     [protocol.encode("ready", job=job, fingerprint=hexid(rng, 32))]]
            later += [junk.strike() for _ in range(20)] + [junk.no_strike() for _ in range(10)]
            for frames in later:
                s.send_multipart(frames)
            stats.add(len(later), len(later))
            banned.append(s)   # checked for silence at the end, after everything was handled
    except BaseException as e:
        errors.append(e)


def oversize_fuzzer(sockets: Sockets, job: str, stats: Stats, errors: list):
    """Frames above MAXMSGSIZE (10-50 MB, and just above it): libzmq must drop the connection
    at the frame's size prefix; a frame of a valid array's size still gets through."""
    big = bytes(50 << 20)
    head = protocol.encode("grads", job=job, step=0, task=1, n=1, loss=0.1, correct=1, weight=1.0,
                           seconds=0.01)
    try:
        s = sockets.dealer()
        mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            # a frame of exactly a parameter array's size is delivered (as a header: malformed)
            s.send(bytes(MAXMSG))
            s.send(protocol.encode("status"))
            assert wait_for_type(s, "status_reply", 15) is not None
            assert not mon.poll(0), "a frame of a valid array's size cost the connection"
            stats.add(2, 1)
            cases = [[memoryview(big)[:ABOVE_LIMIT]], [head, memoryview(big)[:ABOVE_LIMIT]]]
            for mb in (10, 20, 30, 40, 50):
                view = memoryview(big)[:mb << 20]
                cases += [[view], [head, view], [head, b"x" * 8, view]]
            for frames in cases:
                s.send_multipart(frames, copy=False)
                stats.add(1)
                with stats.lock:
                    stats.oversized += 1
                assert mon.poll(15_000), (f"libzmq did not drop the connection of a frame of "
                                          f"{max(len(f) for f in frames)} bytes")
                event = recv_monitor_message(mon)
                assert event["event"] == zmq.EVENT_DISCONNECTED
                with stats.lock:
                    stats.disconnects += 1
            # still served after all that
            s.send(protocol.encode("status"))
            assert wait_for_type(s, "status_reply", 15) is not None
            stats.add(1)
        finally:
            s.disable_monitor()
            mon.close(linger=0)
    except BaseException as e:
        errors.append(e)


# --- a member that answers with garbage -------------------------------------------------


class Member:
    """Joins like a worker (hello, job, ready with the right fingerprint, welcome), then
    answers every task with something the coordinator must not apply. Knows how many
    strikes it collected, so it knows when the coordinator must have banned it."""

    QUOTA = 150  # tasks
    # how a membership ends, in turn: banned after 20 strikes, bye, hello again (and more
    # garbage), vanishing with a task, a result frame above MAXMSGSIZE
    ENDINGS = ["ban", "bye", "rehello", "vanish", "ban", "oversize"]

    def __init__(self, sockets: Sockets, stats: Stats, seed: int, others_done: threading.Event,
                 stop: threading.Event, release: threading.Event, deadline: float):
        self.sockets, self.stats = sockets, stats
        self.rng = random.Random(seed)
        self.others_done, self.stop, self.release = others_done, stop, release
        self.deadline = deadline
        self.parked = threading.Event()  # holding a task after `stop`, until `release`
        self.fingerprints: dict[str, str] = {}
        self.job = None
        self.strikes = 0
        self.tasks = self.sessions = self.admitted = self.bans = self.refused = 0
        self.endings: list[str] = []
        self.banned_sockets: list = []
        self.stalls = 0
        self.done = threading.Event()   # QUOTA tasks answered

    def send(self, s, frames, counted: bool, strike: int = 0):
        s.send_multipart(frames)
        self.stats.add(1, int(counted))
        self.strikes += strike

    def handshake(self, s, fingerprint: str | None = None) -> bool:
        s.send(protocol.encode("hello", **HELLO))
        self.stats.add(1)
        got = wait_for_type(s, "job", 10)
        assert got is not None, "no job in answer to hello"
        msg = got[0]
        self.job = msg["job"]
        key = json.dumps(msg["config"], sort_keys=True)
        if key not in self.fingerprints:  # load the job's data like a worker does
            from ddp.worker.service import Job
            self.fingerprints[key] = Job(msg["config"]).fingerprint
        s.send(protocol.encode("ready", job=self.job, fingerprint=fingerprint or self.fingerprints[key]))
        self.stats.add(1)
        want = "refuse" if fingerprint else "welcome"
        assert wait_for_type(s, want, 10) is not None, f"no {want} after ready"
        return want == "welcome"

    def sync(self, s):
        """A status round trip: all this peer sent before was handled (it is not banned)."""
        s.send(protocol.encode("status"))
        self.stats.add(1)
        assert wait_for_type(s, "status_reply", 15) is not None, "no status reply"

    def run(self, errors: list):
        try:
            while not (self.parked.is_set() and self.release.is_set()):
                if time.monotonic() > self.deadline:
                    raise AssertionError("the member fuzzer ran out of time")
                self.session()
        except BaseException as e:
            errors.append(e)
        finally:
            self.done.set()
            self.parked.set()  # (after an error: so the test does not wait for it)

    def next_task(self, s):
        got = wait_for_type(s, "task", 5)
        if got is None:
            self.stalls += 1
            self.stats.notes.append(f"member session {self.sessions}: no task for 5 s "
                                    f"({self.strikes} strikes)")
            return None
        msg, frames = got
        assert len(frames[1]) == MAXMSG, "task parameters of the wrong size"
        assert 0 <= msg["lo"] < msg["hi"] <= BATCH, msg
        self.tasks += 1
        if self.tasks >= self.QUOTA:
            self.done.set()
        self.brake(s, msg)
        return msg

    def session(self):
        r = self.rng
        s = self.sockets.dealer(b"member-" + r.randbytes(8))
        self.sessions += 1
        self.strikes = 0
        keep = False
        try:
            if self.sessions % 7 == 3:  # data that differs: refused, never a member
                assert not self.handshake(s, fingerprint=hexid(r, 32))
                self.refused += 1
                return self.sync(s)
            self.handshake(s)
            self.admitted += 1
            ending = self.ENDINGS[(self.admitted - 1) % len(self.ENDINGS)]
            limit = 20 if ending == "ban" else r.randint(3, 12)
            self.endings.append(ending)
            while True:
                msg = self.next_task(s)
                if msg is None:
                    return
                if self.stop.is_set():
                    return self.park(s)
                if ending != "ban" and self.strikes >= limit:
                    return self.end(s, msg, ending)
                self.answer(s, msg, may_ban=ending == "ban")
                if self.strikes >= 20:
                    keep = True
                    return self.banned(s)
        finally:
            if keep:
                self.banned_sockets.append(s)  # checked for silence at the end
            else:
                self.sockets.close(s)

    def banned(self, s):
        """The 20th strike: no task (nor anything else) comes to this peer any more."""
        self.bans += 1
        deadline = time.monotonic() + 0.3
        while (got := recv_msg(s, deadline - time.monotonic())) is not None:
            # only a heartbeat sent just before the ban took effect may still come
            assert got[0]["type"] == "heartbeat", f"a banned member got {got[0]}"
        for frames in ([protocol.encode("heartbeat", job=self.job)], [protocol.encode("hello", **HELLO)],
                       [protocol.encode("status")]):
            self.send(s, frames, counted=True)

    def park(self, s):
        """Hold a task (the coordinator cannot finish its step, so keeps running) until the
        test has checked the coordinator's state; then leave."""
        self.parked.set()
        while not self.release.wait(0.25):
            s.send(protocol.encode("heartbeat", job=self.job))
            self.stats.add(1)
            if time.monotonic() > self.deadline:
                raise AssertionError("never released")
        self.send(s, [protocol.encode("bye", job=self.job)], counted=False)
        self.sync(s)

    def brake(self, s, msg):
        """Near the end of the run, hold the task until the other fuzzers are done, so that
        all the fuzzing happens while the coordinator trains."""
        if msg["step"] < STEPS - BRAKE_STEPS or self.others_done.is_set():
            return
        while not self.others_done.wait(0.25):
            s.send(protocol.encode("heartbeat", job=self.job))
            self.stats.add(1)
            if time.monotonic() > self.deadline:
                raise AssertionError("the fuzzers did not finish in time")

    def end(self, s, msg, ending):
        if ending == "bye":
            self.send(s, [protocol.encode("bye", job=self.job)], counted=False)
            self.sync(s)
        elif ending == "vanish":
            self.sync(s)  # then the socket closes with the task outstanding
        elif ending == "oversize":
            # dropped by libzmq with the connection; the reconnected peer is still answered
            head = protocol.encode("grads", job=self.job, step=msg["step"], task=msg["task"],
                                   n=msg["hi"] - msg["lo"], loss=1.0, correct=0,
                                   weight=1.0, seconds=0.01)
            s.send_multipart([head, garbage(self.rng, ABOVE_LIMIT)])
            self.stats.add(1)
            self.sync(s)
        elif ending == "rehello":
            # hello again while holding the task: dropped and admitted again (same routing id)
            s.send(protocol.encode("hello", **HELLO))
            self.stats.add(1)
            assert wait_for_type(s, "job", 10) is not None
            s.send(protocol.encode("ready", job=self.job,
                                   fingerprint=next(iter(self.fingerprints.values()))))
            self.stats.add(1)
            assert wait_for_type(s, "welcome", 10) is not None
            for _ in range(3):
                msg = self.next_task(s)
                if msg is None:
                    return
                self.answer(s, msg, may_ban=False)
            self.send(s, [protocol.encode("bye", job=self.job)], counted=False)
            self.sync(s)

    def final_strikes(self, s, grads):
        """Strikes up to exactly the 20th, after a status round trip (whatever this peer was
        answered before has arrived). All count at once (not at the sum, as non-finite sums
        do) and none hands the task back but the 20th, an invalid result: the step cannot
        end before the ban, so from then on this peer must hear nothing."""
        r = self.rng
        self.sync(s)
        while self.strikes < 19:
            frames = r.choice([[grads()], [grads(), garbage(r), b""],
                               [protocol.encode("ready", job=self.job, fingerprint=hexid(r, 32))]])
            self.send(s, frames, counted=True, strike=1)
        n = json.loads(grads())["n"]
        last = r.choice([[grads(n=n + 1), garbage(r)], [grads(correct=n + 1), garbage(r)],
                         [grads(), garbage(r, MAXMSG - 8)]])
        self.send(s, last, counted=True, strike=1)

    def answer(self, s, msg, may_ban: bool):
        r = self.rng
        job, step, task, n = self.job, msg["step"], msg["task"], msg["hi"] - msg["lo"]

        def grads(**kw):
            f = dict(job=job, step=step, task=task, n=n, loss=r.random() * 50, correct=r.randint(0, n),
                     weight=float(n), seconds=0.01)
            f.update(kw)
            return protocol.encode("grads", **f)

        if may_ban and self.strikes >= 16:
            return self.final_strikes(s, grads)
        # a member that is not to be banned stays below 17 strikes (at most 3 per answer)
        cap = 16 if may_ban else 14
        # first some that change nothing: stale step, another task, another job, heartbeat
        for _ in range(r.randint(0, 3)):
            what = r.randrange(7)
            if what == 0:
                self.send(s, [grads(step=step + 1), garbage(r)], counted=True)
            elif what == 1 and step > 0:
                self.send(s, [grads(step=step - 1), garbage(r)], counted=True)
            elif what == 2:
                self.send(s, [grads(task=task + r.choice([1000, 10**6])), garbage(r)], counted=True)
            elif what == 3:
                self.send(s, [grads(job=OTHER_JOB), garbage(r)], counted=True)
            elif what == 4:
                self.send(s, [protocol.encode("diverged", job=job, step=step + 1, task=task)],
                          counted=True)
            elif what == 5 and self.strikes < cap:
                self.send(s, [grads()], counted=True, strike=1)   # no array frame: malformed
            else:
                self.send(s, [protocol.encode("heartbeat", job=job)], counted=False)
        # then one that hands the task back to the coordinator
        what = r.randrange(8) if may_ban or self.strikes < cap else 5
        if what == 0:
            self.send(s, [grads(n=n + r.choice([1, -1, 1000])), garbage(r)], counted=True, strike=1)
        elif what == 1:
            self.send(s, [grads(correct=n + 1), garbage(r)], counted=True, strike=1)
        elif what == 2:
            self.send(s, [grads(), garbage(r, r.choice([0, 8, MAXMSG - 8, MAXMSG // 2]))],
                      counted=True, strike=1)
        elif what in (3, 4):
            # the right size and counts but NaN/Inf content: accepted, refused at the sum
            self.send(s, [grads(), with_nan(r, r.choice(["nan", "inf", "-inf"]))], counted=True,
                      strike=1)
            if r.random() < 0.7:  # a finite duplicate must not replace it
                self.send(s, [grads(), garbage(r)], counted=True)
        elif what == 5:
            self.send(s, [protocol.encode("diverged", job=job, step=step, task=task)], counted=False)
            if r.random() < 0.7:  # the task is gone: a late finite answer is stale
                self.send(s, [grads(), garbage(r)], counted=True)
        elif what == 6:
            self.send(s, [grads(loss=float("nan")), garbage(r)], counted=True, strike=1)
            self.send(s, [grads(n=n + 1), garbage(r)], counted=True, strike=1)
        else:
            # `ready` from a member is unexpected (a strike); then a short array
            self.send(s, [protocol.encode("ready", job=job, fingerprint=hexid(r, 32))],
                      counted=True, strike=1)
            self.send(s, [grads(), garbage(r, MAXMSG - 8)], counted=True, strike=1)


# --- the test -----------------------------------------------------------------------------


def _drops(d: dict) -> int:
    return sum(d.values())


def test_fuzzing_a_training_coordinator(procs, tmp_path):
    ref, out, summary = tmp_path / "ref.npz", tmp_path / "out.npz", tmp_path / "summary.json"
    r = train([*ARGS, "--output", str(ref)], timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr

    endpoint = ipc(tmp_path)
    # a generous --worker-timeout: on a loaded machine a starved real worker is not "lost";
    # and --shard-timeout: the member holds tasks on purpose while the state is checked
    coord = procs.coordinator(endpoint, [*ARGS, "--min-workers", "2", "--output", str(out),
                                         "--summary-json", str(summary), "--worker-timeout", "10",
                                         "--shard-timeout", "300"],
                              cwd=str(tmp_path))
    job = coord.wait_for(r"coordinator: job ([0-9a-f]+) on ", timeout=30).group(1)
    workers = [procs.worker(endpoint) for _ in range(2)]
    coord.wait_for(r"joined \(2 workers\)", timeout=30)
    real = set(re.findall(r"^(worker \d+) joined", coord.stderr, re.M))
    assert len(real) == 2, coord.stderr
    coord.wait_for(r"^step 20/", timeout=30)

    ctx = zmq.Context()
    stats, errors, banned = Stats(), [], []
    others_done, stop_member, release = threading.Event(), threading.Event(), threading.Event()
    deadline = time.monotonic() + 45
    pools = [Sockets(ctx, endpoint) for _ in range(6)]
    member = Member(pools[3], stats, 4, others_done, stop_member, release, deadline)
    threads = [
        threading.Thread(target=raw_fuzzer, args=(pools[0], job, stats, 1, 2600, errors)),
        threading.Thread(target=raw_fuzzer, args=(pools[1], job, stats, 2, 2600, errors)),
        threading.Thread(target=oversize_fuzzer, args=(pools[2], job, stats, errors)),
        threading.Thread(target=ban_fuzzer, args=(pools[4], job, stats, 5, errors, banned)),
    ]
    member_thread = threading.Thread(target=member.run, args=(errors,))
    baseline = rss_mb(coord.pid)
    assert baseline is not None
    sampler = RssSampler(coord.pid)
    sampler.start()
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        member_thread.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        others_done.set()
        member.done.wait(max(0.0, deadline - time.monotonic()))
        stop_member.set()
        # the member now holds a task: the coordinator keeps running while it is checked
        member.parked.wait(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a fuzzer hung"
        fuzz_seconds = time.monotonic() - t0
        assert not errors, errors
        assert member.parked.is_set(), "the member fuzzer did not get to hold a task"
        assert coord.p.poll() is None, (
            f"the run ended before the fuzzing did (raise STEPS):\n{coord.stderr[-3000:]}")

        # all that was sent was handled: the counts reach what had to be dropped
        until = time.monotonic() + 20
        while True:
            status = status_of(pools[5])
            if _drops(status["dropped"]) >= stats.counted or time.monotonic() > until:
                break
            time.sleep(0.05)
        assert _drops(status["dropped"]) >= stats.counted, (status["dropped"], stats.counted)
        assert {w["name"] for w in status["workers"]} >= real, status
        step_after_fuzzing = status["step"]
        # banned peers were never answered again
        for s in banned + member.banned_sockets:
            assert not s.poll(0), f"a banned peer was answered: {s.recv_multipart()}"
        assert coord.p.poll() is None
        release.set()
        member_thread.join(max(0.0, deadline - time.monotonic()))
        assert not member_thread.is_alive(), "the member fuzzer hung"
        assert not errors, errors
    finally:
        others_done.set()
        stop_member.set()
        release.set()
        for t in threads + [member_thread]:
            t.join(10)
        peak = sampler.stop()
        for pool in pools:
            pool.close_all()
        ctx.destroy(linger=0)

    assert coord.wait(timeout=60) == 0, coord.stderr[-5000:]
    for w in workers:  # told to stop when the job finished
        assert w.wait(timeout=30) == 0, w.stderr
        assert "invalid message from the coordinator" not in w.stderr, w.stderr
        assert "Traceback" not in w.stderr, w.stderr

    # the result is that of the undisturbed run
    diff = max_param_diff(ref, out)
    assert diff <= 1e-10, diff

    s = read_json(summary)
    dropped = s["dropped_messages"]
    print(f"\nfuzzing {fuzz_seconds:.1f} s: {stats.sent} messages sent, {stats.counted} to be "
          f"dropped; coordinator dropped {_drops(dropped)}: {dropped}; member: {member.tasks} "
          f"tasks, {member.sessions} sessions ({member.admitted} admitted, {member.bans} banned, "
          f"{member.refused} refused, endings {member.endings}); oversized {stats.oversized}, "
          f"disconnects {stats.disconnects}; RSS baseline {baseline:.1f} MB peak {peak:.1f} MB "
          f"({sampler.samples} samples); max param diff {diff:.2e}; fuzzing ended at step "
          f"{step_after_fuzzing}/{STEPS}; notes {stats.notes}")
    assert stats.sent >= 5000
    assert _drops(dropped) >= stats.counted >= 0.8 * stats.sent
    for reason in ("malformed", "ignored peer", "other job", "unknown worker", "unexpected",
                   "stale", "invalid result", "non-finite gradients"):
        assert dropped.get(reason, 0) > 0, (reason, dropped)
    assert stats.oversized == stats.disconnects >= 17
    assert member.tasks >= Member.QUOTA and member.admitted >= 3 and member.bans >= 1
    assert member.stalls == 0, stats.notes
    assert s["steps"] == STEPS and not s["interrupted"]

    # the real workers were never dropped; the misbehaving member was, in every way
    log = coord.stderr
    for name in real:
        assert not re.search(rf"^{name} (left|rejoined|is lost|sent)", log, re.M), name
    assert re.search(r"^worker \d+ sent 20 invalid messages; ignoring it from now on", log, re.M)
    assert "its data differs from the coordinator's" in log
    assert "Traceback" not in log

    # memory: nothing of the oversized frames (nor anything else) piled up
    assert peak - baseline < RSS_BOUND_MB, (baseline, peak)


# --- bugs the fuzzing found, each reproduced on its own ------------------------------------


def test_outstanding_rows_after_a_non_finite_result(served):  # noqa: F811
    """A result with NaN gradients is accepted, then refused at the sum and handed back:
    its rows were once subtracted twice from the member's outstanding rows (negative in
    the status, and the misbehaving member then looked the least busy)."""
    s = served(min_workers=2, shard_timeout=60)
    s.peer()
    member = s.peer(routing_id=b"member-rows")
    member.answering = False
    seen = {}

    def nan_then_hold():
        if len(member.tasks) == 1 and "nan" not in seen:
            nan = np.zeros(s.coord.P)
            nan[7] = np.nan  # one bad element among finite ones
            member.grads(member.tasks[0], array=nan)
            seen["nan"] = True
        elif len(member.tasks) == 2 and "status" not in seen:
            seen["status"] = s.coord.status()
            member.grads(member.tasks[1])

    s.during_poll = nan_then_hold
    s.run_step(0)  # the member's rows are recomputed by the other peer
    s.run_step(1)
    second = member.tasks[1]
    assert second["step"] == member.tasks[0]["step"] + 1
    mine = [w for w in seen["status"]["workers"] if w["name"] == "worker 2"]
    assert mine[0]["outstanding_rows"] == second["hi"] - second["lo"], seen["status"]["workers"]
    assert s.coord.members.dropped["non-finite gradients"] == 1


def test_a_message_of_many_empty_frames_keeps_memory_bounded(procs, tmp_path):
    """MAXMSGSIZE bounds frames, not their number: 400,000 empty frames (0.8 MB on the wire)
    once became 400,000 zmq.Frame objects in recv_multipart (about +100 MB). libzmq itself
    still holds a whole message before handing it over (about 64 bytes per frame)."""
    endpoint = ipc(tmp_path)
    coord = procs.coordinator(endpoint, [*SMALL, "--steps", "10"])
    coord.wait_for("waiting for 1 worker", timeout=30)
    ctx = zmq.Context()
    sockets = Sockets(ctx, endpoint)
    try:
        s = sockets.dealer()
        s.send(protocol.encode("status"))
        assert wait_for_type(s, "status_reply", 15) is not None
        baseline = rss_mb(coord.pid)
        sampler = RssSampler(coord.pid)
        sampler.start()
        try:
            s.send_multipart([b""] * 400_000)
            s.send(protocol.encode("status"))
            got = wait_for_type(s, "status_reply", 30)
            assert got is not None, "the coordinator stopped answering"
            assert got[0]["status"]["dropped"].get("malformed", 0) >= 1
        finally:
            peak = sampler.stop()
        assert peak - baseline < RSS_BOUND_MB, (baseline, peak)
    finally:
        sockets.close_all()
        ctx.destroy(linger=0)


def test_every_worker_hears_stop(procs, tmp_path):
    """When training ends, every worker is told so and exits 0. A small model (the default
    one): the coordinator then exits very soon after sending "stop", which is what loses it."""
    endpoint = ipc(tmp_path)
    missed = []
    for run in range(3):
        coord = procs.coordinator(endpoint, ["--steps", "20", "--min-workers", "4",
                                             "--worker-timeout", "1"])
        workers = [procs.worker(endpoint) for _ in range(4)]
        assert coord.wait(timeout=60) == 0, coord.stderr
        for w in workers:
            line = w.wait_for(r"^stopping: training finished|^coordinator silent for", timeout=20)
            if line.group(0).startswith("stopping"):
                assert w.wait(timeout=10) == 0, w.stderr
            else:
                missed.append(w.stderr)
                w.kill()
        if missed:
            break
    assert not missed, (f"{len(missed)} worker(s) never got 'stop' (run {run + 1}):\n"
                        + "\n---\n".join(missed))
