"""What the tests on emulated hosts share: a cluster made once per module (skipped
with the reason where network namespaces cannot be made), ddp-train under
mpiexec across its hosts, and what a host's kernel says of its TCP connections."""
from __future__ import annotations

import re

import pytest

from ddp import cluster
from helpers import MPIRUN, PY, run


def make_cluster(hosts: int, link: cluster.Link = cluster.Link(), mpi: bool = True):
    """A started Cluster of `hosts` hosts, or a skip saying why there can be none
    (`mpi`: the tests run mpiexec across it, so it is needed too)."""
    reason = cluster.unavailable(loss=bool(link.loss))
    if reason:
        pytest.skip(f"no emulated cluster here: {reason}")
    if mpi and MPIRUN is None:
        pytest.skip("no mpiexec found (pip install mpich)")
    net = cluster.Cluster(hosts, link)
    try:
        net.start()
    except cluster.ClusterError as e:
        net.close()
        pytest.skip(f"no emulated cluster here: {e}")
    return net


def link_bytes(net: cluster.Cluster, hosts) -> dict[int, int]:
    """{host: bytes it has sent over its link so far}."""
    return {h: net.counters(h)["tx"] for h in hosts}


def train_across(net: cluster.Cluster, ranks_per_host, args: list[str], hosts=None, timeout=180):
    """`ddp-train ARGS` under mpiexec with ranks_per_host ranks on each of `hosts`
    (default: all); (result, bytes each host sent over its link during the run)."""
    hosts = list(range(net.hosts)) if hosts is None else hosts
    before = link_bytes(net, hosts)
    res = run(net.mpiexec(MPIRUN, ranks_per_host, [PY, "-m", "ddp", "train", *args], hosts),
              timeout=timeout)
    after = link_bytes(net, hosts)
    return res, {h: after[h] - before[h] for h in hosts}


def tcp_counter(net: cluster.Cluster, host: int, name: str) -> int:
    """A TCP counter of host's kernel (/proc/net/snmp, e.g. RetransSegs): its own, as
    every network namespace counts for itself."""
    res = run(["ip", "netns", "exec", net.names[host], "cat", "/proc/net/snmp"], timeout=30)
    head, values = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("Tcp:")]
    return int(values[head.index(name)])


def syn_attempts(net: cluster.Cluster, host: int, peer: str) -> dict[str, int]:
    """The connection attempts of `host` to `peer` (host:port) still in progress: {its
    local address: how often the kernel backed off its SYN (doubled the wait before
    sending it again)}."""
    res = run(["ip", "netns", "exec", net.names[host], "ss", "-tnoiH", "state", "syn-sent"],
              timeout=30)
    # a socket is a line with its addresses, then an indented line of details, where ss
    # writes backoff:N only when N > 0
    attempts = {}
    for text in re.split(r"\n(?=\S)", res.stdout.strip()):
        fields = text.split()
        if peer in fields:
            backoff = re.search(r"\bbackoff:(\d+)", text)
            attempts[fields[fields.index(peer) - 1]] = int(backoff.group(1)) if backoff else 0
    return attempts
