"""CURVE key files, in the certificate format of ZeroMQ's zmq.auth (readable by its tools).

`NAME.key` holds a public key, `NAME.key_secret` the public and the secret key;
both are Z85 text, 40 characters a key. Secret files are created with mode 0600.
"""
from __future__ import annotations

import os
import re

from .errors import UsageError
from .files import check_input_file

_KEY = re.compile(r'^\s*(public|secret)-key\s*=\s*"([0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40})"\s*$')


def read_keys(path: str, flag: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a key file; UsageError naming the flag otherwise."""
    check_input_file(path, flag, UsageError)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(65536)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})")
    found = {}
    for line in text.splitlines():
        m = _KEY.match(line)
        if m:
            found[m.group(1)] = m.group(2).encode()
    if "public" not in found:
        raise UsageError(f"{flag} {path}: not a key file written by ddp-keygen")
    return found["public"], found.get("secret")


def read_public(path: str, flag: str) -> bytes:
    return read_keys(path, flag)[0]


def read_secret(path: str, flag: str) -> tuple[bytes, bytes]:
    public, secret = read_keys(path, flag)
    if secret is None:
        raise UsageError(f"{flag} {path}: holds no secret key; give the .key_secret file")
    return public, secret


def write_keys(path: str, public: bytes, secret: bytes | None) -> None:
    """Create a key file (never overwrites: O_EXCL); secret files are private (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write("#   ZeroMQ CURVE certificate written by ddp-keygen\n"
                 "#   Keep .key_secret files private; hand out only .key files.\n\n"
                 "metadata\ncurve\n")
        fh.write(f'    public-key = "{public.decode()}"\n')
        if secret is not None:
            fh.write(f'    secret-key = "{secret.decode()}"\n')


def authorized(directory: str, flag: str = "--authorized-keys") -> set[bytes]:
    """The public keys of every *.key file in a directory."""
    if not os.path.isdir(directory):
        raise UsageError(f"{flag} {directory}: no such directory")
    keys = {read_public(os.path.join(directory, name), flag)
            for name in sorted(os.listdir(directory)) if name.endswith(".key")}
    if not keys:
        raise UsageError(f"{flag} {directory}: holds no *.key public keys "
                         f"(ddp-keygen DIR writes them to DIR/"
                         f"{'clients' if flag == '--client-keys' else 'authorized'})")
    return keys
