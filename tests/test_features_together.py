"""The training features together: Adam + cosine with warmup + dropout + sample weights +
clipping (+ early stopping) end with the parameters of one process on 2 and 3 ranks (the
shared window and bucketed Allreduce) and on ZeroMQ workers, and resume exactly.

Each feature is tested on its own beside its code (test_optim, test_schedule, test_weights,
test_dropout); this file holds them to the promise when they meet.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import load_model, read_json, train
from inproc import train_here

KEYS = ("W0", "b0", "W1", "b1", "W2", "b2")
GROUPS = {"adam": ["--optimizer", "adam", "--betas", "0.85,0.99"], "clipping": ["--clip-norm", "0.5"],
          "cosine": ["--lr-schedule", "cosine", "--warmup-steps", "5", "--lr-min", "0.001"],
          "dropout": ["--dropout", "0.2"], "l2": ["--l2", "1e-3"]}
FEATURES = [flag for group in GROUPS.values() for flag in group]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """200 weighted samples (weights 0 to 3, some rows weigh nothing), 5 features, 3 classes."""
    path = tmp_path_factory.mktemp("data") / "weighted.npz"
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 5))
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    w = rng.integers(0, 4, 200).astype(float)
    np.savez(path, X=X, y=y, w=w)
    return path


def flags(data, steps: int = 30, features=FEATURES) -> list[str]:
    # batches of 13 over 3 ranks: shards of 5, 4, 4; 200 samples: a short last batch
    return ["--data", str(data), "--layers", "5,12,8,3", "--activation", "tanh", "--batch-size", "13",
            "--dtype", "float64", "--lr", "0.02", "--steps", str(steps), *features]


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.npz"
    r = train_here([*flags(data), "--output", out])
    assert r.returncode == 0, r.stderr
    return load_model(out)


@pytest.mark.parametrize("n,extra", [
    (2, ["--exchange", "shared"]),
    (3, ["--exchange", "shared"]),
    (3, ["--exchange", "allreduce", "--bucket-mb", "0.0001"]),
    (None, ["--backend", "zmq", "--workers", "2"]),
    (None, ["--backend", "zmq", "--workers", "3", "--micro-batch", "2"]),
])
def test_all_features_together_do_not_depend_on_how_gradients_meet(tmp_path, data, one_process, n, extra):
    out = tmp_path / "got.npz"
    r = train([*flags(data), "--output", str(out), *extra], n=n, timeout=120)
    assert r.returncode == 0, r.stderr
    got = load_model(out)
    for k in KEYS:
        np.testing.assert_allclose(got[k], one_process[k], rtol=0, atol=1e-10, err_msg=k)


def test_each_feature_changes_the_result(tmp_path, data, one_process):
    """The invariance above is not vacuous: leaving out any one feature (or the weights)
    moves the model."""
    for name in [*GROUPS, "weights"]:
        if name == "weights":
            with np.load(data) as z:
                np.savez(tmp_path / "unweighted.npz", X=z["X"], y=z["y"])
            args = flags(tmp_path / "unweighted.npz")
        else:
            args = flags(data, features=[f for g, fl in GROUPS.items() if g != name for f in fl])
        out = tmp_path / f"without-{name}.npz"
        r = train_here([*args, "--output", out])
        assert r.returncode == 0, r.stderr
        assert not np.allclose(load_model(out)["W0"], one_process["W0"], rtol=0, atol=1e-8), name


@pytest.mark.parametrize("n,extra", [(None, []), (2, ["--exchange", "shared"]),
                                     (3, ["--exchange", "allreduce"])])
def test_all_features_together_resume_exactly(tmp_path, data, one_process, n, extra):
    """The same command run again after its newest checkpoints are gone (a crash after step
    20 of 30) resumes from step 20 and ends as the run that never stopped; the schedule's
    T is the same, as it is for a resumed run."""
    ck = tmp_path / "ck"
    args = [*flags(data), "--checkpoint-dir", str(ck), "--checkpoint-every", "5", *extra]
    run = (lambda a: train_here(a)) if n is None else (lambda a: train(a, n=n, timeout=120))
    whole = run([*args, "--output", str(tmp_path / "whole.npz")])
    assert whole.returncode == 0, whole.stderr
    for step in (25, 30):
        (ck / f"ckpt-{step:08d}.npz").unlink()
    out = tmp_path / "resumed.npz"
    again = run([*args, "--output", str(out)])
    assert again.returncode == 0 and "resuming from" in again.stderr and "step 20" in again.stderr, \
        again.stderr
    got, before = load_model(out), load_model(tmp_path / "whole.npz")
    for k in KEYS:
        np.testing.assert_array_equal(got[k], before[k], err_msg=k)
        np.testing.assert_allclose(got[k], one_process[k], rtol=0, atol=1e-10, err_msg=k)


def test_early_stopping_with_everything_stops_alike_on_1_and_3_ranks(tmp_path, data):
    early = [*flags(data, steps=400), "--val-fraction", "0.25", "--eval-every", "5",
             "--early-stopping", "3"]
    got = {}
    for n in (None, 3):
        out, summary = tmp_path / f"m{n}.npz", tmp_path / f"s{n}.json"
        args = [*early, "--output", str(out), "--summary-json", str(summary)]
        r = train_here(args) if n is None else train(args, n=n, timeout=120)
        assert r.returncode == 0, r.stderr
        got[n] = (load_model(out), read_json(summary))
    (m1, s1), (m3, s3) = got[None], got[3]
    assert s1["stopped_early"] and s1["steps"] < 400
    assert (s1["steps"], s1["best_step"]) == (s3["steps"], s3["best_step"])
    for k in KEYS:
        np.testing.assert_allclose(m3[k], m1[k], rtol=0, atol=1e-10, err_msg=k)


def test_weights_schedule_and_clipping_together_match_pytorch(tmp_path):
    """Adam + cosine with warmup + clipping on weighted data, 9 steps, against float64
    torch.nn.Linear layers trained on Σwᵢℓᵢ/Σwᵢ with the issue's rate formula."""
    torch = pytest.importorskip("torch", reason="the reference needs PyTorch (pip install torch)")
    import math

    layers, n, batch, steps, warmup, lr, lr_min = (4, 8, 3), 40, 10, 9, 3, 0.05, 0.005
    rng = np.random.default_rng(5)
    X, y, w = rng.standard_normal((n, 4)), rng.integers(0, 3, n), rng.integers(0, 4, n).astype(float)
    init = {}
    for i, (a, b) in enumerate(zip(layers, layers[1:])):
        init[f"W{i}"], init[f"b{i}"] = rng.standard_normal((a, b)) / math.sqrt(a), 0.1 * rng.standard_normal(b)
    np.savez(tmp_path / "data.npz", X=X, y=y, w=w)
    np.savez(tmp_path / "init.npz", **init)
    out = tmp_path / "ours.npz"
    r = train_here(["--data", tmp_path / "data.npz", "--init", tmp_path / "init.npz", "--layers", "4,8,3",
                    "--activation", "tanh", "--batch-size", batch, "--steps", steps, "--no-shuffle",
                    "--dtype", "float64", "--optimizer", "adam", "--lr", lr, "--lr-schedule", "cosine",
                    "--warmup-steps", warmup, "--lr-min", lr_min, "--clip-norm", "0.2", "--output", out])
    assert r.returncode == 0, r.stderr
    ours = load_model(out)

    linears = [torch.nn.Linear(a, b, dtype=torch.float64) for a, b in zip(layers, layers[1:])]
    with torch.no_grad():
        for i, layer in enumerate(linears):
            layer.weight.copy_(torch.from_numpy(init[f"W{i}"].T))
            layer.bias.copy_(torch.from_numpy(init[f"b{i}"]))
    model = torch.nn.Sequential(linears[0], torch.nn.Tanh(), linears[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    Xt, yt, wt = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(w)
    clipped = 0
    for t in range(steps):
        p = min(max((t - warmup) / max(1, steps - warmup), 0.0), 1.0)
        rate = (lr_min + (lr - lr_min) * (1 + math.cos(math.pi * p)) / 2) * min(1.0, (t + 1) / warmup)
        for group in opt.param_groups:
            group["lr"] = rate
        lo = (t % (n // batch)) * batch
        opt.zero_grad()
        each = torch.nn.functional.cross_entropy(model(Xt[lo:lo + batch]), yt[lo:lo + batch], reduction="none")
        ((wt[lo:lo + batch] * each).sum() / wt[lo:lo + batch].sum()).backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)) > 0.2
        opt.step()
    assert clipped, "the clip acted"
    for i, layer in enumerate(linears):
        for key, ref in ((f"W{i}", layer.weight.detach().numpy().T), (f"b{i}", layer.bias.detach().numpy())):
            np.testing.assert_allclose(ours[key], ref, rtol=1e-9, atol=1e-12, err_msg=key)
