"""Does a job fit in this host's memory? Asked before anything large is allocated, so a
model or data set that cannot fit is one line and exit 2, not a MemoryError traceback
(or the OOM killer) after the data was loaded."""
from __future__ import annotations

import math
import os

from .errors import UsageError
from .log import human_bytes
from .model import Layout

# buffers of the model's size a run holds at once: parameters, momentum, the summed
# gradients and the exchange's buffer (a rank under MPI, the coordinator under ZeroMQ)
MODEL_COPIES = 4
# per row of a shard and per unit of every layer: pre-activations, activations, deltas
ACTIVATION_COPIES = 3


def available_bytes() -> int | None:
    """Memory this host can give a new allocation: MemAvailable (Linux), else the
    physical memory; None when neither can be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_fits(need: int, what: str, hint: str) -> None:
    """UsageError when `need` bytes exceed what the host has available."""
    have = available_bytes()
    if have is not None and need > have:
        raise UsageError(f"{what} needs at least {human_bytes(need)} of memory, but this host has "
                         f"{human_bytes(have)} available; {hint}")


def model_bytes(layers, bias: bool, itemsize: int, max_rows: int) -> int:
    """A lower bound on what training `layers` takes, before the data."""
    params = Layout(tuple(layers), bias).size
    return itemsize * (MODEL_COPIES * params + ACTIVATION_COPIES * max_rows * sum(layers))


def check_model_fits(layers, bias: bool, itemsize: int, max_rows: int, what: str | None = None) -> None:
    need = model_bytes(layers, bias, itemsize, max_rows)
    shown = ",".join(map(str, layers))
    check_fits(need, what or f"--layers {shown} (shards of up to {max_rows} rows)",
               "use smaller layers (or a smaller --batch-size)" if what is None
               else f"its layers {shown} are too large for this host")


def check_array_fits(shape, itemsize: int, what: str, hint: str) -> None:
    check_fits(math.prod(shape) * itemsize, what, hint)
