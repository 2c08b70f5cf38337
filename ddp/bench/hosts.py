"""ddp-bench on emulated hosts: the cluster made once for the whole bench, the
command that spreads a program's ranks over it, the bytes its links carried during
a run, and the measurement of the link itself (α and bandwidth)."""
from __future__ import annotations

import os
import shlex
from contextlib import contextmanager

from ..benchloops import n_parameters
from ..cluster import Cluster, parse_link
from ..threads import thread_env
from .options import PY, Options, layers_text
from .run import RunFailed, failure, loop_result, run_process

ALPHA_BYTES = 8
BANDWIDTH_BYTES = 8 * 2**20
LINK_ROUNDS = 15
BANDWIDTH_FORMULA = ("bandwidth = bytes / time of one Allreduce of 2 ranks on 2 hosts: a ring "
                     "Allreduce of N ranks sends 2·(N−1)/N·bytes per rank each way, at N = 2 "
                     "the bytes themselves")


class EmulatedHosts:
    """The emulated cluster as ddp-bench uses it: K hosts, the same number of ranks on
    each, and the byte counters of their links.

    Parameters
    ----------
    net : Cluster
        A started cluster (its owner removes it).
    mpiexec : str
        MPICH's hydra mpiexec, which the cluster drives.
    """

    def __init__(self, net: Cluster, mpiexec: str):
        self.net, self.mpiexec = net, mpiexec

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        """argv under mpiexec with ranks ÷ K ranks on each host, from the head node."""
        return self.net.mpiexec(self.mpiexec, ranks // self.net.hosts, argv)

    def counters(self) -> list[dict[str, int]]:
        """Bytes every host has sent and received over its link so far."""
        return [self.net.counters(i) for i in range(self.net.hosts)]

    def bytes_since(self, before: list[dict[str, int]]) -> dict[str, list[int]]:
        """{"sent": [per host], "received": [per host]}: the bytes since `before`."""
        now = self.counters()
        return {"sent": [n["tx"] - b["tx"] for n, b in zip(now, before)],
                "received": [n["rx"] - b["rx"] for n, b in zip(now, before)]}

    def describe(self) -> dict:
        """What the document says of the hosts: how many, the link, the namespaces."""
        return {"hosts": self.net.hosts, "link": str(self.net.link),
                "rate_bits_per_second": self.net.link.rate, "loss_percent": self.net.link.loss,
                "namespaces": [self.net.switch, *self.net.names]}

    def measure_link(self, opts: Options) -> dict:
        """α and bandwidth between hosts 0 and 1, a rank on each (python -m ddp.benchloops
        link): the record, `ok` False with the `error` if the run failed."""
        sizes = link_sizes(opts.layers)
        argv = [PY, "-m", "ddp.benchloops", "link", "--sizes", ",".join(map(str, sizes)),
                "--rounds", str(LINK_ROUNDS)]
        cmd = self.net.mpiexec(self.mpiexec, [1, 1], argv, hosts=[0, 1])
        env = dict(os.environ, PYTHONUNBUFFERED="1", **thread_env(1))
        before = self.counters()
        proc = run_process(cmd, env, opts.timeout)
        record = {"command": shlex.join(cmd), "returncode": proc.returncode,
                  "wall_seconds": proc.seconds, "host_bytes": self.bytes_since(before),
                  "bandwidth_formula": BANDWIDTH_FORMULA}
        error = failure(proc, opts.timeout)
        if error is None:
            try:
                record.update(link_figures(loop_result(proc.stdout, "sizes"), opts.layers))
            except RunFailed as e:
                error = str(e)
        record["ok"] = error is None
        if error is not None:
            record["error"] = error
        return record


def link_sizes(layers) -> list[int]:
    """The bytes of each Allreduce the link is timed at: α's 8, 8 MB, and every
    model's float32 gradient."""
    grads = [4 * n_parameters(list(l)) for l in layers]
    return list(dict.fromkeys([ALPHA_BYTES, BANDWIDTH_BYTES, *grads]))


def link_figures(result: dict, layers) -> dict:
    """α, and bandwidth (bytes ÷ seconds) at every size, from the link loop's line."""
    if result.get("hosts") != 2:
        raise RunFailed(f"the link's ranks ran on {result.get('hosts')} hosts, not 2")
    grads = {4 * n_parameters(list(l)): layers_text(l) for l in layers}
    sizes = []
    for s in result["sizes"]:
        if not (isinstance(s.get("seconds"), float) and s["seconds"] > 0):
            raise RunFailed(f"bad Allreduce time {s.get('seconds')!r} at {s.get('bytes')} bytes")
        what = (["alpha"] if s["bytes"] == ALPHA_BYTES else []) + \
            (["8 MiB"] if s["bytes"] == BANDWIDTH_BYTES else []) + \
            ([f"gradient {grads[s['bytes']]}"] if s["bytes"] in grads else [])
        sizes.append({**s, "what": ", ".join(what),
                      "bandwidth_bytes_per_second": s["bytes"] / s["seconds"]})
    alpha = next(s["seconds"] for s in sizes if s["bytes"] == ALPHA_BYTES)
    big = next(s for s in sizes if s["bytes"] == BANDWIDTH_BYTES)
    return {"alpha_seconds": alpha, "bandwidth_bytes_per_second": big["bandwidth_bytes_per_second"],
            "sizes": sizes}


@contextmanager
def emulated_hosts(opts: Options):
    """The EmulatedHosts of --hosts for the block (None without it), removed when the
    block ends however it ends: a run's failure, Ctrl-C, SIGTERM raised as an exception."""
    if not opts.hosts:
        yield None
        return
    with Cluster(opts.hosts, parse_link(opts.link)) as net:
        yield EmulatedHosts(net, opts.mpirun[0])
