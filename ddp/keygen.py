"""ddp-keygen: CURVE key pairs for an authenticated, encrypted ZeroMQ job or service."""
from __future__ import annotations

import os

from . import __version__
from . import keys as keyfiles
from .command import console_script, exit_code
from .config import command_parser
from .errors import EXIT_OK, OutputError, UsageError

PROG = "ddp-keygen"

# where each role's public keys go, below DIR: the coordinator's --authorized-keys lets
# workers in, the service's --client-keys lets clients (ddp-job) in
ROLE_DIRS = {"worker": "authorized", "client": "clients"}
ROLE_FLAGS = {"worker": "--name", "client": "--client"}

KEYGEN_DESCRIPTION = """\
Write CURVE key pairs for an authenticated, encrypted ZeroMQ job or service into DIR:

  DIR/coordinator.key_secret   the coordinator's --curve-secret (created once)
  DIR/coordinator.key          its public key: every worker's and client's --server-key
  DIR/NAME.key_secret          a worker's --curve-secret (NAME: worker, or --name)
  DIR/authorized/NAME.key      the worker's public key: the coordinator's
                               --authorized-keys DIR/authorized lets it in
  DIR/CLIENT.key_secret        a client's --curve-secret, for ddp-job (--client CLIENT)
  DIR/clients/CLIENT.key       the client's public key: the service's
                               --client-keys DIR/clients lets it submit and cancel jobs

Without --name or --client, one worker pair named worker. A name is a worker's
or a client's, never both. Existing files are never overwritten. Copy a
.key_secret only to the host that uses it; remove DIR/authorized/NAME.key or
DIR/clients/CLIENT.key to lock that key out (on the next start)."""


def _parser():
    p = command_parser(PROG, KEYGEN_DESCRIPTION)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("dir", metavar="DIR", help="directory for the keys (created if missing)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="a worker key pair with this name (repeatable; default: worker, "
                        "unless --client is given)")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="a client (ddp-job) key pair with this name (repeatable)")
    return p


def run_keygen(argv: list[str] | None = None) -> int:
    """ddp-keygen with `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        import zmq  # here: a missing pyzmq is said before anything is created

        pairs = _requested(args.name, args.client)
        for name, role in pairs:
            _check_free(args.dir, name, role)
        _make_dirs(args.dir, sorted({ROLE_DIRS[role] for _, role in pairs}))
        for path in _write_keys(args.dir, pairs, zmq.curve_keypair):
            print(f"wrote {path}")
        return EXIT_OK
    except BaseException as e:
        return exit_code(PROG, e)


def _requested(workers: list[str] | None, clients: list[str] | None) -> list[tuple[str, str]]:
    """(name, role) of every pair asked for, names checked and each given once."""
    if not workers and not clients:
        workers = ["worker"]
    pairs = [(n, "worker") for n in workers or []] + [(n, "client") for n in clients or []]
    seen: dict[str, str] = {}
    for name, role in pairs:
        flag = ROLE_FLAGS[role]
        _check_name(name, flag)
        if name in seen:
            raise UsageError(f"{flag} {name}: given twice (also as {ROLE_FLAGS[seen[name]]}); "
                             f"a name is one worker's or one client's")
        seen[name] = role
    return pairs


def _check_name(name: str, flag: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise UsageError(f"{flag} {name!r}: use letters, digits, '-', '_' and '.'")
    if name == "coordinator":
        raise UsageError(f"{flag} coordinator is reserved for the coordinator's own key")


def _check_free(directory: str, name: str, role: str) -> None:
    """Nothing of `name` is there yet: not as the other role's key, not as this role's."""
    flag = ROLE_FLAGS[role]
    for other, subdir in ROLE_DIRS.items():
        taken = os.path.join(directory, subdir, f"{name}.key")
        if other != role and os.path.lexists(taken):
            raise UsageError(f"{flag} {name}: {taken} exists: {name} is a {other}'s key; "
                             f"give the {role} another name")
    for path in _pair_paths(directory, name, role):
        if os.path.lexists(path):
            raise UsageError(f"{path} exists; give another {flag} to add a {role}")


def _pair_paths(directory: str, name: str, role: str) -> list[str]:
    """BASE.key_secret, BASE.key and the public key's copy in the role's directory."""
    base = os.path.join(directory, name)
    return [base + ".key_secret", base + ".key",
            os.path.join(directory, ROLE_DIRS[role], f"{name}.key")]


def _make_dirs(directory: str, subdirs: list[str]) -> None:
    """DIR (private) and the role directories below it."""
    try:
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o700)
        for subdir in subdirs:
            os.makedirs(os.path.join(directory, subdir), exist_ok=True)
    except OSError as e:
        raise UsageError(f"{directory}: cannot create it ({e.strerror or e})")


def _write_keys(directory: str, pairs: list[tuple[str, str]], keypair) -> list[str]:
    """The coordinator's pair (unless it exists) and one pair per (name, role), each from
    `keypair()` -> (public, secret); the paths written."""
    written: list[str] = []
    try:
        coordinator = os.path.join(directory, "coordinator")
        if not os.path.exists(coordinator + ".key_secret"):
            _write_pair(keypair(), [coordinator + ".key_secret", coordinator + ".key"], written)
        for name, role in pairs:
            _write_pair(keypair(), _pair_paths(directory, name, role), written)
    except FileExistsError as e:
        raise UsageError(f"{e.filename} exists; remove it or give another name")
    except OSError as e:
        raise OutputError(f"cannot write {getattr(e, 'filename', directory)}: {e.strerror or e}")
    return written


def _write_pair(pair: tuple[bytes, bytes], paths: list[str], written: list[str]) -> None:
    """The secret file at paths[0], the public key at each of the others."""
    public, secret = pair
    keyfiles.write_keys(paths[0], public, secret)
    written.append(paths[0])
    for path in paths[1:]:
        keyfiles.write_keys(path, public, None)
        written.append(path)


keygen_main = console_script(run_keygen)
