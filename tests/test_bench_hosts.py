"""ddp-bench --variant and --hosts: ddp under several flag sets in one schedule, and the
MPI programs on emulated hosts (network namespaces) with the link measured.

The flags are checked in process; the variants' schedule, ratios and table on made-up
run records; one real bench on 2 emulated hosts shows the link's figures, the bytes
every host sent, the variants' rows, and a cluster removed afterwards, as it is when
the bench is stopped by SIGTERM or Ctrl-C. Nothing asserts on speed, except that a
link shaped to 1 Gbit/s is not measured faster than that.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from ddp import bench, cluster
from ddp.bench.cli import ONE_HOST_NOTES, document
from ddp.bench.run import command
from ddp.bench.summary import ratio_names, schedule, summarize
from ddp.bench.table import format_table
from ddp.benchloops import n_parameters
from helpers import MPIRUN, PY, kill_tree, one_error_line, processes_mentioning
from test_bench import MACHINE, SMALL, options, records, row_of

BENCH = [PY, "-m", "ddp.bench"]
VARIANTS = (("one", ("--bucket-mb", "0")), ("default", ()))


def netns_names() -> set[str]:
    res = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True, timeout=30)
    return {line.split()[0] for line in res.stdout.splitlines() if line.split()}


def hosts_unavailable() -> str | None:
    if MPIRUN is None:
        return "no mpiexec found (pip install mpich)"
    reason = cluster.unavailable()
    return f"no emulated cluster here: {reason}" if reason else None


# --- the flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, said", [
    (["--link", "1gbit"], "--link shapes the links of emulated hosts: give --hosts K"),
    (["--hosts", "2", "--link", "1gb"], "link rate must look like"),
    (["--hosts", "2", "--link", "1gbit,100%"], "link loss must be a percent"),
    (["--hosts", "2", "--ranks", "3"], "--ranks 3 is not a multiple of --hosts 2"),
    (["--hosts", "2", "--ranks", "2,4,5"], "--ranks 5 is not a multiple of --hosts 2"),
    (["--hosts", "1"], "--hosts must be in 2..250"),
    (["--hosts", "251", "--batch", "502", "--samples", "1000"], "--hosts must be in 2..250"),
    (["--hosts", "x"], "argument --hosts"),
    (["--hosts", "2", "--programs", "torch,zmq"], "--programs has none of them"),
    (["--hosts", "2", "--mpirun", f"{MPIRUN or 'mpirun'} -v"], "--mpirun must be the command alone"),
    (["--variant", "one"], "--variant must look like NAME='FLAGS'"),
    (["--variant", "=--bucket-mb 0"], "--variant must look like NAME='FLAGS'"),
    (["--variant", "a b=--bucket-mb 0"], "--variant must look like NAME='FLAGS'"),
    (["--variant", "a=--lr 1", "--variant", "a=--lr 2"], "--variant 'a' is given twice"),
    (["--variant", "a='unclosed"], "cannot split --variant a"),
    (["--programs", "lean", "--variant", "a=--bucket-mb 0"], "--programs must include ddp"),
])
def test_bad_flags_one_line_exit_2(args, said, capsys):
    assert bench.main([*SMALL, "--mpirun", MPIRUN or "mpirun", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert said in one_error_line(captured.err, "ddp-bench"), captured.err
    assert not any(n.startswith(f"{cluster.PREFIX}{os.getpid()}-") for n in netns_names())


def _as_less(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *BENCH, *SMALL, "--mpirun", MPIRUN or "mpirun", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                          cwd="/", env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


def test_without_root_the_hosts_cannot_be_made_one_line_exit_2():
    """A real user without root (setpriv to nobody): ddp-bench says why, before any run."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run ddp-bench as another user")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*nobody, PY, "-c", "import ddp"], capture_output=True, cwd="/",
                      timeout=60).returncode != 0:
        pytest.skip("the installation is not readable by nobody (a checkout under a private directory)")
    r = _as_less(nobody, "--hosts", "2", "--programs", "lean")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert one_error_line(r.stderr, "ddp-bench") == \
        "ddp-bench: error: --hosts: no emulated hosts here: network namespaces need root"


def test_root_without_the_capabilities_cannot_make_hosts_one_line_exit_2():
    """Root with every capability dropped (as in a container without CAP_SYS_ADMIN):
    `ip netns add` is refused, and ddp-bench says so in one line, before any run."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop capabilities")
    r = _as_less(["setpriv", "--inh-caps=-all", "--bounding-set=-all"], "--hosts", "2",
                 "--programs", "lean")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert one_error_line(r.stderr, "ddp-bench").startswith(
        "ddp-bench: error: --hosts: no emulated hosts here: cannot make a network namespace: ")


def test_help_says_hosts_need_root():
    r = subprocess.run([*BENCH, "--help"], stdout=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0
    assert "--hosts K (needs root" in r.stdout and "--variant NAME='FLAGS'" in r.stdout


# --- variants in the schedule, the ratios and the table, on made-up records ---------------


def test_each_variant_is_a_program_of_its_own_in_the_rotation():
    opts = options(ranks=(2,), repeats=3, programs=("lean", "ddp"), variants=VARIANTS)
    assert opts.names() == ["lean", "ddp:one", "ddp:default"]
    orders = [[p for r, _, _, p in schedule(opts, {}) if r == rep] for rep in range(3)]
    assert orders == [["lean", "ddp:one", "ddp:default"], ["ddp:one", "ddp:default", "lean"],
                      ["ddp:default", "lean", "ddp:one"]]
    assert options(programs=("lean", "ddp")).names() == ["lean", "ddp"]   # without: as before


def test_a_variant_runs_ddp_train_with_its_flags_after_the_common_ones():
    opts = options(train_args=("--bucket-mb", "8", "--optimizer", "adam"), variants=VARIANTS)
    one = command("ddp:one", (16, 8, 4), 2, opts, "s.json")
    default = command("ddp:default", (16, 8, 4), 2, opts, "s.json")
    assert one[-6:] == ["--bucket-mb", "8", "--optimizer", "adam", "--bucket-mb", "0"]
    assert default[-4:] == ["--bucket-mb", "8", "--optimizer", "adam"] and "--momentum" not in default
    assert one[:3] == [*opts.mpirun, "-n", "2"] and "ddp" in one and "train" in one


def test_variants_get_ratios_against_the_others_and_the_first_variant():
    names = ["limit", "lean", "ddp:one", "ddp:default", "zmq"]
    assert [n for n, _, _ in ratio_names(names)] == [
        "ddp:one/limit", "ddp:default/limit", "ddp:one/lean", "ddp:default/lean",
        "zmq/ddp:one", "zmq/ddp:default", "ddp:default/ddp:one"]
    assert [n for n, _, _ in ratio_names(["limit", "lean", "ddp", "torch", "zmq"])] == [
        "ddp/limit", "ddp/lean", "ddp/torch", "zmq/ddp"]


def test_table_of_variants():
    opts = options(ranks=(2,), repeats=2, programs=("lean", "ddp"), variants=VARIANTS)
    runs = records(opts)
    doc = document(MACHINE, opts, {}, runs)
    (combo,) = summarize(runs, opts, {})
    rate = {(r["program"], r["repeat"]): r["samples_per_second"] for r in runs}
    pairs = [rate["ddp:default", k] / rate["ddp:one", k] for k in range(2)]
    assert combo["ratios"]["ddp:default/ddp:one"]["pairs"] == pytest.approx(pairs, rel=1e-12)
    lines = format_table(doc).splitlines()
    header = row_of(lines, "| layers | ranks |")
    assert header == ["layers", "ranks", "lean", "ddp:one", "ddp:default", "ddp:one/lean",
                      "ddp:default/lean", "ddp:default/ddp:one"]
    row = dict(zip(header, row_of(lines, "| 16,8,4 | 2 |"), strict=True))
    assert float(row["ddp:default/ddp:one"]) == pytest.approx(sum(pairs) / 2, abs=0.006)
    for name in ("ddp:one", "ddp:default"):
        assert any(ln.startswith(f"ddp-train gradient exchange ({name}), share of step time: 16,8,4 ×2 ")
                   for ln in lines)


# --- one real bench on 2 emulated hosts ---------------------------------------------------

# the tiny model, and one whose gradient sums (139 kB a step) dwarf what MPI's start-up
# sends, so that the byte counters tell a run that summed over the links from one that did not
TINY, WIDE = [20, 16, 3], [64, 512, 3]
HOST_RUN = ["--hosts", "2", "--ranks", "2,4", "--steps", "3", "--warmup", "1", "--repeats", "1",
            "--layers", "20,16,3", "--layers", "64,512,3", "--batch", "32", "--samples", "256",
            "--link", "1gbit", "--variant", "one=--bucket-mb 0", "--variant", "default=", "--json"]
STEPS = 4                                   # warm-up and timed


def gradient_bytes(layers) -> int:
    return 4 * n_parameters(layers)         # float32


@pytest.fixture(scope="module")
def hosts_report():
    """(pid, document, stderr, namespaces left when it ended) of one real bench."""
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.Popen([*BENCH, "--mpirun", MPIRUN, *HOST_RUN], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
        left = netns_names()
    finally:
        kill_tree(proc)
        cluster.sweep()   # what a bench killed here could not remove
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return proc.pid, json.loads(out), err, left


def test_the_link_is_measured_between_two_hosts(hosts_report):
    _, doc, err, _ = hosts_report
    h = doc["hosts"]
    assert h["hosts"] == 2 and h["link"] == "1gbit" and h["rate_bits_per_second"] == 1e9
    link = h["measured"]
    assert link["ok"] and link["returncode"] == 0 and "10.77.0.1:1,10.77.0.2:1" in link["command"]
    assert [s["bytes"] for s in link["sizes"]] == [8, 8 * 2**20, gradient_bytes(TINY), gradient_bytes(WIDE)]
    assert [s["what"] for s in link["sizes"]] == ["alpha", "8 MiB", "gradient 20,16,3", "gradient 64,512,3"]
    for s in link["sizes"]:
        assert s["seconds"] > 0 and len(s["round_seconds"]) == s["rounds"] == 15
        assert s["bandwidth_bytes_per_second"] == pytest.approx(s["bytes"] / s["seconds"], rel=1e-12)
    assert link["alpha_seconds"] == link["sizes"][0]["seconds"]
    # shaped to 1 Gbit/s each way: no faster than that (the bucket's burst allows 3 %)
    assert 0 < link["bandwidth_bytes_per_second"] <= 1.1 * 1e9 / 8, link
    assert min(link["host_bytes"]["sent"]) > 8 * 2**20 * 15   # the 8 MiB rounds crossed both links
    assert "2 emulated hosts, link 1gbit: α " in err


def test_every_run_spread_its_ranks_and_its_traffic_over_the_links(hosts_report):
    _, doc, _, _ = hosts_report
    runs = doc["runs"]
    assert sorted((r["program"], r["ranks"], tuple(r["layers"])) for r in runs) == sorted(
        (p, n, tuple(l)) for p in ("limit", "lean", "ddp:one", "ddp:default") for n in (2, 4)
        for l in (TINY, WIDE))
    for r in runs:
        assert r["ok"], r
        per_host = r["ranks"] // 2
        assert f"-hosts 10.77.0.1:{per_host},10.77.0.2:{per_host} -n {r['ranks']}" in r["command"]
        sent = r["host_bytes"]["sent"]
        assert len(sent) == 2 and min(r["host_bytes"]["received"]) > 0
        if r["layers"] == WIDE:
            # an Allreduce of two parts sends at least half the gradient from each host a
            # step; limit (no Allreduce) is the control: its ranks only meet at Barriers
            floor = STEPS * gradient_bytes(WIDE) // 2
            assert (min(sent) > floor) == (r["program"] != "limit"), (r["program"], sent, floor)
        if r["program"].startswith("ddp:"):
            # auto: the hierarchy once every host runs several ranks, else the Allreduce
            expected = "hierarchical" if per_host >= 2 else "allreduce"
            assert r["result"]["world_size"] == r["ranks"] and r["result"]["exchange"] == expected
            assert ("--bucket-mb 0" in r["command"]) == (r["program"] == "ddp:one")
    assert doc["skipped"] == ONE_HOST_NOTES and doc["failed_runs"] == 0


def test_table_of_the_hosts_run(hosts_report):
    _, doc, _, _ = hosts_report
    lines = format_table(doc).splitlines()
    assert lines[2] == ("Hosts: the ranks spread evenly over 2 emulated hosts (network namespaces on "
                        f"this machine, sharing its {doc['machine']['cores']} cores), link 1gbit each.")
    assert lines[3].startswith("Link: α = ") and "8 MiB" in lines[3] and "gradient 20,16,3" in lines[3]
    header = row_of(lines, "| layers | ranks |")   # the programs that ran across the hosts
    assert header == ["layers", "ranks", "limit", "lean", "ddp:one", "ddp:default", "ddp:one/limit",
                      "ddp:default/limit", "ddp:one/lean", "ddp:default/lean", "ddp:default/ddp:one"]
    for layers in ("20,16,3", "64,512,3"):
        for ranks in ("2", "4"):
            row = dict(zip(header, row_of(lines, f"| {layers} | {ranks} |"), strict=True))
            assert all(row[p].replace(",", "").isdigit() for p in header[2:6]), row
            assert all(float(row[r]) > 0 for r in header[6:]), row
    assert not any(ln.startswith("zmq bytes per step") for ln in lines)
    assert any(ln.startswith("bytes each host sent over its link, median per run (ddp:one): 20,16,3 ×2 [")
               for ln in lines)
    assert [ln for ln in lines if ln.startswith("note: ")] == [f"note: {n}" for n in ONE_HOST_NOTES.values()]


def test_the_cluster_is_removed_after_the_bench(hosts_report):
    pid, doc, _, left = hosts_report
    assert len(doc["hosts"]["namespaces"]) == 3 and not set(doc["hosts"]["namespaces"]) & left
    assert not any(n.startswith(f"{cluster.PREFIX}{pid}-") for n in left)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["sigterm", "ctrl-c"])
def test_a_stopped_bench_removes_its_hosts_and_leaves_nothing_running(sig, code):
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    marker = "7654321"                              # a step count no other process uses
    proc = subprocess.Popen([*BENCH, *SMALL, "--mpirun", MPIRUN, "--hosts", "2", "--ranks", "2",
                             "--programs", "lean", "--repeats", "1", "--steps", marker],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while len([c for c in processes_mentioning(marker) if "benchloops lean" in c
                   and "mpiexec" not in c and "ip netns" not in c]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.1)
        mine = {n for n in netns_names() if n.startswith(f"{cluster.PREFIX}{proc.pid}-")}
        assert len(mine) == 3                       # the switch and 2 hosts
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        left = mine & netns_names()
    finally:
        kill_tree(proc)
        cluster.sweep()   # what a bench killed here could not remove
    assert proc.returncode == code, err
    assert "Traceback" not in err and out == ""
    assert not left
    deadline = time.monotonic() + 10
    while processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(marker) == []
