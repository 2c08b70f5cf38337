"""What the tests on emulated hosts share: a cluster made once per module (skipped
with the reason where network namespaces cannot be made), and ddp-train under
mpiexec across its hosts."""
from __future__ import annotations

import pytest

from ddp import cluster
from helpers import MPIRUN, PY, run


def make_cluster(hosts: int, link: cluster.Link = cluster.Link()):
    """A started Cluster of `hosts` hosts, or a skip saying why there can be none."""
    reason = cluster.unavailable(loss=bool(link.loss))
    if reason:
        pytest.skip(f"no emulated cluster here: {reason}")
    if MPIRUN is None:
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
