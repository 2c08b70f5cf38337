"""Who may reach the ZeroMQ coordinator: the bind policy and the CURVE keys it lets in.

A --bind that other hosts may reach needs CURVE (--curve-secret and --authorized-keys)
or an explicit --insecure; both are checked before any data is loaded.
"""
from __future__ import annotations

import zmq  # noqa: F401  (preflight runs before any data is loaded: without pyzmq a job stops here)

from ddp import keys as keyfiles
from ddp import protocol
from ddp.config import Config
from ddp.errors import UsageError
from ddp.log import Log


class CurveKeys:
    """The coordinator's key pair and the public keys it lets in (a ZAP callback)."""

    def __init__(self, secret_file: str, authorized_dir: str, client_dir: str | None = None):
        self.public, self.secret = keyfiles.read_secret(secret_file, "--curve-secret")
        workers = keyfiles.authorized(authorized_dir)
        self.clients = keyfiles.authorized(client_dir, "--client-keys") if client_dir else set()
        if workers & self.clients:
            raise UsageError(f"a key is in both --authorized-keys {authorized_dir} and --client-keys "
                             f"{client_dir}: a key is a worker's or a client's, not both")
        self.allowed = workers | self.clients
        self.refused = 0

    def callback(self, domain, key: bytes) -> bool:  # runs in the authenticator's thread
        ok = key in self.allowed
        if not ok:
            self.refused += 1
        return ok


def check_bind(cfg: Config, log: Log) -> None:
    """Refuse (UsageError) a --bind that is not literally loopback unless CURVE or
    --insecure is given; warn when it is --insecure."""
    try:
        loopback = protocol.is_loopback(cfg.bind)
    except ValueError as e:
        raise UsageError(f"--bind {cfg.bind}: {e}")
    if loopback or cfg.curve_secret:
        return
    if not cfg.insecure:
        raise UsageError(f"--bind {cfg.bind} may be reachable from other hosts (only ipc://, "
                         f"127.x.x.x, [::1] and localhost count as loopback; names are not "
                         f"resolved for this check): give --curve-secret and --authorized-keys "
                         f"(see ddp-keygen), bind to 127.0.0.1, or accept the risk with --insecure")
    log.warn(f"--bind {cfg.bind} without CURVE (--insecure): anyone who can reach it can join "
             f"the job and read the model; traffic is not encrypted")


def preflight(cfg: Config, log: Log) -> CurveKeys | None:
    """Check --bind and the key files before any data is loaded; the keys, if any."""
    if cfg.bind:
        check_bind(cfg, log)
    return CurveKeys(cfg.curve_secret, cfg.authorized_keys, cfg.client_keys) if cfg.curve_secret else None
