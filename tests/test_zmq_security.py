"""Security and endpoint handling of the ZeroMQ backend, with real processes and sockets.

- ddp-keygen: what it writes (worker and client pairs), with which modes, that it never
  overwrites and that a name belongs to one role;
- CURVE end to end over tcp: an authorized worker trains to the same parameters as an
  undisturbed run, while a worker with an unknown key and a worker with no keys are
  turned away quickly, each with one error line;
- the bind policy (a non-loopback --bind needs CURVE or --insecure) and bad --bind,
  key and flag combinations: exit 2, one error line, no traceback;
- ddp-worker's own errors: a bad --connect, half a key pair, --retry-for, --status.

Every wait is bounded and every process is killed at the end (see zmq_helpers.procs).
"""
from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from helpers import BIN, PY, free_port, one_error_line, read_json, run
from inproc import call
from zmq_helpers import SMALL, max_param_diff, procs  # noqa: F401  (procs is a fixture)

from ddp import keys as keyfiles

EXIT_USAGE = 2
EXIT_UNREACHABLE = 5
STEPS = "30"


# --- helpers -------------------------------------------------------------------------


def cli(script: str, *args: str) -> list[str]:
    """The installed console script (ddp-keygen, ...), else `python -m ddp COMMAND`."""
    path = os.path.join(BIN, script)
    if os.access(path, os.X_OK):
        return [path, *args]
    return [PY, "-m", "ddp", script.removeprefix("ddp-"), *args]


def _show(res) -> str:
    return f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def expect_error(res, prog: str, *fragments: str, code: int = EXIT_USAGE) -> str:
    """The exit code, exactly one `<prog>: error` line, no traceback, and every fragment in it."""
    line = one_error_line(res.stderr, prog)
    assert res.returncode == code, _show(res)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the error line:\n{line}\n\n{_show(res)}"
    return line


def keygen(directory, *args: str):
    """ddp-keygen in this process (it needs no process of its own)."""
    from ddp.cli import run_keygen

    return call(run_keygen, [str(directory), *args])


def snapshot(directory) -> dict[str, tuple[bytes, int]]:
    """Every file under directory: (content, mode)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = (fh.read(), stat.S_IMODE(os.stat(path).st_mode))
    return out


@pytest.fixture
def keydir(tmp_path):
    d = tmp_path / "keys"
    res = keygen(d)
    assert res.returncode == 0, _show(res)
    return d


def coordinator(*args: str):
    """ddp-coordinator in this process, for what fails before it serves."""
    from ddp.cli import run_train

    return call(run_train, list(args), prog="ddp-coordinator")


def worker(*args: str):
    """ddp-worker in this process, for what fails (or answers) within seconds."""
    from ddp.cli import run_worker

    return call(run_worker, list(args))


# --- ddp-keygen ------------------------------------------------------------------------


def test_keygen_writes_key_pairs_private_and_never_overwrites(tmp_path):
    d = tmp_path / "keys"
    res = keygen(d)
    assert res.returncode == 0, _show(res)
    expected = {"coordinator.key", "coordinator.key_secret", "worker.key", "worker.key_secret",
                os.path.join("authorized", "worker.key")}
    files = snapshot(d)
    assert set(files) == expected, files.keys()
    for name, (_, mode) in files.items():
        if name.endswith(".key_secret"):
            assert mode == 0o600, f"{name}: mode {oct(mode)}"
    # the pairs belong together, the public files hold no secret, the two pairs differ
    c_pub, c_sec = keyfiles.read_keys(str(d / "coordinator.key_secret"), "test")
    w_pub, w_sec = keyfiles.read_keys(str(d / "worker.key_secret"), "test")
    assert c_sec and w_sec and c_pub != w_pub and c_sec != w_sec
    assert keyfiles.read_keys(str(d / "coordinator.key"), "test") == (c_pub, None)
    assert keyfiles.read_keys(str(d / "worker.key"), "test") == (w_pub, None)
    assert keyfiles.read_keys(str(d / "authorized" / "worker.key"), "test") == (w_pub, None)
    assert b"secret-key" not in files["worker.key"][0] + files["coordinator.key"][0]

    # again without --name: refused, nothing touched
    res = keygen(d)
    expect_error(res, "ddp-keygen", "exists")
    assert snapshot(d) == files

    # --name w2 adds a pair and its authorized public key; the rest stays as it was
    res = keygen(d, "--name", "w2")
    assert res.returncode == 0, _show(res)
    after = snapshot(d)
    assert set(after) == expected | {"w2.key", "w2.key_secret", os.path.join("authorized", "w2.key")}
    assert {k: v for k, v in after.items() if k in files} == files
    assert after["w2.key_secret"][1] == 0o600
    w2_pub, w2_sec = keyfiles.read_keys(str(d / "w2.key_secret"), "test")
    assert w2_sec and w2_pub not in (c_pub, w_pub)
    assert keyfiles.read_keys(str(d / "authorized" / "w2.key"), "test") == (w2_pub, None)

    # the same name twice: refused, nothing touched
    res = keygen(d, "--name", "w2")
    expect_error(res, "ddp-keygen", "exists")
    assert snapshot(d) == after


@pytest.mark.parametrize("name", ["../x", "coordinator", ""])
def test_keygen_bad_names(tmp_path, keydir, name):
    before = snapshot(tmp_path)
    res = keygen(keydir, f"--name={name}")
    expect_error(res, "ddp-keygen", "--name")
    assert snapshot(tmp_path) == before


def test_keygen_client_keys_beside_worker_keys(tmp_path):
    """--client writes a client pair and its public key in DIR/clients; with --name in the
    same call the worker pair goes to DIR/authorized; --client alone makes no worker pair."""
    d = tmp_path / "keys"
    res = keygen(d, "--client", "ops")
    assert res.returncode == 0, _show(res)
    first = snapshot(d)
    assert set(first) == {"coordinator.key", "coordinator.key_secret", "ops.key",
                          "ops.key_secret", os.path.join("clients", "ops.key")}
    assert first["ops.key_secret"][1] == 0o600
    assert not (d / "authorized").exists()
    ops_pub, ops_sec = keyfiles.read_keys(str(d / "ops.key_secret"), "test")
    c_pub, _ = keyfiles.read_keys(str(d / "coordinator.key_secret"), "test")
    assert ops_sec and ops_pub != c_pub
    assert keyfiles.read_keys(str(d / "clients" / "ops.key"), "test") == (ops_pub, None)
    assert keyfiles.authorized(str(d / "clients"), "--client-keys") == {ops_pub}

    res = keygen(d, "--name", "w1", "--client", "laptop", "--name", "w2")
    assert res.returncode == 0, _show(res)
    after = snapshot(d)
    added = {"w1.key", "w1.key_secret", "w2.key", "w2.key_secret", "laptop.key",
             "laptop.key_secret", os.path.join("authorized", "w1.key"),
             os.path.join("authorized", "w2.key"), os.path.join("clients", "laptop.key")}
    assert set(after) == set(first) | added
    assert {k: v for k, v in after.items() if k in first} == first   # the coordinator's kept
    workers = keyfiles.authorized(str(d / "authorized"))
    clients = keyfiles.authorized(str(d / "clients"), "--client-keys")
    assert len(workers) == 2 and len(clients) == 2 and not workers & clients
    assert keyfiles.read_keys(str(d / "w1.key_secret"), "test")[0] in workers
    assert keyfiles.read_keys(str(d / "laptop.key_secret"), "test")[0] in clients


@pytest.mark.parametrize("first, then, fragments", [
    (["--name", "gpu1"], ["--client", "gpu1"], ["--client gpu1", "is a worker's key"]),
    (["--client", "ops"], ["--name", "ops"], ["--name ops", "is a client's key"]),
    (["--client", "ops"], ["--client", "ops"], ["ops.key_secret exists", "--client"]),
    ([], ["--name", "x", "--client", "x"], ["--client x", "given twice"]),
    ([], ["--client", "a", "--client", "a"], ["--client a", "given twice"]),
    ([], ["--client", "coordinator"], ["--client coordinator", "reserved"]),
    ([], ["--client", "../x"], ["--client '../x'"]),
])
def test_keygen_a_name_is_one_role(tmp_path, first, then, fragments):
    """A name already used by the other role, or twice in one call, or reserved: one line,
    exit 2, and not a file written or changed."""
    d = tmp_path / "keys"
    if first:
        assert keygen(d, *first).returncode == 0
    before = snapshot(tmp_path)
    res = keygen(d, *then)
    expect_error(res, "ddp-keygen", *fragments)
    assert snapshot(tmp_path) == before


def test_keygen_client_name_of_a_removed_secret(tmp_path):
    """A client whose secret was moved off this host still owns its name: DIR/clients holds
    its public key, so a worker of that name is refused."""
    d = tmp_path / "keys"
    assert keygen(d, "--client", "ops").returncode == 0
    (d / "ops.key_secret").unlink()
    (d / "ops.key").unlink()
    before = snapshot(tmp_path)
    expect_error(keygen(d, "--name", "ops"), "ddp-keygen", "is a client's key")
    assert snapshot(tmp_path) == before


# --- CURVE end to end ------------------------------------------------------------------


def test_curve_job_turns_away_strangers_and_trains_exactly(tmp_path, procs):
    good, other = tmp_path / "good", tmp_path / "other"
    for d in (good, other):
        res = keygen(d)
        assert res.returncode == 0, _show(res)
    ref = run([PY, "-m", "ddp", "train", *SMALL, "--steps", STEPS, "--output", str(tmp_path / "ref.npz")],
              timeout=60)
    assert ref.returncode == 0, _show(ref)

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord = procs.coordinator(endpoint, [
        "--curve-secret", str(good / "coordinator.key_secret"),
        "--authorized-keys", str(good / "authorized"), "--min-workers", "1",
        "--output", str(tmp_path / "out.npz"), "--summary-json", str(tmp_path / "s.json"),
        *SMALL, "--steps", STEPS])
    coord.wait_for(r"coordinator: job \S+ on tcp://127\.0\.0\.1:\d+ \(CURVE\)", timeout=30)

    # The strangers try at once while the coordinator waits for its worker. They are
    # started (and must be gone) before the authorized worker, so that the coordinator
    # cannot have finished before their handshakes: the outcome does not depend on timing.
    stranger = procs.worker(endpoint, ["--curve-secret", str(other / "worker.key_secret"),
                                       "--server-key", str(good / "coordinator.key")])
    keyless = procs.worker(endpoint)
    # a worker of ours that was given another coordinator's public key
    misled = procs.worker(endpoint, ["--curve-secret", str(good / "worker.key_secret"),
                                     "--server-key", str(other / "coordinator.key")])
    assert stranger.wait(timeout=20) == EXIT_USAGE, stranger.stderr
    assert keyless.wait(timeout=20) == EXIT_USAGE, keyless.stderr
    assert misled.wait(timeout=20) == EXIT_USAGE, misled.stderr
    line = one_error_line(misled.stderr, "ddp-worker")
    assert "drops the connection during the CURVE handshake" in line and "--server-key" in line, line
    line = one_error_line(stranger.stderr, "ddp-worker")
    assert "refused this worker's key" in line, line
    line = one_error_line(keyless.stderr, "ddp-worker")
    assert "handshake" in line and "CURVE" in line, line
    assert coord.p.poll() is None, f"the coordinator died:\n{coord.stderr}"

    member = procs.worker(endpoint, ["--curve-secret", str(good / "worker.key_secret"),
                                     "--server-key", str(good / "coordinator.key")])
    coord.wait_for(r"worker \d+ joined", timeout=30)
    assert coord.wait() == 0, coord.stderr
    assert member.wait(timeout=20) == 0, member.stderr
    assert "Traceback" not in coord.stderr + member.stderr
    assert max_param_diff(tmp_path / "out.npz", tmp_path / "ref.npz") <= 1e-10
    summary = read_json(tmp_path / "s.json")
    assert summary["refused_keys"] >= 1, summary
    assert summary["steps"] == int(STEPS), summary


# --- the bind policy and the coordinator's flags -----------------------------------------


def test_public_bind_needs_curve_or_insecure():
    port = free_port("0.0.0.0")
    res = coordinator("--bind", f"tcp://0.0.0.0:{port}", "--steps", "1")
    expect_error(res, "ddp-coordinator", "--curve-secret", "--insecure")


def test_public_bind_insecure_warns_and_runs():
    port = free_port("0.0.0.0")
    res = run(cli("ddp-coordinator", "--bind", f"tcp://0.0.0.0:{port}", "--insecure", "--steps", "1",
                  "--workers", "1", "--threads", "1"), timeout=60)
    assert res.returncode == 0, _show(res)
    assert "warning" in res.stderr and "--insecure" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "done: 1 steps" in res.stdout, res.stdout


@pytest.mark.parametrize("endpoint", ["tcp://127.attacker:5600", "tcp://0.0.0.0:5600",
                                      "tcp://*:5600", "tcp://127.0.0.1.nip.io:5600"])
def test_check_bind_refuses_what_is_not_literally_loopback(endpoint):
    """In process, no traffic: a name that starts like 127.x is not resolved and not trusted."""
    from ddp.coordinator.access import check_bind
    from ddp.config import Config
    from ddp.errors import UsageError
    from ddp.log import Log

    cfg = Config(backend="zmq", bind=endpoint)
    with pytest.raises(UsageError) as err:
        check_bind(cfg, Log(0, "ddp-coordinator"))
    message = str(err.value)
    assert "\n" not in message and f"--bind {endpoint}" in message and "--insecure" in message


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5600", "tcp://[::1]:5600",
                                      "tcp://localhost:5600", "ipc:///tmp/x.sock"])
def test_check_bind_accepts_loopback_without_keys(endpoint, capsys):
    from ddp.coordinator.access import check_bind
    from ddp.config import Config
    from ddp.log import Log

    check_bind(Config(backend="zmq", bind=endpoint), Log(0, "ddp-coordinator"))
    assert "warning" not in capsys.readouterr().err


def test_coordinator_refuses_a_name_that_looks_like_loopback():
    res = coordinator("--bind", "tcp://127.attacker:5600", "--steps", "1")
    expect_error(res, "ddp-coordinator", "--bind tcp://127.attacker:5600", "--insecure")


@pytest.mark.parametrize("endpoint", ["nonsense", "tcp://127.0.0.1:99999"])
def test_bad_bind(endpoint):
    res = coordinator("--bind", endpoint, "--steps", "1")
    expect_error(res, "ddp-coordinator", f"--bind {endpoint}")


def test_bind_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = coordinator("--bind", f"tcp://127.0.0.1:{port}", "--steps", "1")
    expect_error(res, "ddp-coordinator", f"--bind tcp://127.0.0.1:{port}", "in use")


@pytest.mark.parametrize("case", ["secret only", "empty authorized dir", "public key as secret"])
def test_bad_coordinator_keys(tmp_path, keydir, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    args, fragment = {
        "secret only": (["--curve-secret", str(keydir / "coordinator.key_secret")], "--authorized-keys"),
        "empty authorized dir": (["--curve-secret", str(keydir / "coordinator.key_secret"),
                                  "--authorized-keys", str(empty)], f"--authorized-keys {empty}"),
        "public key as secret": (["--curve-secret", str(keydir / "coordinator.key"),
                                  "--authorized-keys", str(keydir / "authorized")],
                                 f"--curve-secret {keydir / 'coordinator.key'}"),
    }[case]
    res = coordinator("--bind", f"tcp://127.0.0.1:{free_port()}", "--steps", "1", *args)
    expect_error(res, "ddp-coordinator", fragment)


def test_train_workers_needs_zmq_backend():
    res = run(cli("ddp-train", "--workers", "2", "--steps", "1"), timeout=60)
    expect_error(res, "ddp-train", "--backend zmq")


def test_coordinator_needs_bind():
    res = coordinator("--steps", "1")
    expect_error(res, "ddp-coordinator", "--bind")


# --- ddp-worker ----------------------------------------------------------------------------


def test_worker_bad_connect():
    res = worker("--connect", "garbage", "--retry-for", "1")
    expect_error(res, "ddp-worker", "--connect garbage")


def test_worker_status_bad_connect():
    res = worker("--connect", "garbage", "--status")
    expect_error(res, "ddp-worker", "--connect garbage")


def test_worker_half_a_key_pair(keydir):
    res = worker("--connect", f"tcp://127.0.0.1:{free_port()}", "--retry-for", "1",
                 "--curve-secret", str(keydir / "worker.key_secret"))
    expect_error(res, "ddp-worker", "--server-key")


def test_worker_nobody_listening(procs):
    """--retry-for 1 gives up (exit 5) within seconds; --status gives up after its 5 s."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    joiner = procs.start(cli("ddp-worker", "--connect", endpoint, "--retry-for", "1", "--threads", "1"))
    status = procs.start(cli("ddp-worker", "--connect", endpoint, "--status"))
    assert joiner.wait(timeout=20) == EXIT_UNREACHABLE, joiner.stderr
    line = one_error_line(joiner.stderr, "ddp-worker")
    assert "--retry-for 1" in line, line
    assert status.wait(timeout=30) == EXIT_UNREACHABLE, status.stderr
    line = one_error_line(status.stderr, "ddp-worker")
    assert endpoint in line, line
    assert status.stdout == ""


def test_worker_status_of_a_waiting_coordinator(procs):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    coord = procs.coordinator(endpoint, ["--min-workers", "2", "--steps", "1"])
    coord.wait_for(r"waiting for 2 workers", timeout=30)
    res = worker("--connect", endpoint, "--status")
    assert res.returncode == 0, _show(res)
    assert "Traceback" not in res.stderr
    state = json.loads(res.stdout)
    assert state["state"] == "waiting", state
    assert state["min_workers"] == 2 and state["workers"] == [] and state["step"] == 0, state
    assert coord.p.poll() is None, coord.stderr


def test_a_plain_worker_reset_in_every_handshake_is_told_the_coordinator_may_need_curve():
    """A CURVE coordinator resets a keyless worker's connection on its greeting; when the
    reset beats the coordinator's own greeting, libzmq reports no mismatch, only a failed
    handshake without detail. Three in a row end the worker with what to do, as a wrong
    --server-key does; fewer are retried (a coordinator restarting mid-handshake)."""
    import zmq

    from ddp.worker.connection import handshake_error

    no_detail, endpoint = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, "tcp://127.0.0.1:5555"
    assert handshake_error(no_detail, endpoint, curve=False, failures=2) is None
    plain = handshake_error(no_detail, endpoint, curve=False, failures=3)
    assert "drops the connection during the handshake" in plain and "CURVE keys" in plain
    assert "--server-key" in handshake_error(no_detail, endpoint, curve=True, failures=3)
    mismatch = handshake_error(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, endpoint, curve=False, failures=1)
    assert "both sides need CURVE keys" in mismatch
