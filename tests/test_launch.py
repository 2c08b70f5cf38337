"""What users meet first: launchers (srun without an MPI plugin), BLAS threads chosen
from the flags and the environment, and hosts with more ranks than cores."""
import os
import shutil

import numpy as np
import pytest

from helpers import _env, load_model, one_error_line, read_json, run, train, train_cmd
from ddp.threads import choose_threads, host_cores
from inproc import train_here

# what srun exports to each of the tasks of a job step
SRUN_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
             "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"}


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.mark.parametrize("procid", ["0", "1"])
def test_srun_without_mpi_plugin_refuses_before_writing_anything(tmp_path, procid):
    """Without --mpi=pmi2 srun starts N one-rank jobs; each must refuse, not train alone."""
    env = dict(_env(), **SRUN_TASK, SLURM_PROCID=procid)
    out = ["--checkpoint-dir", str(tmp_path / "ck"), "--output", str(tmp_path / "m.npz"),
           "--summary-json", str(tmp_path / "s.json"), "--log-jsonl", str(tmp_path / "r.jsonl"),
           "--steps", "5"]
    r = run(train_cmd(out), env=env, timeout=60)  # a process of its own: make_comm starts MPI
    assert r.returncode == 2, r.stderr
    if procid == "0":  # one task speaks for the step, as rank 0 would
        line = one_error_line(r.stderr)
        assert "srun started 2 tasks" in line and "--mpi=pmi2" in line and "--mpi=pmix" in line
    else:
        assert "error" not in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


def test_a_batch_script_itself_is_one_process_and_trains(tmp_path):
    """The batch step sees SLURM_NTASKS and SLURM_PROCID too, but srun did not start it."""
    env = dict(_env(), SLURM_JOB_ID="77", SLURM_NTASKS="8", SLURM_PROCID="0")
    # a process of its own: the run asks MPI for its world, which this process must not start
    r = run(train_cmd(["--steps", "5", "--output", str(tmp_path / "m.npz")]), env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.npz").exists()


def test_zmq_backend_under_srun_is_refused(tmp_path, monkeypatch):
    for var, value in dict(SRUN_TASK, SLURM_PROCID="0").items():
        monkeypatch.setenv(var, value)
    r = train_here(["--backend", "zmq", "--workers", "1", "--steps", "5"])  # refused before MPI or zmq
    assert r.returncode == 2
    assert "without mpirun or srun" in one_error_line(r.stderr)


@pytest.mark.parametrize("threads,env,local,expected,source", [
    (3, {"OMP_NUM_THREADS": "1"}, 1, 3, "--threads"),
    (None, {"OMP_NUM_THREADS": "1"}, 1, 1, "OMP_NUM_THREADS=1"),
    (None, {"OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "5"}, 4, 2, "OPENBLAS_NUM_THREADS=2"),
    (None, {"MKL_NUM_THREADS": "5"}, 4, 5, "MKL_NUM_THREADS=5"),
    (None, {"OMP_NUM_THREADS": "3,1"}, 1, 3, "OMP_NUM_THREADS=3,1"),  # nested levels: the outer one
    (None, {}, 1, None, "cores ÷ 1 rank on this host"),
    (None, {"OMP_NUM_THREADS": "zero", "OPENBLAS_NUM_THREADS": "0"}, 2, None, "cores ÷ 2 ranks"),
])
def test_thread_count_follows_flag_then_environment_then_cores(threads, env, local, expected, source):
    n, why, ignored = choose_threads(threads, local, env)
    assert source in why
    assert n == (expected if expected is not None else max(1, host_cores() // local))
    assert len(ignored) == sum(1 for v in env.values() if v in ("zero", "0"))


def test_start_up_line_says_which_rule_chose_the_threads(tmp_path, monkeypatch):
    s = tmp_path / "s.json"
    args = ["--steps", "2", "--summary-json", str(s)]
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = train_here(args)  # BLAS threads are put back when it returns (inproc.isolated)
    assert r.returncode == 0, r.stderr
    assert "1 BLAS thread each (OMP_NUM_THREADS=1)" in r.stderr
    assert read_json(s)["threads_per_rank"] == 1
    r = train_here(args + ["--threads", "2"])
    assert r.returncode == 0 and "2 BLAS threads each (--threads)" in r.stderr, r.stderr
    assert read_json(s)["threads_per_rank"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    r = train_here(args)
    assert r.returncode == 0, r.stderr
    assert "OMP_NUM_THREADS='lots' is not a positive number of threads; ignored" in r.stderr
    assert f"({host_cores()} cores ÷ 1 rank on this host)" in r.stderr
    assert read_json(s)["threads_per_rank"] == host_cores()


def _pinned(cmd: list[str]) -> list[str]:
    """Run on one core, so that two ranks oversubscribe whatever the machine."""
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("no taskset (util-linux) to pin the ranks to one core")
    return [taskset, "-c", str(min(os.sched_getaffinity(0))), *cmd]


PINNED = ["--data", "spiral", "--samples", "30", "--layers", "2,16,3", "--batch-size", "9",
          "--steps", "30", "--dtype", "float64", "--momentum", "0.5"]


@pytest.fixture(scope="module")
def one_rank_on_one_core(tmp_path_factory) -> dict[str, np.ndarray]:
    """The one-process model of PINNED, the same for every exchange: trained once."""
    one = tmp_path_factory.mktemp("one-core") / "one.npz"
    # a process of its own, pinned: the check that one rank on one core does not warn
    ref = run(_pinned(train_cmd(PINNED + ["--output", str(one)])))
    assert ref.returncode == 0, ref.stderr
    assert "share" not in ref.stderr  # one rank on one core is not oversubscribed
    return load_model(one)


@pytest.mark.parametrize("exchange", [["--exchange", "shared"],
                                      ["--exchange", "allreduce", "--bucket-mb", "0"],
                                      ["--exchange", "allreduce", "--bucket-mb", "0.0001"]])
def test_oversubscribed_ranks_warn_once_and_stay_exact(tmp_path, exchange, one_rank_on_one_core):
    """Two ranks on one core: rank 0 says so once; ranks that wait yield, and the result
    is still the one-process result."""
    r = run(_pinned(train_cmd(PINNED + exchange + ["--output", str(tmp_path / "two.npz")], n=2)))
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "ranks share" in ln]
    assert len(warnings) == 1 and "2 ranks share 1 core on this host" in warnings[0], r.stderr
    a, b = one_rank_on_one_core, load_model(tmp_path / "two.npz")
    for k in ("W0", "b0", "W1", "b1"):
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-10, err_msg=k)


def test_ranks_with_a_core_each_do_not_warn(tmp_path):
    if host_cores() < 2:
        pytest.skip("needs two cores")
    r = train(["--steps", "5"], n=2)
    assert r.returncode == 0, r.stderr
    assert "ranks share" not in r.stderr


# --- a dependency that is not installed (a cluster install that left one out) ----------

def _without(module: str, main: str, args: list[str]) -> list[str]:
    """Run `main(args)` in a Python where importing `module` fails, as when not installed.
    A fresh interpreter: in this one the package is imported already, by modules that
    keep their reference to it."""
    from helpers import PY
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from ddp.cli import {main}; sys.exit({main}({args!r}))")
    return [PY, "-c", code]


@pytest.mark.parametrize("module,main,args,fragment", [
    ("prometheus_client", "run_train", ["--steps", "3", "--metrics-port", "{port}"],
     "--metrics-port needs the Python package prometheus-client, which is not installed: "
     "pip install prometheus-client"),
    ("prometheus_client", "run_train", ["--steps", "3", "--pushgateway", "http://127.0.0.1:{port}"],
     "--pushgateway needs the Python package prometheus-client"),
    ("zmq", "run_train", ["--steps", "3", "--backend", "zmq", "--workers", "1"],
     "the Python package pyzmq is not installed: pip install pyzmq"),
    ("zmq", "run_worker", ["--connect", "tcp://127.0.0.1:{port}"], "pip install pyzmq"),
])
def test_a_missing_package_is_one_line_before_training(tmp_path, module, main, args, fragment):
    from helpers import free_port
    port = str(free_port())
    args = [a.replace("{port}", port) for a in args] + (
        ["--output", str(tmp_path / "m.npz")] if main == "run_train" else [])
    r = run(_without(module, main, args), timeout=60)
    assert r.returncode == 2, r.stderr
    assert fragment in one_error_line(r.stderr, "ddp-worker" if main == "run_worker" else "ddp-train")
    assert not (tmp_path / "m.npz").exists()  # refused at start, not after training


def test_the_coordinators_default_metrics_port_without_prometheus_client_only_warns(tmp_path):
    from helpers import free_port
    args = ["--bind", f"tcp://127.0.0.1:{free_port()}", "--workers", "1", "--steps", "3"]
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            f"from ddp.cli import run_train; sys.exit(run_train({args!r}, prog='ddp-coordinator'))")
    from helpers import PY
    r = run([PY, "-c", code], timeout=90)
    assert r.returncode == 0, r.stderr
    assert "pip install prometheus-client; serving no metrics" in r.stderr


def test_the_cluster_install_line_lists_every_dependency_but_mpi():
    """README's 'Using a cluster's own MPI' installs the package without its MPI: every
    other dependency of pyproject.toml must be on that line, and no MPI."""
    import re
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~; ]", d, maxsplit=1)[0].lower() for d in deps}
    readme = (root / "README.md").read_text()
    section = readme.split("### Using a cluster's own MPI", 1)[1].split("\n#", 1)[0]
    line = next(ln for ln in section.splitlines() if "pip install --no-deps ." in ln)
    listed = set(line.split("pip install --no-deps . && pip install", 1)[1].split("#")[0].split())
    assert listed == names - {"mpich", "mpi4py"}, line
