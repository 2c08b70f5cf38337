"""A ZeroMQ worker's connection to its coordinator: keys, the DEALER socket, handshakes.

`Connection` owns the socket and the monitor that reports its CURVE handshakes;
a failed handshake that retrying cannot fix (a key refused, CURVE on one side
only, a wrong server key) is a UsageError saying which. `query_status` asks a
coordinator what it is doing, for `ddp-worker --status`.
"""
from __future__ import annotations

import os
import time

import numpy as np
import zmq

from ddp import keys as keyfiles
from ddp import protocol
from ddp.errors import DDPError, EXIT_UNREACHABLE, UsageError
from ddp.protocol import ProtocolError

# A connection attempt is given up (and started afresh 0.1 s later, libzmq's reconnect
# interval) after this long. While a link is down the kernel retransmits a SYN after 1, 3,
# 7, 15, 31 ... s, so one attempt left to the kernel is answered that long after the link
# returns: after a 30 s cut, up to 30 s late. Two seconds allow one SYN to be lost.
CONNECT_TIMEOUT_MS = 2000

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class Unreachable(DDPError):
    exit_code = EXIT_UNREACHABLE


def handshake_error(event: int, endpoint: str, curve: bool, failures: int,
                    who: str = "worker") -> str | None:
    """The error to stop with after a failed security handshake (None: retry). `who`:
    "worker", or "client" (ddp-job), whose keys a service lists in --client-keys."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        where = "--client-keys" if who == "client" else "--authorized-keys"
        return (f"the coordinator at {endpoint} refused this {who}'s key: add its public key "
                f"to the coordinator's {where} directory")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"security handshake with the coordinator at {endpoint} failed: both sides "
                f"need CURVE keys (--curve-secret, --server-key) or neither")
    if failures < 3:  # a coordinator restarting mid-handshake: try again
        return None
    if curve:  # the server could not decrypt us: a wrong server key
        return (f"the coordinator at {endpoint} drops the connection during the CURVE "
                f"handshake: is --server-key the coordinator's public key (coordinator.key)?")
    # a CURVE server resets a plain client's connection on reading its greeting, and
    # the reset can come before the client has read the server's (the mismatch unseen)
    return (f"the coordinator at {endpoint} drops the connection during the handshake: "
            f"it may need CURVE keys (--curve-secret, --server-key)")


def load_keys(secret_file: str | None, server_key_file: str | None):
    """(public, secret, server public) for CURVE, or None without keys."""
    if (secret_file is None) != (server_key_file is None):
        raise UsageError("--curve-secret and --server-key go together (keys from ddp-keygen)")
    if secret_file is None:
        return None
    public, secret = keyfiles.read_secret(secret_file, "--curve-secret")
    return public, secret, keyfiles.read_public(server_key_file, "--server-key")


def check_endpoint(endpoint: str) -> None:
    try:
        protocol.parse_endpoint(endpoint)
    except ValueError as e:
        raise UsageError(f"--connect {endpoint}: {e}")


def dealer(ctx: zmq.Context, keys=None) -> zmq.Socket:
    """A DEALER to a coordinator: no lingering, connection attempts bounded, CURVE if keys."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    _secure(sock, keys)
    return sock


def _secure(sock: zmq.Socket, keys) -> None:
    """CURVE on `sock` with keys (public, secret, server public); nothing for None."""
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys


class Connection:
    """The DEALER socket to the coordinator and the monitor of its handshakes.

    `open()` replaces both: a new socket has a new routing id, so the coordinator
    sees a worker that says hello anew.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, keys=None):
        self.ctx, self.endpoint, self.keys = ctx, endpoint, keys
        self.sock = self.monitor = None
        self.failed_handshakes = 0
        self.last_sent = 0.0

    def open(self) -> None:
        self.close(linger=0)
        sock = dealer(self.ctx, self.keys)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no hellos queued while there is no connection
        sock.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.failed_handshakes = 0
        sock.connect(self.endpoint)
        self.sock = sock

    def close(self, linger: int | None = None) -> None:
        """Close the socket, after sending for up to `linger` ms (None: its LINGER option)."""
        if self.sock is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.sock.close(linger=linger)
            self.sock = self.monitor = None

    def send(self, header: bytes, array: np.ndarray | None = None):
        """Send without blocking; a zero-copy array's tracker, or None (nothing to track,
        or not sent: not connected right now, and the coordinator will ask again)."""
        try:
            if array is None:
                self.sock.send(header, flags=zmq.NOBLOCK)
                return None
            self.sock.send(header, flags=zmq.NOBLOCK | zmq.SNDMORE)
            return self.sock.send(array, flags=zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:
            return None
        finally:
            self.last_sent = time.monotonic()

    def recv(self):
        """The frames of the next message waiting, or None."""
        try:
            return self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def check_handshakes(self) -> bool:
        """Read the monitor's events: True when a connection was made (its handshake
        succeeded); UsageError for a failure retrying cannot fix."""
        from zmq.utils.monitor import recv_monitor_message

        connected = False
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed_handshakes = 0
                connected = True
                continue
            self.failed_handshakes += 1
            message = handshake_error(event, self.endpoint, self.keys is not None,
                                      self.failed_handshakes)
            if message:
                raise UsageError(message)
        return connected


def ask(endpoint: str, header: bytes, keys=None, timeout: float = 5.0,
        who: str = "worker") -> list[bytes]:
    """Send one message to a coordinator and return the frames of its answer (a client's
    round trip: `ddp-worker --status`, `ddp-job`). Unreachable when nothing answers within
    `timeout` seconds; UsageError when the CURVE handshake says why it never will."""
    check_endpoint(endpoint)
    ctx = zmq.Context()
    sock = dealer(ctx, keys)
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    try:
        from zmq.utils.monitor import recv_monitor_message

        sock.connect(endpoint)
        sock.send(header)
        deadline, failures = time.monotonic() + timeout, 0
        while not sock.poll(50):
            while monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                failures += event != zmq.EVENT_HANDSHAKE_SUCCEEDED
                message = handshake_error(event, endpoint, keys is not None, failures, who)
                if message:
                    raise UsageError(message)
            if time.monotonic() > deadline:
                raise Unreachable(f"no answer from a coordinator at {endpoint} within {timeout:g} s")
        return sock.recv_multipart()
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()
        ctx.term()


def query_status(endpoint: str, keys=None, timeout: float = 5.0) -> dict:
    """Ask a coordinator what it is doing (`ddp-worker --status`)."""
    frames = ask(endpoint, protocol.encode("status"), keys, timeout)
    try:
        msg = protocol.decode(frames[0], {"status_reply"}, protocol.MAX_REPLY_HEADER)
    except ProtocolError as e:
        raise Unreachable(f"{endpoint} did not answer like a ddp-train coordinator ({e})")
    return msg["status"]
