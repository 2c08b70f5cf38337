"""How gradients meet over ZeroMQ: a coordinator that holds the model and hands out shards.

One step:
  1. wait until --min-workers workers are members;
  2. cut the step's global batch into contiguous shards over the members present
     (by sample index, as MPI cuts it over ranks) and send each its rows [lo, hi)
     with the current parameters;
  3. workers send back Σ per-sample gradients, loss sum and correct count;
     a worker that leaves, dies (silent for --worker-timeout, or its connection
     dropped), sends something invalid or misses its shard's deadline has its
     shard recomputed by another;
  4. add the shards' sums in shard order, so the result does not depend on who
     computed what or in which order results arrived;
  5. the caller divides by the global sample count and steps, exactly as under MPI.

Nothing from the network is trusted: headers are decoded by `ddp.protocol`,
arrays are accepted only with the model's exact size, a gradient sum is applied
only after it is checked to be finite, and libzmq itself drops any frame larger
than the largest valid one. Whatever does not fit is dropped and counted; a peer
that keeps sending it is ignored from then on.

The parts: `transport.Router` (the socket), `membership.Membership` (who is in),
`shards.Shards` (the step's tasks and their sum); `Coordinator` routes each message
to them and runs the step.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from ddp import protocol
from ddp.config import Config, job_config
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.protocol import ProtocolError
from ddp.setup import Setup
from ddp.signals import StopRequest

from .access import CurveKeys
from .membership import Membership
from .shards import Deadline, Shards
from .transport import Router

WAIT_LOG_EVERY = 10.0   # seconds between two "waiting for workers" lines


class Coordinator:
    """The ROUTER side of one job: membership, shard assignment, validation and summation."""

    def __init__(self, setup: Setup, log: Log, stop: StopRequest, endpoint: str,
                 keys: CurveKeys | None = None, monitor: Monitor | None = None):
        cfg = setup.cfg
        self.setup, self.cfg, self.log, self.stop = setup, cfg, log, stop
        self.P = setup.layout.size
        self.dtype = protocol.wire_dtype(cfg.dtype)
        self.job_id = protocol_job_id(cfg)
        self.job = job_config(cfg)
        self.fingerprint = setup.fingerprint()
        self.keys = keys
        self.monitor = monitor
        self.router = Router(endpoint, self.P * self.dtype.itemsize, keys)
        self.endpoint = self.router.endpoint
        self.members = Membership(self.router, log, monitor, cfg.worker_timeout)
        self.shards = Shards(self.members, log, monitor, self.job_id, self.dtype, self.P,
                             Deadline(cfg.shard_timeout or cfg.worker_timeout))
        self.state = "starting"
        self.bytes_received = 0
        self.steps_done = 0
        self.recoveries: list[float] = []
        self._last_wait_log = 0.0
        self.watchdog = None  # called on every poll (the embedded run checks its children)

    # --- what comes in ----------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` s for messages; handle them and any peer that timed out."""
        if self.router.wait(timeout):
            for _ in range(1000):  # then look at the clock again
                message = self.router.receive()
                if message is None:
                    break
                self._handle(*message)
        for member, why in self.members.gone(time.monotonic()):
            self.shards.drop_member(member, why, lost=True)
        self.shards.check_deadlines(time.monotonic())
        if self.watchdog is not None:
            self.watchdog()

    def _handle(self, frames: list, extra: int = 0) -> None:
        peer = frames[0]
        if peer in self.members.banned:
            self.members.drop("ignored peer")
            return
        if extra or len(frames) < 2:
            return self.shards.strike(peer, "malformed")
        try:
            msg = protocol.decode(frames[1].bytes, protocol.FROM_WORKER)
        except ProtocolError:
            return self.shards.strike(peer, "malformed")
        kind = msg["type"]
        if (len(frames) == 3) != (kind in protocol.ARRAY_TYPES):
            return self.shards.strike(peer, "malformed")
        self.bytes_received += sum(len(f) for f in frames[1:])
        if kind == "status":
            return self.members.reply(peer, "status_reply", status=self.status())
        if kind == "hello":
            return self._hello(peer, msg)
        if msg["job"] != self.job_id:
            self.members.drop("other job")
            return self.members.reply(peer, "rejoin")
        if kind == "ready":
            return self._ready(peer, msg)
        if kind == "unable":  # a worker of a service's pool: here it has no other job to do
            self.members.pending.pop(peer, None)
            return self.members.reply(peer, "refuse", reason=msg["reason"])
        member = self.members.heard_from(peer, kind)  # e.g. this coordinator restarted
        if member is None:
            return
        if kind == "bye":
            self.shards.drop_member(member, "left")
        elif kind in ("grads", "diverged"):
            self.shards.result(member, msg, frames)

    def _hello(self, peer: bytes, msg: dict) -> None:
        member = self.members.get(peer)
        if member is not None:  # a worker starting over: its tasks go elsewhere
            self.shards.drop_member(member, "rejoined")
        self.members.hello(peer, msg["host"], msg["cores"])
        self.members.reply(peer, "job", job=self.job_id, config=self.job, fingerprint=self.fingerprint,
                           heartbeat=self.members.heartbeat, timeout=self.members.timeout, pool=False)

    def _ready(self, peer: bytes, msg: dict) -> None:
        entry = self.members.pending.pop(peer, None)
        if entry is None:
            return self.shards.strike(peer, "unexpected")
        if msg["fingerprint"] != self.fingerprint:
            self.log.warn(f"refused {entry[0]}: its data differs from the coordinator's")
            return self.members.reply(peer, "refuse", reason=(
                f"this worker's data differs from the coordinator's (--data "
                f"{self.cfg.data}: fingerprint {msg['fingerprint']} here, {self.fingerprint} there); "
                f"give it the same file"))
        member = self.members.admit(peer, entry[0], self.shards.step, self.job_id, *entry[2:])
        self.shards.assign_unassigned(member)

    # --- steps ----------------------------------------------------------------------

    def _waiting(self, message: str) -> None:
        """State "waiting" (for --status); the message in the log every 10 s at most."""
        self.state = "waiting"
        if self.monitor is not None:
            self.monitor.set_state("waiting-for-workers")
        now = time.monotonic()
        if now - self._last_wait_log > WAIT_LOG_EVERY:
            self._last_wait_log = now
            self.log.info(message)

    def _training(self) -> None:
        if self.state != "training" and self.monitor is not None:
            self.monitor.set_state("training")
        self.state = "training"

    def wait_for_workers(self, need: int | None = None) -> bool:
        """Block until `need` (--min-workers) members are present; False on a stop request."""
        need = need or self.cfg.min_workers
        while len(self.members) < need:
            self._waiting(f"waiting for {need} worker{'s' * (need > 1)} ({len(self.members)} "
                          f"connected) on {self.endpoint}")
            if self.stop.signum:
                return False
            self.poll(self.members.heartbeat)
        self._last_wait_log = 0.0
        self._training()
        return True

    def run_step(self, step: int, params: np.ndarray, grad_sum: np.ndarray):
        """The coordinator's sum: Σ gradients of `step`'s global batch into `grad_sum`, added
        in shard order, and (loss sum, correct, n); None when a stop was requested first
        (the step is abandoned, nothing applied)."""
        shards = self.shards
        shards.step = step
        shards.step_compute = 0.0
        if not self.wait_for_workers():
            return None
        n = self.setup.schedule.batch_len(step)
        shards.start(step, params, n)
        while True:
            if shards.all_back():
                loss, correct = shards.sum_(grad_sum)
                if loss is not None:
                    break
                continue  # some shards went back for recomputation
            if self.stop.signum:
                return None
            if not self.members:
                self._waiting(f"step {step + 1}: no workers left; waiting for one to join "
                              f"on {self.endpoint}")
            self.poll(self.members.heartbeat)
        self._training()
        self.steps_done += 1
        if shards.recovering_since is not None:
            self.recoveries.append(time.monotonic() - shards.recovering_since)
            self.log.info(f"step {step + 1} completed {self.recoveries[-1]:.2f} s after its rows "
                          f"were reassigned")
            shards.recovering_since = None
        return loss, correct, n

    @property
    def step_compute(self) -> float:
        """The slowest shard's compute seconds in the current step (as its worker measured)."""
        return self.shards.step_compute

    # --- status and shutdown --------------------------------------------------------

    def status(self) -> dict:
        m = self.members
        return {
            "state": self.state, "step": self.shards.step, "job": self.job_id, "endpoint": self.endpoint,
            "min_workers": self.cfg.min_workers,
            "workers": [{"name": w.name, "joined_step": w.joined_step, "outstanding_rows": w.rows}
                        for w in m.all()],
            "dropped": dict(m.dropped), "workers_lost": m.lost,
            "shard_timeouts": self.shards.timeouts,
            "shard_deadline": round(self.shards.deadline.seconds(), 3),
            "refused_keys": self.keys.refused if self.keys else 0,
        }

    def stop_workers(self, reason: str) -> None:
        told = self.members.stop_all(reason)
        # A worker drops what it has not read yet when the connection closes (it sets
        # ZMQ_IMMEDIATE), so stay until they hang up, for a second at most.
        self.router.await_hangups(told, 1.0)

    def close(self) -> None:
        self.router.close()


def protocol_job_id(cfg: Config) -> str:
    """The same for every coordinator started with the same data schedule and model, so
    workers survive a coordinator restart."""
    text = json.dumps(job_config(cfg), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
