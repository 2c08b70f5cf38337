"""What an operator reads and finds: timestamped log lines, --quiet, no numpy noise
before the project's own error, file modes that follow the umask, and ddp-predict
saying where its output went."""
import os
import stat
from datetime import datetime

import numpy as np
import pytest

from helpers import PY, STAMP, one_error_line, run, train
from inproc import predict_here, train_here


def _log_lines(stderr: str) -> list[str]:
    """The lines that begin an entry (a multi-line entry's continuation is indented)."""
    return [ln for ln in stderr.splitlines() if ln and not ln.startswith("  ")]


def test_every_log_line_starts_with_an_iso_time(tmp_path):
    before = datetime.now().astimezone()
    r = train(["--steps", "40", "--log-every", "10", "--checkpoint-dir", str(tmp_path / "ck"),
               "--checkpoint-every", "20", "--eval-every", "10"], n=2)
    after = datetime.now().astimezone()
    assert r.returncode == 0, r.stderr
    lines = _log_lines(r.stderr)
    assert any("step 40/40" in ln for ln in lines) and any("checkpoint" in ln for ln in lines)
    assert any("warning: --eval-every" in ln for ln in lines)
    for line in lines:
        m = STAMP.match(line)
        assert m, line
        t = datetime.fromisoformat(m.group(0).strip())
        assert before.replace(microsecond=0) <= t <= after, line  # the time it was written
    # the summary on stdout is the result, not a log line
    assert r.stdout.startswith("done: 40 steps on 2 ranks")


def test_error_lines_carry_the_time_too(tmp_path):
    r = train_here(["--steps", "0"])
    assert r.returncode == 2
    assert STAMP.match(r.stderr) and one_error_line(r.stderr).startswith("ddp-train: error: --steps")


@pytest.mark.parametrize("n", [None, 2])
def test_quiet_prints_errors_and_the_final_line_only(tmp_path, n):
    args = ["--steps", "30", "--log-every", "5", "--samples", "20", "--eval-every", "5",
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "10", "--quiet"]
    launch = train_here if n is None else lambda a: train(a, n=n)  # ranks need mpirun
    r = launch(args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not the config, the log lines, the checkpoint lines or the warning
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith("done: 30 steps")
    r = launch(["--quiet", "--lr", "1e30", "--steps", "30"])
    assert r.returncode == 3
    assert "loss became" in one_error_line(r.stderr)


def test_quiet_is_a_config_key_too(tmp_path):
    (tmp_path / "run.toml").write_text("steps = 5\nquiet = true\n")
    r = train_here(["--config", str(tmp_path / "run.toml")])
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_coordinator_quiet(tmp_path):
    from helpers import free_port
    cmd = [PY, "-m", "ddp", "coordinator", "--bind", f"tcp://127.0.0.1:{free_port()}", "--workers", "1",
           "--steps", "20", "--metrics-port", "0", "--quiet"]
    r = run(cmd, timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.startswith("done: 20 steps on 1 worker")


@pytest.mark.parametrize("backend", [["--backend", "zmq", "--workers", "1"], []],
                         ids=["zmq", "mpirun -n 2"])
def test_a_diverging_run_logs_only_the_projects_lines(backend):
    """Huge steps overflow in the products of the workers before the loss turns Inf:
    numpy's RuntimeWarnings must not reach the log ahead of the project's error."""
    # processes of their own: in this one pytest records warnings instead of printing them,
    # and a warning shown once is not shown again, so their absence would prove nothing
    args = ["--lr", "1e20", "--activation", "tanh", "--loss", "mse", "--steps", "200", *backend]
    r = train(args, n=None if backend else 2)
    assert r.returncode == 3, r.stderr
    assert "RuntimeWarning" not in r.stderr and "Warning:" not in r.stderr, r.stderr
    assert "loss became" in one_error_line(r.stderr)
    for line in _log_lines(r.stderr):  # every entry is one of ours, with its time
        assert STAMP.match(line), line


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask_like_any_other_file(tmp_path, umask):
    """mkstemp's 0600 made models unreadable to colleagues on a cluster."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--steps", "10", "--output", str(out / "m.npz"), "--summary-json", str(out / "s.json"),
            "--checkpoint-dir", str(out / "ck"), "--checkpoint-every", "5"]
    if umask == 0o002:  # one umask set by a process of its own, as a user's shell sets it
        code = (f"import os, sys; os.umask({umask:#o})\n"
                f"from ddp.cli import run_train\nsys.exit(run_train({args!r}))")
        r = run([PY, "-c", code])
    else:
        old = os.umask(umask)
        try:
            r = train_here(args)
        finally:
            os.umask(old)
    assert r.returncode == 0, r.stderr
    expected = 0o666 & ~umask
    files = [out / "m.npz", out / "s.json", *sorted((out / "ck").glob("ckpt-*.npz"))]
    assert len(files) == 4
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == expected, (f, oct(os.stat(f).st_mode))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.fixture
def model_and_unlabelled(tmp_path):
    r = train_here(["--steps", "5", "--output", str(tmp_path / "m.npz")])
    assert r.returncode == 0, r.stderr
    np.savez(tmp_path / "u.npz", X=np.random.default_rng(1).standard_normal((6, 2)))
    return tmp_path / "m.npz", tmp_path / "u.npz"


def test_predict_says_where_its_default_output_went_and_never_replaces_it(tmp_path, model_and_unlabelled):
    model, data = model_and_unlabelled
    work = tmp_path / "work"
    work.mkdir()
    r = predict_here(["--model", str(model), "--data", str(data)], cwd=work)
    assert r.returncode == 0, r.stderr
    target = work / "predictions.npy"
    assert f"written to {target} (no --output given)" in r.stdout
    first = target.read_bytes()
    r = predict_here(["--model", str(model), "--data", str(data)], cwd=work)
    assert r.returncode == 2
    assert "predictions.npy, which exists; give --output" in one_error_line(r.stderr, "ddp-predict")
    assert target.read_bytes() == first
    r = predict_here(["--model", str(model), "--data", str(data), "--output", str(work / "p")], cwd=work)
    assert r.returncode == 0 and f"written to {work / 'p.npy'}" in r.stdout, r.stdout + r.stderr
    assert np.load(work / "p.npy").shape == (6,)


@pytest.mark.parametrize("target", ["link", "fifo", "missing-dir"])
def test_predict_output_that_is_not_a_file_is_refused_and_left_alone(tmp_path, model_and_unlabelled, target):
    """ddp-predict writes by an atomic rename too: it must not replace a link or a node."""
    model, data = model_and_unlabelled
    real = tmp_path / "real.npy"
    real.write_bytes(b"keep")
    path = tmp_path / "out.npy"
    if target == "link":
        path.symlink_to(real)
    elif target == "fifo":
        os.mkfifo(path)
    else:
        path = tmp_path / "nowhere" / "out.npy"
    r = predict_here(["--model", str(model), "--data", str(data), "--output", str(path)])
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r.stderr, "ddp-predict")
    assert {"link": "symbolic link", "fifo": "named pipe", "missing-dir": "does not exist"}[target] in line
    assert real.read_bytes() == b"keep"
    if target == "link":
        assert path.is_symlink()
    if target == "fifo":
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
