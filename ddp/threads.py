"""How many BLAS threads a process uses.

The rule of torchrun and scikit-learn: `--threads` first, then the user's
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS, then this process's
share of the host's cores (cores ÷ processes on the host, at least 1).
ddp-bench applies the same rule to the programs it starts, without the
environment step, and hands each its count through `thread_env`.
"""
from __future__ import annotations

import os
from typing import Mapping

ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_id() -> str:
    """An opaque hex id shared by the processes of one machine (one kernel): its boot id,
    else its host name, hashed. ZeroMQ workers send it, so the coordinator knows which of
    them share a host's cores."""
    import hashlib
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
            ident = fh.read().strip()
    except OSError:
        ident = socket.gethostname().encode()
    return hashlib.blake2b(ident, digest_size=8).hexdigest()


def share_of_host(cores: int, processes: int) -> int:
    """One process's BLAS threads when `processes` share `cores`: cores ÷ processes, at least 1."""
    return max(1, cores // max(processes, 1))


def _positive(text: str) -> int | None:
    """OMP_NUM_THREADS may be a list for nested levels ("4,2"): the first one counts."""
    try:
        n = int(text.split(",")[0].strip())
    except ValueError:
        return None
    return n if n > 0 else None


def choose_threads(threads: int | None, local_ranks: int, env: Mapping[str, str] | None = None,
                   noun: str = "rank") -> tuple[int, str, list[str]]:
    """(threads, what decided it, warnings about ignored environment values).

    `local_ranks` processes (`noun`s) share this host's cores."""
    env = os.environ if env is None else env
    if threads:
        return threads, "--threads", []
    ignored = []
    for var in ENV_VARS:
        value = env.get(var)
        if value is None or not value.strip():
            continue
        n = _positive(value)
        if n is not None:
            return n, f"{var}={value}", ignored
        ignored.append(f"{var}={value!r} is not a positive number of threads; ignored")
    cores, ranks = host_cores(), max(local_ranks, 1)
    return share_of_host(cores, ranks), f"{cores} cores ÷ {ranks} {noun}{'s' * (ranks != 1)} on this host", \
        ignored


def thread_env(threads: int) -> dict[str, str]:
    """Every variable choose_threads reads, set to `threads`: the environment that
    gives a child process (and each rank it starts) that many BLAS threads."""
    return {var: str(threads) for var in ENV_VARS}


def limit_threads(threads: int | None, local_ranks: int, warn=None,
                  noun: str = "rank") -> tuple[int, str]:
    """Apply choose_threads() to the BLAS library; (threads it now uses, what decided)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    n, source, ignored = choose_threads(threads, local_ranks, noun=noun)
    for message in ignored:
        if warn is not None:
            warn(message)
    threadpool_limits(limits=n)
    # report what the BLAS library now says it uses, not what was asked for
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return (max(blas) if blas else n), source
