"""End to end through the CLI: under `mpirun -n 2/3/4`, and the one-process
references in this process (the same entry point on a world of one)."""
import json

import numpy as np
import pytest

from helpers import load_model, read_json, train
from inproc import train_here


def test_worked_example_one_step(tmp_path):
    """2-2-1 net, identity hidden layer, no bias, mse, x = (1, 0.5), t = 4, lr 0.1."""
    np.savez(tmp_path / "one.npz", X=np.array([[1.0, 0.5]]), y=np.array([4.0]))
    np.savez(tmp_path / "init.npz", W0=np.array([[0.5, 2.3], [1.5, 3.0]]), W1=np.array([[1.0], [1.0]]))
    r = train_here(["--data", str(tmp_path / "one.npz"), "--layers", "2,2,1", "--activation", "identity",
                    "--no-bias", "--loss", "mse", "--lr", "0.1", "--momentum", "0", "--batch-size", "1",
                    "--steps", "1", "--dtype", "float64", "--init", str(tmp_path / "init.npz"),
                    "--output", str(tmp_path / "out.npz"), "--summary-json", str(tmp_path / "s.json")])
    assert r.returncode == 0, r.stderr
    m = load_model(tmp_path / "out.npz")
    np.testing.assert_allclose(m["W0"], [[0.395, 2.195], [1.4475, 2.9475]], atol=1e-12)
    np.testing.assert_allclose(m["W1"], [[0.86875], [0.601]], atol=1e-12)
    assert "b0" not in m and "b1" not in m
    s = read_json(tmp_path / "s.json")
    assert s["final_loss"] == pytest.approx(0.3388, abs=5e-5)
    cfg = json.loads(str(m["config"]))
    assert cfg["layers"] == [2, 2, 1] and cfg["activation"] == "identity" and cfg["bias"] is False
    # the logged loss of the step is the loss before the update: 1/2 (4 - 5.05)^2 = 0.55125
    assert "loss 0.5512" in r.stderr


def _run(tmp_path, name, n, extra=()):
    out, summ = tmp_path / f"{name}.npz", tmp_path / f"{name}.json"
    # 7-sample batches over 3 ranks give shards of 3, 2, 2; 50 samples give a short last batch
    args = ["--data", "spiral", "--samples", "50", "--layers", "2,16,8,3", "--activation", "tanh",
            "--batch-size", "7", "--steps", "40", "--dtype", "float64", "--lr", "0.2", "--l2", "1e-3",
            "--output", str(out), "--summary-json", str(summ), "--val-fraction", "0.2",
            "--eval-every", "10", *extra]
    r = train_here(args) if n == 1 else train(args, n=n, timeout=120)
    assert r.returncode == 0, r.stderr
    return load_model(out), read_json(summ)


def test_parameters_do_not_depend_on_the_number_of_processes(tmp_path):
    ref, s1 = _run(tmp_path, "n1", 1)
    assert s1["world_size"] == 1
    for n in (2, 3):
        got, s = _run(tmp_path, f"n{n}", n)
        assert s["world_size"] == n and s["steps"] == 40
        for k in ("W0", "b0", "W1", "b1", "W2", "b2"):
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-10, err_msg=f"{k} at n={n}")
        assert s["final_loss"] == pytest.approx(s1["final_loss"], abs=1e-10)
        assert s["val_loss"] == pytest.approx(s1["val_loss"], abs=1e-10)


def test_more_ranks_than_samples_in_a_batch_is_handled(tmp_path):
    """Batch 3 over 4 ranks: one rank has an empty shard every step, and the result is exact."""
    base = ["--data", "spiral", "--samples", "10", "--layers", "2,8,3", "--batch-size", "3",
            "--steps", "12", "--dtype", "float64"]
    a = train_here(base + ["--output", str(tmp_path / "a.npz")])
    b = train(base + ["--output", str(tmp_path / "b.npz")], n=4)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    ma, mb = load_model(tmp_path / "a.npz"), load_model(tmp_path / "b.npz")
    for k in ("W0", "b0", "W1", "b1"):
        np.testing.assert_allclose(mb[k], ma[k], atol=1e-10)


def test_default_run_on_four_ranks_learns_the_spiral(tmp_path):
    r = train(["--summary-json", str(tmp_path / "s.json")], n=4, timeout=180)
    assert r.returncode == 0, r.stderr
    s = read_json(tmp_path / "s.json")
    for key in ("steps", "world_size", "final_loss", "train_accuracy", "val_loss", "val_accuracy",
                "samples_per_second", "wall_seconds"):
        assert key in s
    assert s["world_size"] == 4 and s["train_accuracy"] >= 0.97
    assert s["samples_per_second"] > 0
    # rank 0 alone speaks: one summary line, one config block
    assert r.stdout.count("done:") == 1 and r.stderr.count("resolved config") == 1


def test_config_file_is_read_and_flags_override_it(tmp_path):
    (tmp_path / "c.toml").write_text('layers = [2, 8, 3]\nsteps = 5\nbatch_size = 10\nlr = 0.05\n')
    r = train_here(["--config", str(tmp_path / "c.toml"), "--steps", "3", "--summary-json",
               str(tmp_path / "s.json")])
    assert r.returncode == 0, r.stderr
    s = read_json(tmp_path / "s.json")
    assert s["steps"] == 3 and s["layers"] == [2, 8, 3]
    assert "batch_size = 10" in r.stderr and "lr = 0.05" in r.stderr


def test_digits_with_validation_and_standardization_and_predict(tmp_path):
    r = train(["--data", "digits", "--val-fraction", "0.2", "--epochs", "15", "--standardize",
               "--output", str(tmp_path / "m.npz"), "--summary-json", str(tmp_path / "s.json")], n=2)
    assert r.returncode == 0, r.stderr
    s = read_json(tmp_path / "s.json")
    assert s["val_accuracy"] > 0.9
    cfg = json.loads(str(load_model(tmp_path / "m.npz")["config"]))
    assert len(cfg["standardize"]["mean"]) == 64
    from helpers import predict
    p = predict(["--model", str(tmp_path / "m.npz"), "--data", "digits"])
    assert p.returncode == 0, p.stderr
    acc = float(p.stdout.split("accuracy")[1].split()[0])
    assert acc > 0.9


def test_mse_regression_from_csv(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3))
    t = X @ np.array([1.0, -2.0, 0.5]) + 0.3
    lines = ["a,b,c,target"] + [",".join(f"{v:.8f}" for v in (*row, tv)) for row, tv in zip(X, t)]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    r = train(["--data", str(tmp_path / "r.csv"), "--loss", "mse", "--layers", "3,1", "--lr", "0.05",
               "--epochs", "60", "--batch-size", "16", "--summary-json", str(tmp_path / "s.json")], n=2)
    assert r.returncode == 0, r.stderr
    s = read_json(tmp_path / "s.json")
    assert s["final_loss"] < 1e-3 and s["train_accuracy"] is None


def test_console_scripts_are_installed_and_run(tmp_path):
    import shutil
    from helpers import BIN, MPIRUN, run
    train_script = shutil.which("ddp-train", path=BIN) or shutil.which("ddp-train")
    predict_script = shutil.which("ddp-predict", path=BIN) or shutil.which("ddp-predict")
    if not train_script or not predict_script:
        pytest.skip("package not installed (pip install .): no ddp-train script on PATH")
    r = run([MPIRUN, "-n", "2", train_script, "--steps", "20", "--output", str(tmp_path / "m.npz")])
    assert r.returncode == 0, r.stderr
    assert "done: 20 steps on 2 ranks" in r.stdout
    p = run([predict_script, "--model", str(tmp_path / "m.npz"), "--data", "spiral"])
    assert p.returncode == 0 and "accuracy" in p.stdout, p.stderr


def test_blas_threads_split_the_cores_between_local_ranks(tmp_path):
    import os
    from helpers import _env
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in _env().items() if not k.endswith("_NUM_THREADS")}  # else they decide
    for n, extra, expected in ((1, [], cores), (2, [], max(1, cores // 2)), (2, ["--threads", "3"], 3)):
        r = train(["--steps", "2", "--summary-json", str(tmp_path / "s.json"), *extra], n=n, env=env)
        assert r.returncode == 0, r.stderr
        assert read_json(tmp_path / "s.json")["threads_per_rank"] == expected


def test_a_launcher_of_another_mpi_is_detected_instead_of_training_alone(tmp_path):
    """Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE; an MPICH-linked mpi4py then sees a world of 1."""
    from helpers import _env, one_error_line, run, train_cmd
    env = dict(_env(), OMPI_COMM_WORLD_SIZE="2")
    r = run(train_cmd(["--steps", "2", "--output", str(tmp_path / "m.npz")]), env=env)
    assert r.returncode == 2
    assert "different MPI libraries" in one_error_line(r.stderr)
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("n,extra", [
    (2, ["--exchange", "allreduce", "--bucket-mb", "0"]),      # one Allreduce after backward
    (3, ["--exchange", "allreduce", "--bucket-mb", "0.0001"]),  # a bucket per layer, started in backward
    (2, ["--exchange", "shared", "--momentum", "0.5"]),         # shared window, momentum state shared too
    (4, ["--exchange", "shared"]),                              # parts of unequal length over 4 ranks
])
def test_every_exchange_gives_the_one_process_parameters(tmp_path, n, extra):
    ref, _ = _run(tmp_path, "ref", 1, extra[2:])
    got, s = _run(tmp_path, "got", n, extra)
    assert s["exchange"] == extra[1] and s["world_size"] == n
    for k in ("W0", "b0", "W1", "b1", "W2", "b2"):
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-10, err_msg=k)


def test_shared_exchange_checkpoints_and_resumes_exactly(tmp_path):
    """Parameters and velocity live in the shared window: a resumed run must continue
    from exactly what rank 0 saved there."""
    base = ["--data", "spiral", "--samples", "40", "--layers", "2,16,3", "--batch-size", "8",
            "--dtype", "float64", "--momentum", "0.9", "--checkpoint-every", "5"]
    whole = train(base + ["--steps", "20", "--output", str(tmp_path / "whole.npz")], n=2)
    assert whole.returncode == 0, whole.stderr
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    first = train(base + ck + ["--steps", "10"], n=2)
    assert first.returncode == 0, first.stderr
    second = train(base + ck + ["--steps", "20", "--output", str(tmp_path / "resumed.npz")], n=2)
    assert second.returncode == 0 and "resuming from" in second.stderr, second.stderr
    a, b = load_model(tmp_path / "whole.npz"), load_model(tmp_path / "resumed.npz")
    for k in ("W0", "b0", "W1", "b1"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
