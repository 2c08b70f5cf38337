"""ddp-keygen: CURVE key pairs for an authenticated, encrypted ZeroMQ job."""
from __future__ import annotations

import os

from . import __version__
from . import keys as keyfiles
from .command import console_script, exit_code
from .config import command_parser
from .errors import EXIT_OK, OutputError, UsageError

PROG = "ddp-keygen"

KEYGEN_DESCRIPTION = """\
Write CURVE key pairs for an authenticated, encrypted ZeroMQ job into DIR:

  DIR/coordinator.key_secret   the coordinator's --curve-secret (created once)
  DIR/coordinator.key          its public key: every worker's --server-key
  DIR/NAME.key_secret          a worker's --curve-secret (NAME: worker, or --name)
  DIR/authorized/NAME.key      the worker's public key: the coordinator's
                               --authorized-keys DIR/authorized lets it in

Existing files are never overwritten. Copy a worker's .key_secret only to that
worker; remove DIR/authorized/NAME.key to lock a worker out (on the next start)."""


def _parser():
    p = command_parser(PROG, KEYGEN_DESCRIPTION)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("dir", metavar="DIR", help="directory for the keys (created if missing)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="a worker key pair with this name (repeatable; default: worker)")
    return p


def run_keygen(argv: list[str] | None = None) -> int:
    """ddp-keygen with `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        import zmq  # here: a missing pyzmq is said before anything is created

        names = args.name or ["worker"]
        _check_names(names)
        authorized = _make_dirs(args.dir)
        for name in names:
            if os.path.exists(os.path.join(args.dir, f"{name}.key_secret")):
                raise UsageError(f"{os.path.join(args.dir, name)}.key_secret exists; give another "
                                 f"--name to add a worker")
        for path in _write_keys(args.dir, authorized, names, zmq.curve_keypair):
            print(f"wrote {path}")
        return EXIT_OK
    except BaseException as e:
        return exit_code(PROG, e)


def _check_names(names: list[str]) -> None:
    for name in names:
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise UsageError(f"--name {name!r}: use letters, digits, '-', '_' and '.'")
        if name == "coordinator":
            raise UsageError("--name coordinator is reserved for the coordinator's own key")


def _make_dirs(directory: str) -> str:
    """DIR (private) and DIR/authorized; returns the latter."""
    authorized = os.path.join(directory, "authorized")
    try:
        os.makedirs(authorized, exist_ok=True)
        os.chmod(directory, 0o700)
    except OSError as e:
        raise UsageError(f"{directory}: cannot create it ({e.strerror or e})")
    return authorized


def _write_keys(directory: str, authorized: str, names: list[str], keypair) -> list[str]:
    """The coordinator's pair (unless it exists) and one pair per worker, each from
    `keypair()` -> (public, secret); the paths written."""
    written: list[str] = []
    try:
        coordinator = os.path.join(directory, "coordinator")
        if not os.path.exists(coordinator + ".key_secret"):
            _write_pair(keypair(), coordinator, None, written)
        for name in names:
            _write_pair(keypair(), os.path.join(directory, name),
                        os.path.join(authorized, f"{name}.key"), written)
    except FileExistsError as e:
        raise UsageError(f"{e.filename} exists; remove it or give another --name")
    except OSError as e:
        raise OutputError(f"cannot write {getattr(e, 'filename', directory)}: {e.strerror or e}")
    return written


def _write_pair(pair: tuple[bytes, bytes], base: str, public_copy: str | None,
                written: list[str]) -> None:
    """BASE.key_secret and BASE.key, and the public key again at `public_copy`."""
    public, secret = pair
    keyfiles.write_keys(base + ".key_secret", public, secret)
    keyfiles.write_keys(base + ".key", public, None)
    written.extend([base + ".key_secret", base + ".key"])
    if public_copy:
        keyfiles.write_keys(public_copy, public, None)
        written.append(public_copy)


keygen_main = console_script(run_keygen)
