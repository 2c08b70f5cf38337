"""What machine ddp-bench measured on: CPU, cores, memory, numpy's BLAS, MPI, torch."""
from __future__ import annotations

import json
import os
import platform

from .. import __version__
from ..threads import host_cores
from .options import PY
from .run import last_line, run_process


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _first_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


# Run in a subprocess: importing mpi4py or torch here would tie this process to them.
_PROBE = r"""
import json, sys
info = {}
import numpy, threadpoolctl
info["numpy"] = numpy.__version__
info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "threading_layer",
                                        "num_threads", "filepath")}
                for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
try:
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    info["mpi4py"] = mpi4py.__version__
    info["mpi"] = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
except Exception as e:
    info["mpi"] = None
    info["mpi_error"] = f"{type(e).__name__}: {e}"
try:
    import torch
    info["torch"] = torch.__version__
except Exception as e:
    info["torch"] = None
    info["torch_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(info))
"""


def machine_info(timeout: float) -> dict:
    """This host and the libraries the programs will load (probed in a subprocess)."""
    cpuinfo, meminfo = _read("/proc/cpuinfo"), _read("/proc/meminfo")
    mem_kib = _first_field(meminfo, "MemTotal")
    info = {
        "cpu": _first_field(cpuinfo, "model name") or platform.processor() or platform.machine(),
        "cores": host_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ddp_train": __version__,
    }
    result = run_process([PY, "-c", _PROBE], env=dict(os.environ), timeout=min(timeout, 120))
    try:
        info.update(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        info.update({"numpy": None, "blas": [], "mpi": None, "torch": None,
                     "probe_error": last_line(result.stderr) or f"exit {result.returncode}"})
    return info


def machine_line(m: dict) -> str:
    """The table's last line: the machine in one sentence."""
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, "
                     f"{b.get('threading_layer')})" for b in m.get("blas") or []) or "BLAS unknown"
    torch = f"torch {m['torch']}" if m.get("torch") else "torch not installed"
    mem = f"{m['memory_gib']} GiB" if m.get("memory_gib") else "memory unknown"
    return (f"machine: {m['cpu']}, {m['cores']} cores, {mem}; numpy {m.get('numpy')}, {blas}; "
            f"{m.get('mpi') or 'MPI unavailable'}; Python {m['python']}; {torch}")
