"""Paths that name something other than a regular file (issue 12, items 5 and 6).

Inputs: a named pipe blocks whoever opens it until a writer comes, so every file flag
refuses anything that is not a regular file, before opening it, with one line and
exit 2. Outputs are replaced by an atomic rename, which would put a regular file in
place of a device node, a FIFO or a symlink, so an existing target must be a regular
file. Every command runs with a timeout: a regression fails instead of hanging.

The checks need no process of their own, so most commands run in the test process
(`train_in`, `predict_in`, `call_in`); one case of inputs and one of outputs run the
real command, and so do the coordinator's keys and the signal.
"""
from __future__ import annotations

import os
import signal
import stat

import pytest

from helpers import PY, Result, expect_error, run, train
from inproc import call, deadline, predict_here, train_here
from zmq_helpers import procs  # noqa: F401 (fixture)

TIMEOUT = 60


def call_in(main, argv: list) -> Result:
    """One of ddp.cli's run_* functions in this process, within a time limit."""
    with deadline(TIMEOUT):
        return call(main, argv)


@pytest.fixture
def fifo(tmp_path):
    def make(name: str) -> str:
        path = tmp_path / name
        os.mkfifo(path)
        return str(path)
    return make


# --- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,name", [("--data", "d.npz"), ("--data", "d.csv"), ("--val-data", "v.npz"),
                                       ("--config", "c.toml"), ("--init", "i.npz")])
def test_train_refuses_a_fifo_input(fifo, flag, name):
    path = fifo(name)
    res = train_here([flag, path, "--steps", "1"])
    expect_error(res, "ddp-train", f"{flag} {path}", "named pipe")


def test_train_refuses_a_fifo_input_through_the_real_command(fifo):
    """One case above in a process of its own: exit 2 and one line from the real command."""
    path = fifo("d.npz")
    res = train(["--data", path, "--steps", "1"], timeout=TIMEOUT)
    expect_error(res, "ddp-train", f"--data {path}", "named pipe")


@pytest.mark.parametrize("flag", ["--data", "--init"])
def test_train_refuses_a_directory_input(tmp_path, flag):
    d = tmp_path / "dir.npz"
    d.mkdir()
    res = train_here([flag, str(d), "--steps", "1"])
    expect_error(res, "ddp-train", f"{flag} {d}", "directory")


def test_train_reads_through_a_symlink_to_a_regular_file(tmp_path, classification_npz):
    link = tmp_path / "link.npz"
    link.symlink_to(classification_npz)
    res = train_here(["--data", str(link), "--steps", "2"])
    assert res.returncode == 0, res.stderr


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.npz"
    res = train_here(["--steps", "2", "--output", str(path)])
    assert res.returncode == 0, res.stderr
    return path


@pytest.mark.parametrize("which", ["--model", "--data npz", "--data csv"])
def test_predict_refuses_a_fifo(model_file, fifo, which):
    if which == "--model":
        path = fifo("m.npz")
        args = ["--model", path, "--data", "spiral"]
    else:
        path = fifo("d." + which.split()[1])
        args = ["--model", str(model_file), "--data", path]
    res = predict_here(args)
    expect_error(res, "ddp-predict", f"{which.split()[0]} {path}", "named pipe")


@pytest.fixture
def keydir(tmp_path):
    from ddp.cli import run_keygen

    res = call_in(run_keygen, [str(tmp_path / "keys")])
    assert res.returncode == 0, res.stderr
    return tmp_path / "keys"


@pytest.mark.parametrize("which", ["--curve-secret", "--server-key"])
def test_worker_key_fifo_says_what_it_is(keydir, fifo, which):
    path = fifo("k.key")
    keys = {"--curve-secret": str(keydir / "worker.key_secret"),
            "--server-key": str(keydir / "coordinator.key"), which: path}
    from ddp.cli import run_worker

    res = call_in(run_worker, ["--connect", "tcp://127.0.0.1:1", "--retry-for", "1",
                               "--curve-secret", keys["--curve-secret"],
                               "--server-key", keys["--server-key"]])
    line = expect_error(res, "ddp-worker", f"{which} {path}", "named pipe")
    assert "no such file" not in line


@pytest.mark.parametrize("which", ["--curve-secret", "--authorized-keys"])
def test_coordinator_key_fifo_says_what_it_is(keydir, tmp_path, fifo, which):
    secret, authorized = str(keydir / "coordinator.key_secret"), keydir / "authorized"
    if which == "--curve-secret":
        secret = path = fifo("c.key_secret")
    else:  # a FIFO among the authorized public keys
        path = str(authorized / "intruder.key")
        os.mkfifo(path)
    # a real process: code that regressed would bind and serve, which only a process ends
    res = run([PY, "-m", "ddp", "coordinator", "--bind", "tcp://127.0.0.1:1", "--steps", "1",
               "--curve-secret", secret, "--authorized-keys", str(authorized)], timeout=TIMEOUT)
    expect_error(res, "ddp-coordinator", path, "named pipe")


# --- signals before training --------------------------------------------------------------


def test_sigterm_while_blocked_before_training_ends_the_run(tmp_path, procs):  # noqa: F811
    """A named pipe where a checkpoint should be blocks the resume scan, after the signal
    handler is installed: the first SIGTERM must end the process (it set a flag and the
    blocked open() went on waiting, before)."""
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    os.mkfifo(ckdir / "ckpt-00000500.npz")
    p = procs.start([PY, "-m", "ddp", "train", "--checkpoint-dir", str(ckdir), "--steps", "1000000"])
    p.wait_for("resolved config", timeout=TIMEOUT)
    # past the log line the handler is installed; the scan of the directory comes after it
    os.kill(p.pid, signal.SIGTERM)
    code = p.wait(timeout=TIMEOUT)
    assert code == 128 + signal.SIGTERM, p.stderr
    assert "Traceback" not in p.stderr
    assert "interrupted by SIGTERM" in p.stderr, p.stderr


def test_stop_request_raises_before_defer_and_waits_after():
    from ddp.signals import Interrupted, StopRequest

    stop = StopRequest()
    stop.install()
    try:
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a point where Python runs the handler
        assert err.value.signum == signal.SIGTERM
        stop.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    finally:
        stop.restore()


# --- output targets -----------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_output_device_node_is_refused_and_left_alone(tmp_path):
    """A null device node of our own in tmp_path, not /dev/null: code that regressed would
    replace the real /dev/null of the machine (as root), which is what this guards against."""
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    res = train_here(["--steps", "2", "--output", str(node)])
    expect_error(res, "ddp-train", f"--output {node}", "character device")
    after = os.lstat(node)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == os.makedev(1, 3)
    assert "done:" not in res.stdout  # refused before training


def test_dev_null_is_refused_in_process():
    """/dev/null itself only through the check (no process that could replace it)."""
    from ddp.errors import UsageError
    from ddp.files import check_output_target

    with pytest.raises(UsageError, match="--output /dev/null: is a character device"):
        check_output_target("/dev/null", "--output")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("flag", ["--output", "--summary-json", "--log-jsonl"])
def test_output_fifo_is_refused(fifo, flag):
    path = fifo("out")
    res = train_here(["--steps", "2", flag, path])
    expect_error(res, "ddp-train", f"{flag} {path}", "named pipe")
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_output_fifo_is_refused_through_the_real_command(fifo):
    """One case above in a process of its own: exit 2 and one line from the real command."""
    path = fifo("out")
    res = train(["--steps", "2", "--output", path], timeout=TIMEOUT)
    expect_error(res, "ddp-train", f"--output {path}", "named pipe")
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


@pytest.mark.parametrize("flag", ["--output", "--summary-json", "--log-jsonl"])
def test_output_symlink_is_refused_and_kept(tmp_path, flag):
    target = tmp_path / "real"
    target.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    res = train_here(["--steps", "2", flag, str(link)])
    expect_error(res, "ddp-train", f"{flag} {link}", "symbolic link", str(target))
    assert link.is_symlink() and target.read_text() == "keep me"


def test_output_directory_is_refused_before_training(tmp_path):
    d = tmp_path / "model.npz"
    d.mkdir()
    res = train_here(["--steps", "2", "--output", str(d)])
    expect_error(res, "ddp-train", f"--output {d}", "directory")
    assert "done:" not in res.stdout
