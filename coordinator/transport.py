"""The coordinator's ROUTER socket: binding (CURVE if asked), bounded framing, sends that
never block, and the monitor that says a connection closed.

What arrives is not decoded here: a message is handed on as frames, its header and array
still raw, for the coordinator to validate (see `ddp.protocol`).
"""
from __future__ import annotations

import errno
import time

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from ddp import protocol
from ddp.errors import UsageError

from .access import CurveKeys

PROBE_SECONDS = 1.0     # after a connection closed, probe the peers this long ...
PROBE_EVERY = 0.05      # ... this often, to find out whose it was


class Router:
    """One bound ROUTER socket and its disconnect monitor; counts the bytes it sends."""

    def __init__(self, endpoint: str, max_frame: int, keys: CurveKeys | None = None):
        # two I/O threads: parameters go out to (and sums come in from) two workers at once
        self.ctx = zmq.Context(io_threads=2)
        self.auth = None
        self.sock = self.disconnects = None
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # sending to a gone peer raises at once
        # libzmq applies the limit to the frame as it arrives, i.e. encrypted under CURVE
        # (a few dozen bytes longer): leave room for that
        sock.setsockopt(zmq.MAXMSGSIZE, max(max_frame, protocol.MAX_HEADER) + 256)
        sock.setsockopt(zmq.RCVHWM, 100)             # a flooding peer is throttled by TCP
        if keys is not None:
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", keys)
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self.close()
            hint = " (is another coordinator running?)" if e.errno == errno.EADDRINUSE else ""
            raise UsageError(f"--bind {endpoint}: cannot bind ({e.strerror}){hint}")
        self.sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.disconnects = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.disconnects, zmq.POLLIN)
        self.probe_until = 0.0
        self.last_probe = 0.0
        self.bytes_sent = 0

    def send(self, peer: bytes, header: bytes, array: np.ndarray | None = None) -> bool:
        """Send without blocking; False when the peer is gone or not reading."""
        try:
            if array is None:
                self.sock.send_multipart([peer, header], flags=zmq.NOBLOCK)
            else:
                self.sock.send_multipart([peer, header], flags=zmq.NOBLOCK | zmq.SNDMORE)
                self.sock.send(array, flags=zmq.NOBLOCK, copy=False)
                self.bytes_sent += array.nbytes
            self.bytes_sent += len(header)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        return True

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s; True when messages wait. A closed connection starts a
        second of probing (see `probe_due`), and polls are short meanwhile."""
        if time.monotonic() < self.probe_until:  # a connection closed: look again soon
            timeout = min(timeout, PROBE_EVERY)
        events = dict(self.poller.poll(max(0, int(timeout * 1000))))
        if self.disconnects in events:
            while self.disconnects.poll(0):
                self.disconnects.recv_multipart()
            self.probe_until = time.monotonic() + PROBE_SECONDS
        return self.sock in events

    def probe_due(self, now: float) -> bool:
        """Whether to send to every peer now, to find out whose connection closed (a send
        to a gone peer fails at once: ROUTER_MANDATORY)."""
        due = now < self.probe_until and now - self.last_probe > PROBE_EVERY
        if due:
            self.last_probe = now
        return due

    def receive(self) -> tuple[list, int] | None:
        """One message as [routing id, header, array frame?] and the number of frames
        beyond those (read and thrown away one by one, never held); None if none waits."""
        try:
            frames = [self.sock.recv(flags=zmq.NOBLOCK)]
        except zmq.Again:
            return None
        extra = 0
        while self.sock.rcvmore:
            if len(frames) < 3:
                frames.append(self.sock.recv(copy=False))
            else:
                self.sock.recv()
                extra += 1
        return frames, extra

    def await_hangups(self, count: int, seconds: float) -> None:
        """Stay until `count` connections closed, for `seconds` at most: a worker drops what
        it has not read yet when its connection closes (it sets ZMQ_IMMEDIATE)."""
        deadline = time.monotonic() + seconds
        while count and self.disconnects is not None and time.monotonic() < deadline:
            if self.disconnects.poll(50):
                self.disconnects.recv_multipart()
                count -= 1
        self.sock.setsockopt(zmq.LINGER, 1000)

    def close(self) -> None:
        if self.disconnects is not None:
            self.sock.disable_monitor()
            self.disconnects.close(linger=0)
            self.disconnects = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()
