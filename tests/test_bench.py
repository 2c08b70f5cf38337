"""ddp-bench and its reference loops: what they report, never how fast.

Rates depend on the machine and its load, so nothing here asserts on speed. One
real ddp-bench run checks that every program runs and is read as documented; the
schedule, medians, ratios and the table are checked in process on run records;
failures, timeouts and Ctrl-C end cleanly with nothing left running; and the lean
loop is a correct data-parallel step (the same parameters on every rank, exact
gradient sums).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import time

import numpy as np
import pytest

from helpers import BIN, MPIRUN, PY, alive, descendants, kill_tree, one_error_line, processes_mentioning, run
from ddp import bench
from ddp.bench.cli import TORCH_NOTE, document, print_report
from ddp.bench.machine import machine_line
from ddp.bench.options import PROGRAMS, Options
from ddp.bench.run import command, run_env, run_program
from ddp.bench.summary import GEMM_RATIO, RATIOS, ratio_stats, rotated, schedule, summarize
from ddp.bench.table import format_table
from ddp.benchloops import gemm_flops, grad_sums_, he_init_, layer_views, n_parameters, step_gemms
from ddp.proc import stop_tree
from ddp.threads import ENV_VARS, host_cores

BENCH = [PY, "-m", "ddp.bench"]
SMALL = ["--layers", "16,8,4", "--batch", "32", "--steps", "5", "--warmup", "2", "--samples", "256"]
HAS_TORCH = importlib.util.find_spec("torch") is not None
GEMM_FLOPS = 22528   # 16,8,4 at batch 32: 2·32·(2·(16·8) + 2·(8·4) + 8·4)

needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="no mpirun/mpiexec found (pip install mpich)")


def bench_cmd(*args: str) -> list[str]:
    return [*BENCH, *SMALL, "--mpirun", MPIRUN or "mpirun", *args]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def row_of(lines: list[str], start: str) -> list[str]:
    return cells(next(ln for ln in lines if ln.startswith(start)))


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (bench runs left behind)."""
    return processes_mentioning(marker)


def wait_gone(marker: str, seconds: float = 5.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --- run records, for the schedule, the summary and the table in process ------------------

# the options SMALL gives, at 1 and 2 ranks, 3 repeats, every program but torch
BASE = Options(ranks=(1, 2), layers=((16, 8, 4),), batch=32, steps=5, warmup=2, repeats=3, samples=256,
               programs=("limit", "lean", "ddp", "zmq", "sgemm"), train_args=(),
               mpirun=(MPIRUN or "mpirun",), timeout=60.0, json=False, quiet=True)
MACHINE = {"cpu": "a test CPU", "cores": 2, "cpu_count": 2, "memory_gib": 4.0, "python": "3.11.0",
           "platform": "Linux", "ddp_train": "0.1.0", "numpy": "2.0.0", "blas": [], "mpi": "MPICH 4.2",
           "torch": None}


def options(**changes) -> Options:
    return dataclasses.replace(BASE, **changes)


def records(opts: Options, skipped: dict | None = None, failed=frozenset()) -> list[dict]:
    """One record per job of opts' schedule, with the keys run_program gives and made-up
    measurements (distinct for every run); the (repeat, ranks, program) in `failed` failed."""
    rng = np.random.default_rng(5)
    runs = []
    for repeat, layers, ranks, program in schedule(opts, skipped or {}):
        r = {"program": program, "layers": list(layers), "ranks": ranks, "repeat": repeat}
        if (repeat, ranks, program) in failed:
            r.update(ok=False, returncode=2, error="exit 2: ddp-train: error: boom")
            runs.append(r)
            continue
        rate = float(rng.uniform(1e3, 1e5))
        r.update(ok=True, returncode=0, samples_per_second=rate,
                 result={"samples_per_second": rate, "allreduce_fraction": float(rng.uniform()),
                         "bytes_per_step": int(rng.integers(1, 10**6)),
                         "flops_per_second": float(rng.uniform(1e8, 1e10)),
                         "flops_per_second_1thread": float(rng.uniform(1e8, 1e9))})
        if program == "ddp":
            r["gemm_flops_per_second"] = float(rng.uniform(1e8, 1e10))
        if program == "sgemm":
            r["flops_per_second"] = r["result"]["flops_per_second"]
        runs.append(r)
    return runs


def test_schedule_rotates_every_repeat():
    jobs = schedule(options(repeats=2), {})
    assert len(jobs) == 18 and [j[0] for j in jobs] == [0] * 9 + [1] * 9   # repeat by repeat
    assert {layers for _, layers, _, _ in jobs} == {(16, 8, 4)}
    for ranks, programs in ((1, ["limit", "lean", "ddp", "zmq", "sgemm"]),
                            (2, ["limit", "lean", "ddp", "zmq"])):
        for rep in range(2):
            order = [p for r, _, n, p in jobs if n == ranks and r == rep]
            assert order == programs[rep:] + programs[:rep]
    opts = options(ranks=(1,), repeats=1, programs=("lean", "torch", "sgemm"))
    assert [p for *_, p in schedule(opts, {"torch": TORCH_NOTE})] == ["lean", "sgemm"]


def test_medians_and_ratios_come_from_the_raw_runs():
    opts = options()
    runs = records(opts, failed={(1, 2, "lean")})
    combos = summarize(runs, opts, {})
    assert [(c["layers"], c["ranks"]) for c in combos] == [([16, 8, 4], 1), ([16, 8, 4], 2)]
    for c in combos:
        mine = [r for r in runs if r["ranks"] == c["ranks"] and r["ok"]]

        def raw(program, key="samples_per_second"):
            return {r["repeat"]: r[key] for r in mine if r["program"] == program}

        def result_median(program, key):
            return statistics.median(r["result"][key] for r in mine if r["program"] == program)

        for program, entry in c["programs"].items():
            failed = int((c["ranks"], program) == (2, "lean"))
            assert entry["runs"] == 3 - failed and entry["failed"] == failed
            assert entry["samples_per_second"] == statistics.median(raw(program).values())
        for name, a, b in RATIOS:
            if a not in c["programs"] or b not in c["programs"]:
                assert name not in c["ratios"]
                continue
            ratio = c["ratios"][name]
            assert ratio["of_medians"] == pytest.approx(
                statistics.median(raw(a).values()) / statistics.median(raw(b).values()), rel=1e-12)
            pairs = [raw(a)[rep] / raw(b)[rep] for rep in sorted(raw(a).keys() & raw(b).keys())]
            assert len(pairs) == (2 if (c["ranks"], "lean") in ((2, a), (2, b)) else 3)  # not the failed one
            assert ratio["pairs"] == pytest.approx(pairs, rel=1e-12)
            assert ratio["pairwise"] == pytest.approx(statistics.median(pairs), rel=1e-12)
        assert "ddp/torch" not in c["ratios"]
        assert c["programs"]["ddp"]["allreduce_fraction"] == result_median("ddp", "allreduce_fraction")
        assert c["programs"]["zmq"]["bytes_per_step"] == result_median("zmq", "bytes_per_step")
        assert c["threads_per_rank"] == max(1, host_cores() // c["ranks"])
        assert c["gemm_flops_per_step"] == GEMM_FLOPS


def test_gemm_rates_and_their_ratio_at_one_rank_only():
    opts = options()
    runs = records(opts)
    one, two = summarize(runs, opts, {})
    ddp = {r["repeat"]: r for r in runs if r["program"] == "ddp" and r["ranks"] == 1}
    sgemm = {r["repeat"]: r for r in runs if r["program"] == "sgemm"}
    entry = one["programs"]["sgemm"]
    assert entry["flops_per_second"] == statistics.median(r["flops_per_second"] for r in sgemm.values())
    assert entry["flops_per_second_1thread"] == statistics.median(
        r["result"]["flops_per_second_1thread"] for r in sgemm.values())
    assert one["programs"]["ddp"]["gemm_flops_per_second"] == statistics.median(
        r["gemm_flops_per_second"] for r in ddp.values())
    pairs = [ddp[rep]["gemm_flops_per_second"] / sgemm[rep]["flops_per_second"] for rep in range(3)]
    assert one["ratios"][GEMM_RATIO]["pairwise"] == pytest.approx(statistics.median(pairs), rel=1e-12)
    assert "sgemm" not in two["programs"] and GEMM_RATIO not in two["ratios"]


def test_table_marks_skipped_and_failed_programs():
    opts = options(ranks=(1,), repeats=2, programs=("lean", "ddp", "torch", "sgemm"))
    skipped = {"torch": TORCH_NOTE}
    runs = records(opts, skipped, failed={(1, 1, "lean"), (0, 1, "ddp"), (1, 1, "ddp")})
    doc = document(MACHINE, opts, skipped, runs)
    lines = format_table(doc).splitlines()
    assert lines[0].startswith("ddp-bench 0.1.0: samples/s, median of 2 runs; ratios: median of per-repeat")
    assert lines[0].endswith("BLAS threads per rank = 2 cores ÷ ranks.")
    assert "| layers | ranks | lean | ddp | torch | ddp/lean | ddp/torch |" in lines
    (lean,) = [r["samples_per_second"] for r in runs if r["program"] == "lean" and r["ok"]]
    assert row_of(lines, "| 16,8,4 | 1 |") == ["16,8,4", "1", f"{lean:,.0f} (1 failed)", "failed", "skipped",
                                              "-", "-"]
    gemm = row_of(lines, "| 16,8,4 | 2.25e-05 |")   # the GEMM table: ddp's rate and ratio unknown
    assert gemm[-2:] == ["-", "-"]
    assert "ddp-train gradient exchange, share of step time: 16,8,4 ×1 -" in lines
    assert f"note: {TORCH_NOTE}" in lines
    failed = [ln for ln in lines if ln.startswith("failed: ")]   # in the order they ran
    assert failed == ["failed: ddp 16,8,4 ×1 (repeat 1): exit 2: ddp-train: error: boom",
                      "failed: ddp 16,8,4 ×1 (repeat 2): exit 2: ddp-train: error: boom",
                      "failed: lean 16,8,4 ×1 (repeat 2): exit 2: ddp-train: error: boom"]
    assert lines[-1] == machine_line(MACHINE)
    assert "threads per rank = 3." in format_table(document(MACHINE, options(threads=3), {}, []))


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_table_names_each_sgemm_column_once(threads):
    opts = options(ranks=(1,), repeats=1, programs=("sgemm",), threads=threads)
    lines = format_table(document(MACHINE, opts, {}, records(opts))).splitlines()
    header = row_of(lines, "| layers | GEMM")
    sgemm = [h for h in header if h.startswith("numpy sgemm")]
    assert len(sgemm) == len(set(sgemm)) == threads, header
    assert len(row_of(lines, "| 16,8,4 | 2.25e-05 |")) == len(header)


def test_exit_code_1_when_a_run_failed_and_json_is_the_document(capsys):
    opts = options(repeats=1)
    good = document(MACHINE, opts, {}, records(opts))
    assert print_report(good, as_json=False) == 0
    assert capsys.readouterr().out == format_table(good) + "\n"
    assert print_report(good, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(good))
    bad = document(MACHINE, opts, {}, records(opts, failed={(0, 2, "zmq")}))
    assert bad["failed_runs"] == 1 and print_report(bad, as_json=False) == 1


def test_progress_lines_name_each_run_and_say_which_failed(capsys):
    """One stderr line a run while ddp-bench works: its rate, or FAILED with the error;
    none with --quiet."""
    from ddp.bench.cli import _report_run
    opts = options(repeats=1, quiet=False)
    runs = records(opts, failed={(0, 2, "zmq")})
    for i, record in enumerate(runs):
        record["wall_seconds"] = 1.25
        _report_run(opts, record, i, len(runs))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(runs)
    failed = [ln for ln in lines if "FAILED" in ln]
    assert failed == [ln for ln in lines if " zmq " in ln and "×2:" in ln]
    assert failed[0].endswith("FAILED: exit 2: ddp-train: error: boom")
    assert all(ln.startswith("ddp-bench: [") and ln.endswith("samples/s (1.2 s)")
               for ln in lines if ln not in failed)
    _report_run(options(repeats=1, quiet=True), runs[0], 0, len(runs))
    assert capsys.readouterr().err == ""


def test_every_program_gets_the_same_thread_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")   # the user's variables have no say in ddp-bench
    for threads in (None, 3):
        opts = options(threads=threads)
        for ranks in (1, 2):
            n = str(threads or max(1, host_cores() // ranks))
            assert {var: run_env(ranks, opts)[var] for var in ENV_VARS} == dict.fromkeys(ENV_VARS, n)
            for program in PROGRAMS:
                cmd = command(program, (16, 8, 4), ranks, opts, "summary.json")
                assert cmd[cmd.index("--threads") + 1] == n, cmd
                if program in ("limit", "lean", "ddp"):
                    assert cmd[:3] == [*opts.mpirun, "-n", str(ranks)]


def test_ddp_runs_the_loops_plain_sgd_unless_train_args_pick_another_optimizer():
    """--momentum is sgd's flag: with --train-args '--optimizer adam' it is not passed
    (ddp-train would refuse it), and a --momentum in --train-args wins over the default."""
    from ddp.config import build_parser

    for train_args, momentum in (((), "0"), (("--momentum", "0.9"), "0.9"),
                                 (("--optimizer", "adam"), None), (("--optimizer=adamw",), None)):
        cmd = command("ddp", (16, 8, 4), 2, options(train_args=train_args), "summary.json")
        args = build_parser("ddp-train", "").parse_args(cmd[cmd.index("train") + 1:])
        assert args.momentum == (None if momentum is None else float(momentum)), cmd


# --- one program, really run: failures and timeouts ----------------------------------------


@needs_mpi
def test_failed_run_is_recorded_with_its_last_error_line(tmp_path):
    opts = options(train_args=("--no-such-flag", "3"))
    record = run_program("ddp", (16, 8, 4), 1, opts, str(tmp_path), "run0")
    assert not record["ok"] and record["returncode"] == 2
    assert record["error"].startswith("exit 2: ") and "--no-such-flag" in record["error"]
    assert "Traceback" not in record["error"] and "result" not in record


@needs_mpi
def test_timeout_stops_every_process(tmp_path):
    marker = "9876543"                              # a step count no other process uses
    opts = options(steps=int(marker), timeout=1.5)
    record = run_program("lean", (16, 8, 4), 2, opts, str(tmp_path), "run0")
    assert not record["ok"] and record["error"].startswith("timed out after 1.5 s"), record
    assert wait_gone(marker) == []


# a parent whose child has a session of its own and ignores SIGTERM: what mpirun's ranks can be
_TREE = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                          "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_tree_reaches_other_sessions_and_kills_what_ignores_sigterm():
    proc = subprocess.Popen([PY, "-c", _TREE], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    child = None
    try:
        assert select.select([proc.stdout], [], [], 30)[0], "the child never started"
        child = int(proc.stdout.readline())
        assert descendants(proc.pid) == [child]
        stop_tree(proc, grace=0.5)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.wait(timeout=10) == -signal.SIGTERM and not alive(child)
    finally:
        kill_tree(proc)
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
        proc.stdout.close()


# --- the whole command: one real run, Ctrl-C, the script -----------------------------------

EXPECTED = [p for p in PROGRAMS if p != "torch" or HAS_TORCH]   # the first repeat's order


@pytest.fixture(scope="module")
def report():
    if MPIRUN is None:
        pytest.skip("no mpirun/mpiexec found (pip install mpich)")
    r = run(bench_cmd("--ranks", "1", "--repeats", "1", "--json"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout), r.stderr


def test_every_program_ran_once_with_a_rate(report):
    doc, stderr = report
    runs = doc["runs"]
    assert [r["program"] for r in runs] == EXPECTED
    for r in runs:
        assert r["ok"] and r["returncode"] == 0, r
        assert r["layers"] == [16, 8, 4] and r["ranks"] == 1 and r["repeat"] == 0
        assert math.isfinite(r["samples_per_second"]) and r["samples_per_second"] > 0
    assert doc["failed_runs"] == 0
    assert doc["skipped"] == ({} if HAS_TORCH else {"torch": TORCH_NOTE})
    progress = [ln for ln in stderr.splitlines() if ln.startswith("ddp-bench: [")]
    assert len(progress) == len(runs)


def test_each_program_is_read_as_documented(report):
    doc, _ = report
    by = {r["program"]: r for r in doc["runs"]}
    n = max(1, doc["machine"]["cores"])
    for r in by.values():
        assert r["threads_per_rank_env"] == n and f"--threads {n}" in r["command"]
    assert 0 <= by["ddp"]["result"]["allreduce_fraction"] <= 1
    assert by["ddp"]["gemm_flops_per_second"] == pytest.approx(
        GEMM_FLOPS * by["ddp"]["samples_per_second"] / 32, rel=1e-12)
    assert by["zmq"]["result"]["bytes_per_step"] > 0
    assert by["sgemm"]["result"]["gemm_flops_per_step"] == GEMM_FLOPS
    assert by["sgemm"]["flops_per_second"] > 0 and by["sgemm"]["result"]["flops_per_second_1thread"] > 0
    assert by["sgemm"]["result"]["threads_per_rank"] == n
    # what BLAS reports inside the lean loops and ddp-train, given the same count
    assert by["limit"]["result"]["threads_per_rank"] == by["lean"]["result"]["threads_per_rank"] \
        == by["ddp"]["result"]["threads_per_rank"]
    (combo,) = doc["combinations"]
    assert combo["gemm_flops_per_step"] == GEMM_FLOPS and GEMM_RATIO in combo["ratios"]


def test_machine_and_options_recorded(report):
    doc, _ = report
    m = doc["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["python"] and m["numpy"]
    assert m["mpi"] and isinstance(m["blas"], list)
    assert (m["torch"] is not None) == HAS_TORCH
    opts = doc["options"]
    assert opts["ranks"] == [1] and opts["layers"] == [[16, 8, 4]] and opts["batch"] == 32
    assert opts["programs"] == list(PROGRAMS) and opts["threads"] is None


def test_table_of_a_real_run(report):
    doc, _ = report
    lines = format_table(doc).splitlines()
    assert lines[0].startswith(f"ddp-bench {doc['version']}: ") and "median of 1 runs" in lines[0]
    header = row_of(lines, "| layers | ranks |")
    row = dict(zip(header, row_of(lines, "| 16,8,4 | 1 |"), strict=True))
    for program in ("limit", "lean", "ddp", "zmq"):
        assert row[program].replace(",", "").isdigit(), row
    assert (row["torch"] == "skipped") == (not HAS_TORCH)
    assert all(math.isfinite(float(row[name])) for name in ("ddp/limit", "ddp/lean", "zmq/ddp"))
    assert any(ln.startswith("| 16,8,4 | 2.25e-05 |") for ln in lines)   # the GEMM table
    assert any(ln.startswith("zmq bytes per step (sent + received by the coordinator): 16,8,4 ×1 ")
               for ln in lines)
    assert lines[-1] == machine_line(doc["machine"])


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
    orders = [rotated(items, k) for k in range(len(items))]
    for slot in range(len(items)):
        assert sorted(order[slot] for order in orders) == sorted(items)
    assert rotated(items, 5) == rotated(items, 1) and rotated([], 3) == []


def test_ratio_stats_pairs_by_repeat():
    s = ratio_stats({0: 10.0, 1: 30.0, 2: 20.0}, {0: 20.0, 2: 10.0, 3: 5.0})
    assert s["pairs"] == [0.5, 2.0]                 # repeats 0 and 2 only
    assert s["pairwise"] == 1.25
    assert s["of_medians"] == 20.0 / 10.0
    assert ratio_stats({}, {0: 1.0}) == {"of_medians": None, "pairwise": None, "pairs": []}


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
