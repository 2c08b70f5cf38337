"""Checkpoints a careless operator or a hostile file could lose or misuse (issue 12):
a new run never deletes checkpoints it did not write, never resumes one of other data,
skips any checkpoint it cannot read, cleans up what a killed write left, and stops on
a loss above --max-loss; a signal after the last step lets the run finish."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import time
import zipfile

import numpy as np
import pytest

from helpers import _env, kill_tree, one_error_line, train, train_cmd
from ddp import checkpoint as ckpt
from inproc import predict_here, train_here
from zmq_helpers import max_param_diff

DIGITS = ["--data", "digits", "--checkpoint-every", "10", "--progress", "never"]
SMALL = ["--layers", "4,16,3", "--batch-size", "16", "--dtype", "float64", "--checkpoint-every",
         "10", "--progress", "never"]


def _steps(d) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(str(d))]


def _previous_dirs(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("previous-"))


def _npz_data(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    y = rng.integers(0, 3, 120)
    np.savez(path, X=centers[y] + 0.3 * rng.standard_normal((120, 4)), y=y)


# --- item 1: --no-resume must not lose the new run's checkpoints -----------------------


def test_no_resume_sets_the_earlier_checkpoints_aside_and_prunes_only_its_own(tmp_path):
    d = tmp_path / "ck"
    first = train_here(DIGITS + ["--checkpoint-dir", str(d), "--steps", "60"])
    assert first.returncode == 0, first.stderr
    assert _steps(d) == [60, 50, 40]
    # a new, shorter run: before, its checkpoints were pruned as soon as written
    fresh = train_here(DIGITS + ["--checkpoint-dir", str(d), "--steps", "30", "--no-resume"])
    assert fresh.returncode == 0, fresh.stderr
    assert _steps(d) == [30, 20, 10]
    aside = _previous_dirs(d)
    assert len(aside) == 1
    assert _steps(d / aside[0]) == [60, 50, 40]  # nothing of the earlier run was deleted
    assert f"moved 3 earlier checkpoints (steps 40–60) to {d / aside[0]}" in fresh.stderr
    # the next run resumes the new run, not the old one, and prunes what it continues
    again = train_here(DIGITS + ["--checkpoint-dir", str(d), "--steps", "50"])
    assert again.returncode == 0, again.stderr
    assert f"resuming from {d / 'ckpt-00000030.npz'} at step 30" in again.stderr
    assert _steps(d) == [50, 40, 30] and _steps(d / aside[0]) == [60, 50, 40]


def test_a_start_over_sets_aside_checkpoints_that_do_not_verify(tmp_path):
    """Resume was asked for but nothing verifies: the run starts over, and its own
    checkpoints must not sit below higher-numbered unreadable ones."""
    d = tmp_path / "ck"
    assert train_here(DIGITS + ["--checkpoint-dir", str(d), "--steps", "40"]).returncode == 0
    for _, path in ckpt.list_checkpoints(str(d)):
        open(path, "r+b").truncate(100)
    r = train_here(DIGITS + ["--checkpoint-dir", str(d), "--steps", "20"])
    assert r.returncode == 0, r.stderr
    assert "none of them could be resumed: moved 3 earlier checkpoints" in r.stderr
    assert _steps(d) == [20, 10]


# --- item 2: a checkpoint of other data is refused --------------------------------------


def test_a_checkpoint_of_other_data_under_the_same_path_is_refused(tmp_path):
    data, d = tmp_path / "train.npz", tmp_path / "ck"
    _npz_data(data, seed=1)
    args = SMALL + ["--data", str(data), "--checkpoint-dir", str(d)]
    assert train_here(args + ["--steps", "20"]).returncode == 0
    _npz_data(data, seed=2)  # same path, same shapes, other samples
    r = train_here(args + ["--steps", "30"])
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert "written by a different run" in line and "data fingerprint" in line
    assert "--no-resume" in line and "ckpt-00000020.npz" in line
    assert "resuming" not in r.stderr and "step 1/" not in r.stderr
    meta = ckpt.read_checkpoint(ckpt.checkpoint_path(str(d), 20)).meta
    assert isinstance(meta["data_fingerprint"], str) and len(meta["data_fingerprint"]) == 32


def test_an_old_checkpoint_without_a_fingerprint_resumes_with_a_warning(tmp_path):
    data, d = tmp_path / "train.npz", tmp_path / "ck"
    _npz_data(data, seed=1)
    args = SMALL + ["--data", str(data), "--checkpoint-dir", str(d)]
    assert train_here(args + ["--steps", "10"]).returncode == 0
    path = ckpt.checkpoint_path(str(d), 10)
    with np.load(path) as z:  # rewrite it as ddp-train wrote it before the fingerprint
        arrays = {k: z[k] for k in z.files}
    meta = {k: v for k, v in json.loads(str(arrays["meta"])).items()
            if k != "data_fingerprint"}
    meta_json = json.dumps(meta, sort_keys=True)
    arrays["meta"] = np.array(meta_json)
    arrays["checksum"] = np.array(ckpt._checksum(arrays["params"], arrays["velocity"], meta_json))
    np.savez(path, **arrays)
    r = train_here(args + ["--steps", "20"])
    assert r.returncode == 0, r.stderr
    assert "has no data fingerprint" in r.stderr and "resuming from" in r.stderr


def test_zmq_resumes_an_mpi_checkpoint_cleans_up_and_refuses_other_data(tmp_path):
    """Items 1, 2 and 8 hold for the ZeroMQ coordinator too, which hashes the data once
    for its workers and its checkpoints."""
    data, d = tmp_path / "train.npz", tmp_path / "ck"
    _npz_data(data, seed=1)
    args = SMALL + ["--data", str(data), "--checkpoint-dir", str(d)]
    zmq = ["--backend", "zmq", "--workers", "1"]
    ref = train_here(SMALL + ["--data", str(data), "--steps", "30", "--output", str(tmp_path / "ref.npz")])
    assert ref.returncode == 0, ref.stderr
    assert train(args + ["--steps", "20"], n=2).returncode == 0
    stale = _plant_tmp(d, "stale000", age=3600)
    r = train(args + zmq + ["--steps", "30", "--output", str(tmp_path / "res.npz")])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "at step 20" in r.stderr
    assert max_param_diff(tmp_path / "ref.npz", tmp_path / "res.npz") <= 1e-10
    assert not stale.exists()
    assert _steps(d) == [30, 20, 10]

    fresh = train(args + zmq + ["--steps", "10", "--no-resume"])
    assert fresh.returncode == 0, fresh.stderr
    assert _steps(d) == [10] and _steps(d / _previous_dirs(d)[0]) == [30, 20, 10]

    _npz_data(data, seed=2)
    other = train(args + zmq + ["--steps", "20"])
    assert other.returncode == 2, other.stderr
    assert "data fingerprint" in one_error_line(other.stderr)


# --- item 7: every failure to read a checkpoint, --init or model file -------------------


def _patch_zip(path, member: str, method: int | None = None, flag_bits: int = 0) -> None:
    """Rewrite `member`'s local and central zip headers: its compression method and/or
    general-purpose flag bits (bit 0: encrypted)."""
    blob = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as zf:
        local, pos = zf.getinfo(member).header_offset, zf.start_dir
    central = None
    while blob[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", blob, pos + 28)
        if blob[pos + 46:pos + 46 + n].decode() == member:
            central = pos
        pos += 46 + n + m + k
    assert blob[local:local + 4] == b"PK\x03\x04" and central is not None
    for offset, flags_at, method_at in ((local, 6, 8), (central, 8, 10)):
        if method is not None:
            struct.pack_into("<H", blob, offset + method_at, method)
        old = struct.unpack_from("<H", blob, offset + flags_at)[0]
        struct.pack_into("<H", blob, offset + flags_at, old | flag_bits)
    open(path, "wb").write(bytes(blob))


HOSTILE = {"unsupported compression": dict(method=6), "encrypted": dict(flag_bits=1)}


def test_checkpoints_with_hostile_zip_headers_are_skipped_with_a_warning(tmp_path):
    d = tmp_path / "ck"
    args = DIGITS + ["--checkpoint-dir", str(d)]
    assert train_here(args + ["--steps", "30"]).returncode == 0
    for step, how in zip((30, 20), HOSTILE.values()):
        path = ckpt.checkpoint_path(str(d), step)
        _patch_zip(path, "params.npy", **how)
        with pytest.raises(ValueError, match="unreadable"):
            ckpt.read_checkpoint(path)
    r = train_here(args + ["--steps", "40"])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "skipping checkpoint" in r.stderr and "NotImplementedError" in r.stderr
    assert "RuntimeError" in r.stderr and "encrypted" in r.stderr
    assert "resuming from" in r.stderr and "at step 10" in r.stderr


@pytest.mark.parametrize("how", HOSTILE)
def test_init_and_model_files_with_hostile_zip_headers_are_one_line_errors(tmp_path, how):
    model = tmp_path / "m.npz"
    assert train_here(["--data", "digits", "--steps", "5", "--output", str(model)]).returncode == 0
    _patch_zip(model, "W0.npy", **HOSTILE[how])
    p = predict_here(["--model", str(model), "--data", "digits"])
    assert p.returncode == 2, p.stderr
    assert "not a readable .npz" in one_error_line(p.stderr, "ddp-predict")
    r = train_here(["--data", "digits", "--steps", "5", "--init", str(model)])
    assert r.returncode == 2, r.stderr
    assert "--init" in one_error_line(r.stderr) and "not a readable .npz" in r.stderr


# --- item 8: temporary files of killed writes -------------------------------------------


def _plant_tmp(d, token: str, age: float):
    """A file named as atomic_savez names its temporary files, last modified `age` s ago."""
    os.makedirs(d, exist_ok=True)
    path = d / f".tmp-{token}.npz"
    path.write_bytes(b"\0" * 4096)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_stale_temporary_files_of_this_project_are_removed_at_start(tmp_path):
    d = tmp_path / "ck"
    stale = _plant_tmp(d, "k1ll3d_0", age=3600)
    fresh = _plant_tmp(d, "writing0", age=0)        # another process may be about to rename it
    held = _plant_tmp(d, "locked00", age=3600)      # a live writer holds its lock
    others = [d / ".tmp-notmine.npz", d / ".tmp-abcdefgh.npz.bak", d / "tmp-abcdefgh.npz",
              d / "notes.txt"]
    for path in others:
        path.write_text("not ours")
        os.utime(path, (time.time() - 3600,) * 2)
    with open(held, "rb") as fh:
        # an flock belongs to an open file description: the run's own open() of the file
        # meets it as another process's lock, so the run needs no process of its own
        fcntl.flock(fh, fcntl.LOCK_EX)
        r = train_here(DIGITS + ["--checkpoint-dir", str(d), "--steps", "10"])
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert fresh.exists() and held.exists() and all(p.exists() for p in others)
    assert f"removed 1 temporary file that an interrupted checkpoint write left in {d}" in r.stderr


# --- item 10: a signal after the last step; --max-loss -----------------------------------


def test_sigterm_during_the_final_evaluation_finishes_the_run_and_exits_0(tmp_path):
    """The run is complete once its last step is applied: a signal then lets the final
    evaluation finish and the model be written, and the exit code says done."""
    model, d = tmp_path / "m.npz", tmp_path / "ck"
    # a big model over 20000 rows: seconds of final evaluation after two quick steps
    args = ["--data", "random:20000", "--layers", "100,2048,2048,10", "--steps", "2",
            "--threads", "1", "--log-every", "1", "--checkpoint-dir", str(d),
            "--output", str(model), "--progress", "never"]
    proc = subprocess.Popen(train_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # the end-of-run checkpoint comes right before the evaluation
            if "ckpt-00000002.npz" in line:
                break
            if time.monotonic() > deadline:
                pytest.fail("no end-of-run checkpoint line within 60 s")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        out = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
    assert proc.returncode == 0, rest
    assert "SIGTERM arrived after the last step" in rest and "exits 0" in rest
    assert rest.index("model written to") < rest.index("SIGTERM arrived")
    assert "done: 2 steps" in out and model.exists()


@pytest.mark.parametrize("launch", ["one process", "mpirun -n 2", "zmq"])
def test_max_loss_stops_every_rank_like_a_nan_loss(tmp_path, launch):
    d = tmp_path / "ck"
    args = ["--data", "spiral", "--dtype", "float64", "--lr", "30", "--steps", "30",
            "--checkpoint-every", "1", "--checkpoint-dir", str(d), "--max-loss", "1000",
            "--progress", "never"]
    if launch == "zmq":
        args += ["--backend", "zmq", "--workers", "1"]
    if launch == "one process":
        r = train_here(args)
    else:  # ranks under mpirun; the coordinator starts real worker processes
        r = train(args, n=2 if launch.startswith("mpirun") else None)
    assert r.returncode == 3, r.stderr
    line = one_error_line(r.stderr)
    # lr 30 on the spiral: batch losses 1.1, 6.1, 39.5, then 2649 at step 4
    assert "exceeded --max-loss 1000 at step 4" in line and "--lr" in line
    assert "the last good checkpoint is step 3" in line
    assert _steps(d) == [3, 2, 1]
    assert np.isfinite(ckpt.read_checkpoint(ckpt.checkpoint_path(str(d), 3)).params).all()


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_max_loss_must_be_positive_and_finite(value):
    # one value through the real command: exit code and no traceback at process level
    r = (train if value == "nan" else train_here)(["--steps", "1", "--max-loss", value])
    assert r.returncode == 2, r.stderr
    assert "--max-loss must be a positive finite number" in one_error_line(r.stderr)


def test_max_loss_off_by_default_and_in_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("max_loss = 1e129\nsteps = 5\n")
    r = train_here(["--config", str(toml)])
    assert r.returncode == 0, r.stderr
    assert "max_loss = 1e+129" in r.stderr
    assert "max_loss" not in train_here(["--steps", "2"]).stderr  # None: not printed


def test_a_fifo_named_like_a_checkpoint_is_skipped_not_opened(tmp_path):
    """Opening a named pipe blocks until someone writes to it: the resume scan must not."""
    d = tmp_path / "ck"
    args = DIGITS + ["--checkpoint-dir", str(d)]
    assert train_here(args + ["--steps", "20"]).returncode == 0
    os.mkfifo(ckpt.checkpoint_path(str(d), 999))
    # a process of its own: a run that opened the FIFO would block, and only a process
    # can be given a timeout and killed
    r = train(args + ["--steps", "30"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ckpt-00000999.npz: is a named pipe (FIFO), not a regular file" in r.stderr
    assert "resuming from" in r.stderr and "at step 20" in r.stderr


@pytest.mark.parametrize("how", HOSTILE)
def test_data_files_with_hostile_zip_headers_are_one_line_errors(tmp_path, how):
    """--data memory-maps stored members itself: an encrypted one must not be read raw."""
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, X=rng.standard_normal((40, 3)), y=rng.integers(0, 2, 40))
    _patch_zip(data, "X.npy", **HOSTILE[how])
    r = train_here(["--data", str(data), "--steps", "3"])
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert f"--data {data}" in line and ("encrypted" in line or "compression" in line), line
