"""An emulated cluster on this machine: K hosts in network namespaces, one link each.

    switch namespace (the head node: mpiexec runs here)
        br0 10.77.0.254 ── v0 ══ eth0 10.77.0.1  host ddp-<tag>-h0
                        ── v1 ══ eth0 10.77.0.2  host ddp-<tag>-h1  ...

Each host's link is a veth pair from its namespace to a bridge in a namespace of the
cluster's own, so the private network touches nothing outside it. A link can be
shaped (`tc tbf`, both directions), lossy (nftables drops a share of the packets a
host receives) and cut (`ip link set down`). Every host runs its processes under a
host name of its own (`unshare --uts`): MPICH takes ranks with different host names
for different nodes, and with `UCX_TLS=tcp,self` their data crosses the links instead
of the kernel's shared memory, which the byte counters of the links show.

Making namespaces needs root, `ip` (iproute2) and, for loss, `nft` (nftables);
`unavailable()` says in one line why a cluster cannot be made here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .errors import UsageError

PREFIX = "ddp-"
SUBNET = "10.77.0"
HEAD = f"{SUBNET}.254"
BRIDGE = "br0"
# the environment under which MPICH's ranks on different emulated hosts talk over the
# links: UCX would otherwise find that they share a kernel and use its shared memory
MPI_ENV = {"UCX_TLS": "tcp,self"}

_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Link:
    """What every host's link carries: `rate` in bit/s (None: as fast as the kernel
    copies) and `loss`, the percent of the packets a host receives that are dropped."""

    rate: float | None = None
    loss: float = 0.0

    def __str__(self) -> str:
        parts = [_rate_text(self.rate)] if self.rate else ["unshaped"]
        if self.loss:
            parts.append(f"{self.loss:g}%")
        return ",".join(parts)


def _rate_text(rate: float) -> str:
    for unit in ("g", "m", "k"):
        if rate >= _UNITS[unit] and rate % _UNITS[unit] == 0:
            return f"{rate / _UNITS[unit]:g}{unit}bit"
    return f"{rate:g}bit"


def parse_link(text: str) -> Link:
    """A link from `1gbit`, `10gbit,0.5%`, `unshaped` or `unshaped,1%`."""
    rate, loss = None, 0.0
    for part in (p.strip().lower() for p in text.split(",")):
        if part.endswith("%"):
            try:
                loss = float(part[:-1])
            except ValueError:
                loss = -1.0
            if not 0 <= loss < 100:
                raise UsageError(f"link loss must be a percent in [0, 100), like 0.5%, got {part!r}")
        elif part in ("unshaped", "none"):
            rate = None
        else:
            m = _RATE.match(part)
            if not m or float(m.group(1)) <= 0:
                raise UsageError(f"link rate must look like 100mbit, 1gbit or 10gbit "
                                 f"(or 'unshaped'), got {part!r}")
            rate = float(m.group(1)) * _UNITS[m.group(2)]
    return Link(rate, loss)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, timeout=30)
    if check and res.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res


class ClusterError(Exception):
    """A namespace, link or rule of the emulated cluster could not be made or changed."""


def unavailable(loss: bool = False) -> str | None:
    """Why an emulated cluster cannot be made on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux")) + \
            ((("nft", "nftables"),) if loss else ()):
        if shutil.which(tool) is None:
            return f"no {tool} command (apt-get install {package})"
    probe = f"{PREFIX}probe-{os.getpid()}"
    res = _run("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot make a network namespace: {res.stderr.strip()}"
    try:
        res = _run("ip", "-n", probe, "link", "add", "name", "a", "type", "veth", "peer",
                   "name", "b", check=False)
        if res.returncode != 0:
            return f"cannot make a veth pair: {res.stderr.strip()}"
        res = _run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "a", "root", "tbf",
                   "rate", "1gbit", "burst", "256kb", "latency", "100ms", check=False)
        if res.returncode != 0:
            return f"cannot shape a link with tc tbf: {res.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def sweep() -> list[str]:
    """Remove the namespaces of clusters whose process is gone (killed before it could
    clean up); the names it removed."""
    res = _run("ip", "netns", "list", check=False)
    removed = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"^{re.escape(PREFIX)}(\d+)-\d+-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _kill_namespace(name)
            removed.append(name)
    return removed


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in namespace `ns` (bounded wait), then delete it."""
    for _ in range(50):
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _run("ip", "netns", "del", ns, check=False)


_LAUNCHER = """#!/bin/sh
# hydra's "ssh": {script} [-x] HOST COMMAND -- run COMMAND inside HOST's namespace,
# under the host's own name
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
{cases}
  *) echo "no emulated host $host" >&2; exit 255;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns && exec $*"
"""


class Cluster:
    """K emulated hosts joined by a bridge; a context manager that always removes them.

    Parameters
    ----------
    hosts : int
        How many hosts (1 to 250).
    link : Link
        Rate and loss of every host's link.
    """

    _count = 0

    def __init__(self, hosts: int, link: Link = Link()):
        if not 1 <= hosts <= 250:
            raise UsageError(f"--hosts must be in 1..250, got {hosts}")
        Cluster._count += 1
        self.tag = f"{PREFIX}{os.getpid()}-{Cluster._count}"
        self.hosts, self.link = hosts, link
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.tmpdir: str | None = None
        self.made: list[str] = []

    # --- making and removing ---------------------------------------------------------

    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        sweep()
        self._add_namespace(self.switch)
        sw = ("ip", "-n", self.switch)
        _run(*sw, "link", "add", BRIDGE, "type", "bridge")
        _run(*sw, "addr", "add", f"{HEAD}/24", "dev", BRIDGE)
        _run(*sw, "link", "set", BRIDGE, "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            self._add_namespace(ns)
            _run("ip", "link", "add", f"v{i}", "netns", self.switch, "type", "veth",
                 "peer", "name", "eth0", "netns", ns)
            _run(*sw, "link", "set", f"v{i}", "master", BRIDGE, "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            self.shape(i, self.link.rate)
            if self.link.loss:
                self.set_loss(i, self.link.loss)
        self.tmpdir = tempfile.mkdtemp(prefix=f"{self.tag}-")
        self.launcher = os.path.join(self.tmpdir, "launch")
        cases = "\n".join(f"  {a}|{n}) ns={n};;" for a, n in zip(self.addrs, self.names))
        with open(self.launcher, "w") as fh:
            fh.write(_LAUNCHER.format(script=self.launcher, cases=cases))
        os.chmod(self.launcher, 0o755)

    def _add_namespace(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.made.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop every process in the cluster's namespaces and remove them (hosts first:
        their veths go with them)."""
        for ns in reversed(self.made):
            _kill_namespace(ns)
        self.made.clear()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # --- the links -------------------------------------------------------------------

    def _ends(self, i: int):
        """(namespace, device) of both ends of host i's link: the host's, the switch's."""
        return ((self.names[i], "eth0"), (self.switch, f"v{i}"))

    def shape(self, i: int, rate: float | None) -> None:
        """Host i's link at `rate` bit/s each way (None: unshaped)."""
        for ns, dev in self._ends(i):
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if rate:
                # the bucket holds at least 4 ms of traffic, so that the timer's ticks
                # do not cap the rate below the one asked for
                burst = max(256 * 1024, int(rate / 8 * 0.004))
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{int(rate)}bit", "burst", str(burst), "latency", "100ms")

    def set_loss(self, i: int, percent: float) -> None:
        """Host i drops `percent` of the packets it receives (0: none)."""
        ns = self.names[i]
        _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "ddp_loss", check=False)
        if percent:
            rules = ("table inet ddp_loss { chain input { type filter hook input priority 0; "
                     f"policy accept; numgen random mod 10000 < {round(percent * 100)} drop; }}; }}")
            _run("ip", "netns", "exec", ns, "nft", rules)

    def set_up(self, i: int, up: bool) -> None:
        """Connect (True) or cut (False) host i's link, at the switch's end."""
        _run("ip", "-n", self.switch, "link", "set", f"v{i}", "up" if up else "down")

    def counters(self, i: int) -> dict[str, int]:
        """Bytes host i has sent and received over its link: {"tx": ..., "rx": ...}."""
        res = _run("ip", "-n", self.names[i], "-s", "-j", "link", "show", "eth0")
        stats = json.loads(res.stdout)[0]["stats64"]
        return {"tx": stats["tx"]["bytes"], "rx": stats["rx"]["bytes"]}

    # --- running -------------------------------------------------------------------

    def on_host(self, i: int, argv: list[str]) -> list[str]:
        """argv run inside host i, under the host's own name."""
        return ["ip", "netns", "exec", self.names[i], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.names[i], *argv]

    def on_switch(self, argv: list[str]) -> list[str]:
        """argv run on the head node (the switch's namespace, reaching every host)."""
        return ["ip", "netns", "exec", self.switch, *argv]

    def mpiexec(self, mpiexec: str, ranks_per_host: int | list[int], argv: list[str],
                hosts: list[int] | None = None) -> list[str]:
        """The command that starts argv under MPICH's hydra (`mpiexec`) with
        `ranks_per_host` ranks on each of `hosts` (default: every host), rank order
        host by host. Run it as it is: it starts on the head node."""
        hosts = list(range(self.hosts)) if hosts is None else hosts
        per = ranks_per_host if isinstance(ranks_per_host, list) else [ranks_per_host] * len(hosts)
        spec = ",".join(f"{self.addrs[h]}:{n}" for h, n in zip(hosts, per))
        env = [a for k, v in MPI_ENV.items() for a in ("-genv", k, v)]
        return self.on_switch([mpiexec, "-iface", BRIDGE, "-launcher", "ssh",
                               "-launcher-exec", self.launcher, "-hosts", spec,
                               "-n", str(sum(per)), *env, *argv])
