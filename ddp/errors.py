"""Errors that reach the user as one line and an exit code.

Every error the user can cause (a flag, a file, the data) is a `DDPError`
subclass carrying its exit code; anything else is a bug and shows a traceback.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1   # a bug: unexpected exception (traceback shown)
EXIT_USAGE = 2      # bad input: flags, config, data, init or model file
EXIT_DIVERGED = 3   # loss became NaN/Inf; the last good checkpoint is kept
EXIT_IO = 4         # could not write a checkpoint, model or summary
EXIT_UNREACHABLE = 5  # ddp-worker: no coordinator answered within --retry-for
EXIT_SIGNAL_BASE = 128  # interrupted by signal N: exit 128+N after checkpointing


class DDPError(Exception):
    """An error the user can act on; `str(err)` is the whole message."""

    exit_code = EXIT_USAGE
    # True when every rank raises the same error at the same point (so no abort is needed)
    collective = False
    # set by Comm.agree() on the rank that reports an error every rank has learnt of
    agreed = False


class UsageError(DDPError):
    """A flag, config key or value is wrong."""


class DataError(DDPError):
    """A data, init or model file is missing, unreadable or inconsistent."""


class DivergedError(DDPError):
    """The summed loss is the same on every rank, so every rank raises this together."""

    exit_code = EXIT_DIVERGED
    collective = True


class OutputError(DDPError):
    exit_code = EXIT_IO


class PeerError(DDPError):
    """Raised on ranks whose peer failed; the failing rank printed the reason."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


# the third-party modules ddp-train imports, and the pip package that brings each
PACKAGES = {"numpy": "numpy", "mpi4py": "mpi4py", "zmq": "pyzmq", "threadpoolctl": "threadpoolctl",
            "tqdm": "tqdm", "prometheus_client": "prometheus-client", "torch": "torch"}


class MissingPackageError(DDPError):
    """A module that a feature needs is not installed."""

    def __init__(self, module: str, needed_for: str | None = None):
        package = PACKAGES.get(module, module)
        what = f"{needed_for} needs the Python package {package}, which" if needed_for \
            else f"the Python package {package}"
        super().__init__(f"{what} is not installed: pip install {package}")


def missing_package(e: BaseException, needed_for: str | None = None) -> MissingPackageError | None:
    """The one-line error for an ImportError of one of our dependencies (None for others,
    which are bugs)."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        if top in PACKAGES:
            return MissingPackageError(top, needed_for)
    return None


def require(module: str, needed_for: str):
    """Import `module` now, at start-up, rather than fail after training."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_package(e, needed_for) or MissingPackageError(module, needed_for) from None
