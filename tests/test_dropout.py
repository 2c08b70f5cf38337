"""--dropout p: inverted dropout on the hidden layers in training, from masks that depend
only on (seed, step, sample, layer, unit): against a float64 numpy reference, the same on
1, 2 and 3 ranks and ZeroMQ, none at evaluation, a keep rate of about 1 − p, exact resume."""
from __future__ import annotations

import numpy as np
import pytest

from ddp import checkpoint as ckpt
from ddp.config import TRAJECTORY_KEYS, Config, job_config
from ddp.dropout import Dropout
from ddp.model import Layout, init_params_
from ddp.worker.compute import ShardCompute
from helpers import expect_error, load_model, read_json, train
from inproc import train_here

N, D, H1, H2, K = 50, 4, 8, 6, 3
LAYERS = f"{D},{H1},{H2},{K}"
SEED = 3


def _data(tmp_path, weights=True):
    rng = np.random.default_rng(0)
    arrays = dict(X=rng.standard_normal((N, D)), y=rng.integers(0, K, N))
    if weights:
        arrays["w"] = rng.uniform(0.0, 2.0, N)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path), arrays


def _args(data, out, *extra, steps=8, batch=16, p=0.4):
    return ["--data", data, "--layers", LAYERS, "--dtype", "float64", "--batch-size", str(batch),
            "--steps", str(steps), "--lr", "0.2", "--momentum", "0.9", "--seed", str(SEED),
            "--dropout", str(p), "--output", str(out), "--quiet", *extra]


def _params(path):
    return {k: v for k, v in load_model(path).items() if k != "config"}


def _max_rel(a, b):
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


def _reference(X, y, w, params, steps, batch, p, activation, lr=0.2, mu=0.9):
    """Weighted cross-entropy SGD with momentum and inverted dropout, file order, float64;
    the masks from ddp.dropout (what a sample's mask is, is that module's to say)."""
    f, df = {"relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0) * 1.0),
             "tanh": (np.tanh, lambda a: 1 - a * a)}[activation]
    masks = Dropout(p, SEED, (H1, H2), batch, np.float64)
    P = {k: v.copy() for k, v in params.items()}
    V = {k: np.zeros_like(v) for k, v in P.items()}
    for t in range(steps):
        lo = (t % -(-len(X) // batch)) * batch
        ids = np.arange(lo, min(lo + batch, len(X)))
        xb, yb, wb = X[ids], y[ids], w[ids]
        m1, m2 = (m.copy() for m in masks.masks_(t, ids))
        a1 = f(xb @ P["W0"] + P["b0"])
        d1 = a1 * m1
        a2 = f(d1 @ P["W1"] + P["b1"])
        d2 = a2 * m2
        z = d2 @ P["W2"] + P["b2"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        dz = e / e.sum(axis=1, keepdims=True)
        dz[np.arange(len(yb)), yb] -= 1
        dz *= wb[:, None] / wb.sum()
        g = {"W2": d2.T @ dz, "b2": dz.sum(0)}
        delta2 = (dz @ P["W2"].T) * m2 * df(a2)
        g["W1"], g["b1"] = d1.T @ delta2, delta2.sum(0)
        delta1 = (delta2 @ P["W1"].T) * m1 * df(a1)
        g["W0"], g["b0"] = xb.T @ delta1, delta1.sum(0)
        for k in P:
            V[k] = mu * V[k] + g[k]
            P[k] -= lr * V[k]
    return P


def _initial(tmp_path):
    rng = np.random.default_rng(1)
    shapes = {"W0": (D, H1), "b0": (H1,), "W1": (H1, H2), "b1": (H2,), "W2": (H2, K), "b2": (K,)}
    params = {k: rng.standard_normal(s) * 0.5 for k, s in shapes.items()}
    path = tmp_path / "init.npz"
    np.savez(path, **params)
    return str(path), params


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_dropout_training_matches_a_float64_reference(tmp_path, activation):
    data, a = _data(tmp_path)
    init, params = _initial(tmp_path)
    r = train_here(_args(data, tmp_path / "m.npz", "--init", init, "--no-shuffle",
                         "--activation", activation))
    assert r.returncode == 0, r.stderr
    ref = _reference(a["X"], a["y"], a["w"], params, 8, 16, 0.4, activation)
    assert _max_rel(_params(tmp_path / "m.npz"), ref) <= 1e-9


def test_masks_keep_about_1_minus_p_scaled_and_depend_on_the_sample_not_its_company():
    p = 0.3
    drop = Dropout(p, seed=7, widths=(64, 32), max_rows=4000, dtype=np.float64)
    ids = np.arange(4000, dtype=np.int64) * 3 + 11
    m64, m32 = (m.copy() for m in drop.masks_(5, ids))
    assert set(np.unique(m64)) == {0.0, 1 / (1 - p)}
    assert abs(np.count_nonzero(m64) / m64.size - (1 - p)) < 0.01  # 256,000 draws: σ ≈ 0.001
    assert abs(np.count_nonzero(m32) / m32.size - (1 - p)) < 0.01
    # per unit and per sample, the rate holds too (no unit or row is always kept)
    per_unit = np.count_nonzero(m64, axis=0) / len(ids)
    assert per_unit.min() > 0.6 and per_unit.max() < 0.8
    # a sample's mask is the same whatever rows share the call, in whatever order
    some = drop.masks_(5, ids[[17, 3, 900]])[0]
    assert np.array_equal(some, m64[[17, 3, 900]])
    # another step, another layer, another seed: other masks
    assert not np.array_equal(drop.masks_(6, ids[:50])[0], m64[:50])
    assert not np.array_equal(m64[:50, :32], m32[:50])
    other = Dropout(p, seed=8, widths=(64,), max_rows=50, dtype=np.float64)
    assert not np.array_equal(other.masks_(5, ids[:50])[0], m64[:50])


def test_no_dropout_at_evaluation():
    layout = Layout((D, H1, H2, K))
    flat = np.empty(layout.size)
    init_params_(flat, layout, "relu", 0)
    x = np.random.default_rng(2).standard_normal((30, D))
    y = np.arange(30) % K
    plain = ShardCompute(layout, "relu", "cross-entropy", np.float64, 8)
    dropping = ShardCompute(layout, "relu", "cross-entropy", np.float64, 8, dropout=0.5, seed=1)
    views = layout.views(flat)
    assert plain.eval_sums(views, x, y) == dropping.eval_sums(views, x, y)


def test_the_summary_loss_is_the_trained_model_without_dropout(tmp_path):
    data, a = _data(tmp_path, weights=False)
    out = tmp_path / "m.npz"
    r = train_here(_args(data, out, "--summary-json", tmp_path / "s.json", p=0.6))
    assert r.returncode == 0, r.stderr
    P = _params(out)
    h = np.maximum(np.maximum(a["X"] @ P["W0"] + P["b0"], 0) @ P["W1"] + P["b1"], 0)
    z = h @ P["W2"] + P["b2"]
    zs = z - z.max(axis=1, keepdims=True)
    loss = -np.mean(zs[np.arange(N), a["y"]] - np.log(np.exp(zs).sum(axis=1)))
    assert read_json(tmp_path / "s.json")["final_loss"] == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("ranks,extra", [
    (2, ["--exchange", "shared"]),
    (3, ["--exchange", "allreduce", "--bucket-mb", "0.0001", "--micro-batch", "2"]),
    (None, ["--backend", "zmq", "--workers", "3"]),
    (None, ["--backend", "zmq", "--workers", "2", "--micro-batch", "3"]),
], ids=["2-shared", "3-allreduce-micro", "zmq3", "zmq2-micro"])
def test_dropout_masks_do_not_depend_on_who_computed_what(tmp_path, ranks, extra):
    data, _ = _data(tmp_path)
    ref = train_here(_args(data, tmp_path / "ref.npz", "--class-weight", "balanced", batch=13))
    assert ref.returncode == 0, ref.stderr
    r = train(_args(data, tmp_path / "m.npz", "--class-weight", "balanced", *extra, batch=13),
              n=ranks, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _max_rel(_params(tmp_path / "m.npz"), _params(tmp_path / "ref.npz")) <= 1e-10


def test_resuming_with_dropout_is_exact_and_another_p_is_refused(tmp_path):
    data, _ = _data(tmp_path)
    ref = train_here(_args(data, tmp_path / "ref.npz", steps=12))
    assert ref.returncode == 0, ref.stderr
    d = str(tmp_path / "ck")
    first = train_here(_args(data, tmp_path / "a.npz", "--checkpoint-dir", d, steps=7))
    assert first.returncode == 0, first.stderr
    assert [s for s, _ in ckpt.list_checkpoints(d)][0] == 7
    second = train(_args(data, tmp_path / "res.npz", "--checkpoint-dir", d, steps=12), n=2)
    assert second.returncode == 0, second.stderr
    assert _max_rel(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz")) <= 1e-10
    other = train_here(_args(data, tmp_path / "x.npz", "--checkpoint-dir", d, steps=14, p=0.2))
    expect_error(other, "ddp-train", "dropout: 0.4 → 0.2")


@pytest.mark.parametrize("p", ["1", "-0.1", "nan", "1.5"])
def test_a_dropout_outside_0_1_is_one_line(tmp_path, p):
    data, _ = _data(tmp_path)
    expect_error(train_here(_args(data, tmp_path / "m.npz", p=p)), "ddp-train", "--dropout must be in [0, 1)")


def test_dropout_reaches_the_workers_and_fixes_the_trajectory():
    assert "dropout" in TRAJECTORY_KEYS
    assert job_config(Config(layers=(2, 4, 3), dropout=0.25))["dropout"] == 0.25
