"""ddp-bench and its reference loops: what they report, never how fast.

Rates depend on the machine and its load, so nothing here asserts on speed. The
tests check that every program ran in the documented order, that medians and
ratios are computed from the raw runs as documented, that failures, timeouts and
Ctrl-C end cleanly with nothing left running, and that the lean loop is a correct
data-parallel step (the same parameters on every rank, exact gradient sums).
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import statistics
import subprocess
import time

import numpy as np
import pytest

from conftest import BIN, MPIRUN, PY, kill_tree, one_error_line, processes_mentioning, run
from ddp import bench
from ddp.benchloops import gemm_flops, grad_sums_, he_init_, layer_views, n_parameters, step_gemms

BENCH = [PY, "-m", "ddp.bench"]
SMALL = ["--layers", "16,8,4", "--batch", "32", "--steps", "5", "--warmup", "2", "--samples", "256"]
HAS_TORCH = importlib.util.find_spec("torch") is not None

needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="no mpirun/mpiexec found (pip install mpich)")


def bench_cmd(*args: str) -> list[str]:
    return [*BENCH, *SMALL, "--mpirun", MPIRUN or "mpirun", *args]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (bench runs left behind)."""
    return processes_mentioning(marker)


def wait_gone(marker: str, seconds: float = 5.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --- the whole command, once ---------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    if MPIRUN is None:
        pytest.skip("no mpirun/mpiexec found (pip install mpich)")
    r = run(bench_cmd("--ranks", "1,2", "--repeats", "2", "--programs", "limit,lean,ddp,zmq,sgemm",
                      "--json"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout), r.stderr


def test_every_run_present_with_a_rate(report):
    doc, stderr = report
    runs = doc["runs"]
    expected = {(rep, ranks, p) for rep in range(2) for ranks in (1, 2)
                for p in ("limit", "lean", "ddp", "zmq") + (("sgemm",) if ranks == 1 else ())}
    assert {(r["repeat"], r["ranks"], r["program"]) for r in runs} == expected
    assert len(runs) == len(expected) == 18
    for r in runs:
        assert r["ok"] and r["returncode"] == 0, r
        assert r["layers"] == [16, 8, 4]
        assert math.isfinite(r["samples_per_second"]) and r["samples_per_second"] > 0
    assert doc["failed_runs"] == 0 and doc["skipped"] == {}
    assert len([ln for ln in stderr.splitlines() if ln.startswith("ddp-bench: [")]) == 18  # progress


def test_order_rotates_every_repeat(report):
    doc, _ = report
    for ranks, programs in ((1, ["limit", "lean", "ddp", "zmq", "sgemm"]), (2, ["limit", "lean", "ddp", "zmq"])):
        for rep in range(2):
            order = [r["program"] for r in doc["runs"] if r["ranks"] == ranks and r["repeat"] == rep]
            assert order == programs[rep:] + programs[:rep]


def test_medians_and_ratios_come_from_the_raw_runs(report):
    doc, _ = report
    assert len(doc["combinations"]) == 2
    for c in doc["combinations"]:
        mine = [r for r in doc["runs"] if r["ranks"] == c["ranks"]]

        def raw(program, key="samples_per_second"):
            return {r["repeat"]: r[key] for r in mine if r["program"] == program}

        for program, entry in c["programs"].items():
            assert entry["runs"] == 2 and entry["failed"] == 0
            assert entry["samples_per_second"] == statistics.median(raw(program).values())
        for name, a, b in bench.RATIOS:
            if a not in c["programs"] or b not in c["programs"]:
                assert name not in c["ratios"]
                continue
            ratio = c["ratios"][name]
            assert ratio["of_medians"] == pytest.approx(
                statistics.median(raw(a).values()) / statistics.median(raw(b).values()), rel=1e-12)
            pairs = [raw(a)[rep] / raw(b)[rep] for rep in range(2)]
            assert ratio["pairs"] == pytest.approx(pairs, rel=1e-12)
            assert ratio["pairwise"] == pytest.approx(statistics.median(pairs), rel=1e-12)
        assert "ddp/torch" not in c["ratios"]
        ddp = c["programs"]["ddp"]
        assert 0 <= ddp["allreduce_fraction"] <= 1
        assert c["programs"]["zmq"]["bytes_per_step"] > 0


def test_gemm_rates_at_one_rank(report):
    doc, _ = report
    one = next(c for c in doc["combinations"] if c["ranks"] == 1)
    # 2·m·n·k at batch 32: forward a·W and dW = aᵀ·δ for both layers, δ·Wᵀ for the second
    flops = 2 * 32 * (2 * (16 * 8) + 2 * (8 * 4) + 8 * 4)
    assert one["gemm_flops_per_step"] == flops == 22528
    ddp = [r for r in doc["runs"] if r["program"] == "ddp" and r["ranks"] == 1]
    for r in ddp:
        assert r["gemm_flops_per_second"] == pytest.approx(flops * r["samples_per_second"] / 32, rel=1e-12)
    sgemm = {r["repeat"]: r for r in doc["runs"] if r["program"] == "sgemm"}
    for r in sgemm.values():
        assert r["flops_per_second"] > 0 and r["result"]["flops_per_second_1thread"] > 0
        assert r["result"]["gemm_flops_per_step"] == flops
    ratio = one["ratios"][bench.GEMM_RATIO]
    pairs = [next(d for d in ddp if d["repeat"] == rep)["gemm_flops_per_second"]
             / sgemm[rep]["flops_per_second"] for rep in range(2)]
    assert ratio["pairwise"] == pytest.approx(statistics.median(pairs), rel=1e-12)
    two = next(c for c in doc["combinations"] if c["ranks"] == 2)
    assert "sgemm" not in two["programs"] and bench.GEMM_RATIO not in two["ratios"]


def test_machine_and_options_recorded(report):
    doc, _ = report
    m = doc["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["python"] and m["numpy"]
    assert m["mpi"] and isinstance(m["blas"], list)
    assert (m["torch"] is not None) == HAS_TORCH
    opts = doc["options"]
    assert opts["ranks"] == [1, 2] and opts["layers"] == [[16, 8, 4]] and opts["batch"] == 32
    assert opts["programs"] == ["limit", "lean", "ddp", "zmq", "sgemm"]
    for r in doc["runs"]:
        assert r["threads_per_rank_env"] == max(1, m["cores"] // r["ranks"])


# --- the table, skips, failures ----------------------------------------------------------


@needs_mpi
@pytest.mark.skipif(HAS_TORCH, reason="torch is installed: it would be run, not skipped")
def test_table_and_torch_skipped():
    r = run(bench_cmd("--ranks", "1", "--repeats", "1", "--programs", "lean,torch,sgemm"), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ddp-bench ") and "median of 1 runs" in lines[0]
    assert "| layers | ranks | lean | torch |" in lines
    row = cells(next(ln for ln in lines if ln.startswith("| 16,8,4 | 1 |")))
    assert row[:2] == ["16,8,4", "1"] and row[2].replace(",", "").isdigit() and row[3] == "skipped"
    assert any(ln.startswith("| 16,8,4 | 2.25e-05 |") for ln in lines)   # the GEMM table
    assert f"note: {bench.TORCH_NOTE}" in lines
    assert lines[-1].startswith("machine: ")


@needs_mpi
def test_failed_run_is_reported_and_exits_1():
    r = run(bench_cmd("--ranks", "1", "--repeats", "1", "--programs", "lean,ddp",
                      "--train-args=--no-such-flag 3"), timeout=60)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    row = cells(next(ln for ln in r.stdout.splitlines() if ln.startswith("| 16,8,4 | 1 |")))
    assert row[3] == "failed" and row[4] == "-"     # layers, ranks, lean, ddp, ddp/lean
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("failed: ddp 16,8,4 ×1 (repeat 1): exit 2: ")]
    assert len(failed) == 1 and "--no-such-flag" in failed[0]


@needs_mpi
def test_timeout_stops_every_process():
    marker = "9876543"                              # a step count no other process uses
    r = run(bench_cmd("--ranks", "2", "--repeats", "1", "--programs", "lean", "--timeout", "1.5",
                      "--json", "--quiet") + ["--steps", marker], timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ""                           # --quiet
    (run_,) = json.loads(r.stdout)["runs"]
    assert not run_["ok"] and run_["error"].startswith("timed out after 1.5 s")
    assert wait_gone(marker) == []


@needs_mpi
def test_ctrl_c_stops_the_run_and_exits_130():
    marker = "8765432"
    proc = subprocess.Popen(bench_cmd("--ranks", "2", "--repeats", "1", "--programs", "lean")
                            + ["--steps", marker], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, stdin=subprocess.DEVNULL,
                            # a shell's background job may inherit SIGINT ignored; a terminal's is not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while len([c for c in leftovers(marker) if "benchloops" in c and "mpirun" not in c]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert wait_gone(marker) == []


# --- bad flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--ranks", "0"], ["--ranks", "1,x"], ["--layers", "5"], ["--layers", "5,a"],
    ["--programs", "lean,nope"], ["--batch", "0"], ["--repeats", "0"], ["--timeout", "-1"],
    ["--timeout", "nan"], ["--train-args", "'unclosed"], ["--mpirun", "/no/such/mpirun"],
    ["--batch", "2", "--ranks", "1,4"], ["--samples", "8", "--batch", "16"], ["--no-such-flag"],
])
def test_bad_flags_one_line_exit_2(args, capsys):
    assert bench.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_error_line(captured.err, "ddp-bench")
    assert len(captured.err.splitlines()) == 1


def test_installed_script():
    script = shutil.which("ddp-bench", path=BIN)
    if script is None:
        pytest.skip("package not installed (pip install .): no ddp-bench script")
    r = run([script, "--ranks", "0"], timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert one_error_line(r.stderr, "ddp-bench").startswith("ddp-bench: error: argument --ranks")
    r = run([script, "--help"], timeout=30)
    assert r.returncode == 0 and "--train-args" in r.stdout


# --- pieces ------------------------------------------------------------------------------


def test_rotation_puts_every_program_in_every_slot():
    items = ["limit", "lean", "ddp", "zmq"]
    orders = [bench.rotated(items, k) for k in range(len(items))]
    for slot in range(len(items)):
        assert sorted(order[slot] for order in orders) == sorted(items)
    assert bench.rotated(items, 5) == bench.rotated(items, 1) and bench.rotated([], 3) == []


def test_ratio_stats_pairs_by_repeat():
    s = bench.ratio_stats({0: 10.0, 1: 30.0, 2: 20.0}, {0: 20.0, 2: 10.0, 3: 5.0})
    assert s["pairs"] == [0.5, 2.0]                 # repeats 0 and 2 only
    assert s["pairwise"] == 1.25
    assert s["of_medians"] == 20.0 / 10.0
    assert bench.ratio_stats({}, {0: 1.0}) == {"of_medians": None, "pairwise": None, "pairs": []}


@pytest.mark.parametrize("layers", [[16, 8, 4], [784, 256, 10], [5, 7, 6, 3]])
def test_gemm_flops_match_the_products(layers):
    products = step_gemms(layers, 12, np.float32)
    assert len(products) == 3 * (len(layers) - 1) - 1
    total = 0
    for a, b, out in products:
        (m, k), (k2, n) = a.shape, b.shape
        assert k == k2 and out.shape == (m, n)
        total += 2 * m * n * k
    assert total == gemm_flops(layers, 12)


def _loss_sum(flat, layers, X, y):
    grads = np.empty_like(flat)
    return grad_sums_(layer_views(flat.copy(), layers), layer_views(grads, layers), X, y)


def test_lean_gradients_are_exact_sums():
    """Finite differences on a float64 net; and two shards' sums add up to the batch's."""
    layers = [5, 7, 6, 3]
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((9, 5)), rng.integers(0, 3, 9)
    flat = np.empty(n_parameters(layers))
    he_init_(layer_views(flat, layers))
    flat += 0.01 * rng.standard_normal(flat.shape)  # nonzero biases
    grads = np.empty_like(flat)
    grad_sums_(layer_views(flat, layers), layer_views(grads, layers), X, y)
    eps = 1e-6
    for i in rng.choice(flat.size, 25, replace=False):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        numeric = (_loss_sum(up, layers, X, y) - _loss_sum(down, layers, X, y)) / (2 * eps)
        assert numeric == pytest.approx(grads[i], rel=1e-5, abs=1e-7)
    parts = np.zeros_like(flat)
    for rows in (slice(0, 4), slice(4, 9)):
        g = np.empty_like(flat)
        grad_sums_(layer_views(flat, layers), layer_views(g, layers), X[rows], y[rows])
        parts += g
    np.testing.assert_allclose(parts, grads, rtol=1e-12, atol=1e-12)


@needs_mpi
@pytest.mark.parametrize("threads", ["1", "2"])
def test_gemm_table_names_each_sgemm_column_once(threads):
    r = run(bench_cmd("--ranks", "1", "--repeats", "1", "--programs", "sgemm", "--threads", threads),
            timeout=60)
    assert r.returncode == 0, r.stderr
    header = cells(next(ln for ln in r.stdout.splitlines() if ln.startswith("| layers | GEMM")))
    sgemm = [h for h in header if h.startswith("numpy sgemm")]
    assert len(sgemm) == len(set(sgemm)) == (1 if threads == "1" else 2), header
    row = cells(next(ln for ln in r.stdout.splitlines() if ln.startswith("| 16,8,4 | 2.25e-05 |")))
    assert len(row) == len(header)


@needs_mpi
def test_lean_loop_keeps_ranks_identical():
    loop = [PY, "-m", "ddp.benchloops", "lean", "--layers", "16,8,4", "--batch", "31", "--steps", "5",
            "--warmup", "2", "--threads", "1"]
    r = run([MPIRUN, "-n", "2", *loop], timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["program"] == "lean" and out["world_size"] == 2 and out["parameters"] == 172
    a, b = out["param_digests"]
    assert a == b                                   # one Allreduce, the same update everywhere
    r = run([MPIRUN, "-n", "2", *loop, "--no-comm"], timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = out["param_digests"]
    assert out["program"] == "limit" and a != b    # each rank trained on its own shard alone
