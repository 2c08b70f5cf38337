"""Checkpoints: atomic, verified, resumable; signals and divergence stop cleanly."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import (_env, alive, kill_tree, load_model, one_error_line, rank_pids, train,
                      train_cmd, unstamped)
from ddp import checkpoint as ckpt
from ddp.model import Layout
from inproc import train_here

BASE = ["--data", "spiral", "--samples", "40", "--layers", "2,16,3", "--batch-size", "16",
        "--dtype", "float64", "--checkpoint-every", "10"]


def _params(path):
    m = load_model(path)
    return {k: v for k, v in m.items() if k != "config"}


def _assert_same(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    ref = train_here(BASE + ["--steps", "30", "--output", str(tmp_path / "ref.npz")])
    assert ref.returncode == 0, ref.stderr
    d = str(tmp_path / "ck")
    first = train_here(BASE + ["--steps", "20", "--checkpoint-dir", d])
    assert first.returncode == 0, first.stderr
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [20, 10]
    second = train(BASE + ["--steps", "30", "--checkpoint-dir", d, "--output", str(tmp_path / "res.npz")],
                   n=2)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and "step 20" in second.stderr
    _assert_same(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz"), atol=1e-10)


def test_only_the_last_three_are_kept_and_a_corrupt_one_is_skipped(tmp_path):
    d = str(tmp_path / "ck")
    r = train_here(BASE + ["--steps", "50", "--checkpoint-dir", d])
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [50, 40, 30]
    assert not [n for n in os.listdir(d) if n.startswith(".tmp")]
    newest = ckpt.checkpoint_path(d, 50)
    blob = open(newest, "rb").read()
    open(newest, "wb").write(blob[: len(blob) // 2])          # a partial write
    middle = ckpt.checkpoint_path(d, 40)
    data = dict(np.load(middle, allow_pickle=False))
    data["params"] = data["params"] + 1e-3                     # silent corruption: checksum catches it
    np.savez(middle, **data)
    ref = train_here(BASE + ["--steps", "60", "--output", str(tmp_path / "ref.npz")])
    assert ref.returncode == 0, ref.stderr
    res = train_here(BASE + ["--steps", "60", "--checkpoint-dir", d, "--output", str(tmp_path / "res.npz")])
    assert res.returncode == 0, res.stderr
    assert "skipping checkpoint" in res.stderr and "ckpt-00000050" in res.stderr
    assert "checksum mismatch" in res.stderr
    assert "resuming from" in res.stderr and "ckpt-00000030" in res.stderr
    _assert_same(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz"))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    d = str(tmp_path / "ck")
    assert train_here(BASE + ["--steps", "10", "--checkpoint-dir", d]).returncode == 0
    other = BASE[:] + ["--steps", "20", "--checkpoint-dir", d]
    other[other.index("2,16,3")] = "2,32,3"
    r = train_here(other)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "layers" in line and "--no-resume" in line
    fresh = train_here(other + ["--no-resume"])
    assert fresh.returncode == 0, fresh.stderr


def test_nan_loss_stops_every_rank_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    d = str(tmp_path / "ck")
    r = train(["--data", "spiral", "--lr", "1e30", "--momentum", "0", "--steps", "50",
               "--checkpoint-dir", d, "--checkpoint-every", "1"], n=2)
    assert r.returncode == 3, r.stderr
    line = one_error_line(r.stderr)
    assert "at step" in line and "--lr" in line
    bad_step = int(line.split("at step ")[1].split()[0])
    kept = ckpt.list_checkpoints(d)
    assert kept and kept[0][0] == bad_step - 1
    good = ckpt.read_checkpoint(kept[0][1])  # verifies its checksum
    assert good.params.size == Layout((2, 100, 3)).size and np.isfinite(good.params).all()


def _pids_of_rank(root: int, rank: int) -> list[int]:
    """The rank's python process among root's descendants."""
    pid = rank_pids(root).get(rank)
    return [] if pid is None else [pid]


def _signalled_run(checkpoint_dir, output) -> list[str]:
    return ["--data", "spiral", "--layers", "2,128,128,3", "--dtype", "float64", "--steps", "3000",
            "--checkpoint-every", "100000", "--log-every", "1", "--progress", "never",
            "--checkpoint-dir", str(checkpoint_dir), "--output", str(output)]


@pytest.fixture(scope="module")
def uninterrupted_signalled_run(tmp_path_factory) -> dict[str, np.ndarray]:
    """The parameters the signalled run ends with if no signal comes: one run of 2 ranks
    for every signal and target."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ref = train(_signalled_run(tmp / "ck", tmp / "ref.npz"), n=2, timeout=120)
    assert ref.returncode == 0, ref.stderr
    return _params(tmp / "ref.npz")


@pytest.mark.parametrize("target,sig", [("mpirun", signal.SIGTERM), ("rank0", signal.SIGINT)])
def test_signal_checkpoints_exits_cleanly_and_the_same_command_resumes(tmp_path, target, sig,
                                                                        uninterrupted_signalled_run):
    d = str(tmp_path / "ck")
    args = _signalled_run(d, tmp_path / "res.npz")
    proc = subprocess.Popen(train_cmd(args, n=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # wait until training is under way
            if unstamped(line).startswith("step 20/") or time.monotonic() > deadline:
                break
        if target == "mpirun":
            proc.send_signal(sig)
        else:
            pids = _pids_of_rank(proc.pid, 0)
            assert len(pids) == 1, pids
            os.kill(pids[0], sig)
        rest_err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
    assert proc.returncode == 128 + sig, rest_err
    assert "interrupted by" in rest_err and "run the same command to resume" in rest_err
    assert "Traceback" not in rest_err
    steps = [s for s, _ in ckpt.list_checkpoints(d)]
    assert len(steps) == 1 and 20 <= steps[0] < 3000
    assert not os.path.exists(tmp_path / "res.npz")  # an interrupted run writes no model

    resumed = train(args, n=2, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    _assert_same(_params(tmp_path / "res.npz"), uninterrupted_signalled_run)


def test_unwritable_outputs_are_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = (("--output", str(blocker / "m.npz")), ("--checkpoint-dir", str(blocker / "ck")),
             ("--summary-json", "/proc/summary.json"))
    # every rank validates the flags alike (ddp.config): one of them under mpirun shows
    # that the ranks agree on one error line; each flag's check needs no process of its own
    runs = [(flag, train(["--steps", "3", flag, value], n=2)) for flag, value in cases[:1]]
    runs += [(flag, train_here(["--steps", "3", flag, value])) for flag, value in cases]
    for flag, r in runs:
        assert r.returncode == 2, r.stderr
        assert flag in one_error_line(r.stderr)
        assert "step 1/" not in r.stderr  # refused before the first step


def test_a_rank_killed_mid_run_ends_the_whole_job(tmp_path):
    args = ["--data", "spiral", "--layers", "2,128,128,3", "--steps", "100000", "--log-every", "1",
            "--progress", "never"]
    proc = subprocess.Popen(train_cmd(args, n=3), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        for line in proc.stderr:
            if unstamped(line).startswith("step 20/"):
                break
        ranks = [p for r in (0, 1, 2) for p in _pids_of_rank(proc.pid, r)]
        assert len(ranks) == 3
        os.kill(_pids_of_rank(proc.pid, 1)[0], signal.SIGKILL)
        proc.stderr.read()
        proc.wait(timeout=60)  # no rank is left waiting in the Allreduce
        assert proc.returncode != 0
        time.sleep(0.5)
        assert not [p for p in ranks if alive(p)]
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
