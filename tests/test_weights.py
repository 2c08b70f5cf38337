"""Sample weights (an .npz's w, --class-weight balanced) and --micro-batch: against a
float64 numpy reference, bit for bit without weights, the same on 1, 2 and 3 ranks, the
shared window, Allreduce and ZeroMQ, one line for a bad w, exact resume."""
from __future__ import annotations

import numpy as np
import pytest

from ddp import checkpoint as ckpt
from ddp import data as ddata
from ddp.config import Config, config_from_job, job_config
from ddp.weights import balanced_weights
from helpers import expect_error, load_model, read_json, train
from inproc import train_here

N, D, K, H = 60, 4, 3, 8
LAYERS = f"{D},{H},{K}"


def _data(tmp_path, name="d.npz", w="random", seed=0, **extra):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, D))
    y = rng.integers(0, K, N)
    arrays = dict(X=X, y=y, **extra)
    if isinstance(w, str) and w == "random":
        arrays["w"] = rng.uniform(0.0, 3.0, N)
    elif w is not None:
        arrays["w"] = w
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path), arrays


def _init(tmp_path, seed=1):
    rng = np.random.default_rng(seed)
    params = {"W0": rng.standard_normal((D, H)) * 0.5, "b0": rng.standard_normal(H) * 0.1,
              "W1": rng.standard_normal((H, K)) * 0.5, "b1": rng.standard_normal(K) * 0.1}
    path = tmp_path / "init.npz"
    np.savez(path, **params)
    return str(path), params


def _args(data, out, *extra, steps=6, batch=16):
    return ["--data", data, "--layers", LAYERS, "--dtype", "float64", "--batch-size", str(batch),
            "--steps", str(steps), "--lr", "0.2", "--momentum", "0.9", "--seed", "3",
            "--output", str(out), "--quiet", *extra]


def _params(path):
    m = load_model(path)
    return {k: v for k, v in m.items() if k != "config"}


def _max_rel(a, b):
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


def _reference(X, y, w, params, steps, batch, lr=0.2, mu=0.9):
    """Weighted cross-entropy SGD with momentum, file order, in float64 numpy."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    for t in range(steps):
        lo = (t % -(-len(X) // batch)) * batch  # batches restart at each epoch
        rows = slice(lo, min(lo + batch, len(X)))
        xb, yb, wb = X[rows], y[rows], w[rows]
        h = np.maximum(xb @ p["W0"] + p["b0"], 0)
        z = h @ p["W1"] + p["b1"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        dz = e / e.sum(axis=1, keepdims=True)
        dz[np.arange(len(yb)), yb] -= 1
        dz *= wb[:, None] / wb.sum()
        g = {"W1": h.T @ dz, "b1": dz.sum(0)}
        dh = (dz @ p["W1"].T) * (h > 0)
        g["W0"], g["b0"] = xb.T @ dh, dh.sum(0)
        for k in p:
            v[k] = mu * v[k] + g[k]
            p[k] -= lr * v[k]
    return p


def _weighted_loss(X, y, w, p):
    z = np.maximum(X @ p["W0"] + p["b0"], 0) @ p["W1"] + p["b1"]
    zs = z - z.max(axis=1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
    return float(np.sum(-w * logp[np.arange(len(y)), y]) / w.sum())


def test_weighted_training_matches_a_float64_reference(tmp_path):
    data, a = _data(tmp_path)
    init, params = _init(tmp_path)
    r = train_here(_args(data, tmp_path / "m.npz", "--init", init, "--no-shuffle"))
    assert r.returncode == 0, r.stderr
    ref = _reference(a["X"], a["y"], a["w"], params, steps=6, batch=16)
    assert _max_rel(_params(tmp_path / "m.npz"), ref) <= 1e-9


def test_weights_of_all_ones_equal_no_weights_bit_for_bit(tmp_path):
    ones, _ = _data(tmp_path, "ones.npz", w=np.ones(N))
    none, _ = _data(tmp_path, "none.npz", w=None)
    for data, out in ((ones, "o.npz"), (none, "n.npz")):
        r = train_here(_args(data, tmp_path / out))
        assert r.returncode == 0, r.stderr
    o, n = _params(tmp_path / "o.npz"), _params(tmp_path / "n.npz")
    assert all(np.array_equal(o[k], n[k]) for k in n)


def test_integer_weights_equal_repeated_rows_up_to_summation_order(tmp_path):
    """A whole-data batch (no shuffle): weight 2 is the row twice. Not bit for bit: the
    repeated rows sit elsewhere in the sums."""
    w = np.random.default_rng(5).integers(0, 3, N).astype(np.float64)
    w[0] = 1
    data, a = _data(tmp_path, w=w)
    keep = np.repeat(np.arange(N), w.astype(int))
    rep = tmp_path / "rep.npz"
    np.savez(rep, X=a["X"][keep], y=a["y"][keep])
    init, _ = _init(tmp_path)
    for d, batch, out in ((data, N, "w.npz"), (str(rep), len(keep), "r.npz")):
        r = train_here(_args(d, tmp_path / out, "--init", init, "--no-shuffle", batch=batch))
        assert r.returncode == 0, r.stderr
    assert _max_rel(_params(tmp_path / "w.npz"), _params(tmp_path / "r.npz")) <= 1e-12


@pytest.mark.parametrize("w,fragments", [
    (np.ones(N - 1), ("w must hold one weight per sample", f"({N},)", f"({N - 1},)")),
    (np.ones((N, 1)), ("w must hold one weight per sample", f"({N}, 1)")),
    (np.where(np.arange(N) == 7, np.nan, 1.0), ("weights w", "NaN or Inf at row 7")),
    (np.where(np.arange(N) == 9, np.inf, 1.0), ("weights w", "NaN or Inf at row 9")),
    (np.where(np.arange(N) == 4, -0.5, 1.0), ("must be >= 0", "-0.5 at row 4")),
    (np.zeros(N), ("all weights w are zero",)),
    (np.array(["a"] * N), ("w must be numeric",)),
])
def test_a_bad_w_is_one_line_and_exit_2(tmp_path, w, fragments):
    data, _ = _data(tmp_path, w=w)
    r = train_here(_args(data, tmp_path / "m.npz"))
    expect_error(r, "ddp-train", data, *fragments)


def test_training_rows_that_all_weigh_zero_are_refused(tmp_path):
    _, a = _data(tmp_path, w=None)
    _, val = ddata.split(ddata.Dataset(a["X"], a["y"], "t"), 0.5, seed=3)
    w = np.zeros(N)
    w[val.rows] = 1.0  # only the validation rows weigh something
    data, _ = _data(tmp_path, "zero.npz", w=w)
    r = train_here(_args(data, tmp_path / "m.npz", "--val-fraction", "0.5"))
    expect_error(r, "ddp-train", "training rows", "weight 0")


def test_balanced_class_weights_are_scikit_learns():
    y = np.array([0, 0, 0, 1, 2, 2])
    # n_samples / (n_classes · count): 6/(3·3), 6/(3·1), 6/(3·2)
    assert np.allclose(balanced_weights(y), [2 / 3] * 3 + [2.0] + [1.0] * 2, rtol=0, atol=1e-15)
    # a class that does not occur is not counted among the classes
    assert np.allclose(balanced_weights(np.array([0, 0, 2])), [0.75, 0.75, 1.5], rtol=0, atol=1e-15)


def test_class_weight_balanced_trains_as_those_weights_in_w(tmp_path):
    plain, a = _data(tmp_path, "plain.npz", w=None)
    counts = np.bincount(a["y"])
    w = len(a["y"]) / (np.count_nonzero(counts) * counts[a["y"]])
    given, _ = _data(tmp_path, "given.npz", w=w)
    r1 = train_here(_args(plain, tmp_path / "b.npz", "--class-weight", "balanced"))
    r2 = train_here(_args(given, tmp_path / "g.npz"))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    b, g = _params(tmp_path / "b.npz"), _params(tmp_path / "g.npz")
    assert all(np.array_equal(b[k], g[k]) for k in g)


def test_class_weight_needs_cross_entropy(tmp_path):
    data, _ = _data(tmp_path, w=None)
    r = train_here(["--data", data, "--loss", "mse", "--class-weight", "balanced", "--steps", "1"])
    expect_error(r, "ddp-train", "--class-weight balanced", "cross-entropy")
    r = train_here(["--data", data, "--class-weight", "some", "--steps", "1"])
    expect_error(r, "ddp-train", "--class-weight", "none, balanced")


def test_the_validation_loss_is_weighted_by_the_validation_w(tmp_path):
    data, _ = _data(tmp_path)
    val, v = _data(tmp_path, "val.npz", seed=9)
    out = tmp_path / "m.npz"
    r = train_here(_args(data, out, "--val-data", val, "--summary-json", tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = read_json(tmp_path / "s.json")
    expected = _weighted_loss(v["X"], v["y"], v["w"], _params(out))
    assert s["val_loss"] == pytest.approx(expected, rel=1e-12)


def test_micro_batch_and_class_weight_reach_the_workers_job():
    cfg = Config(layers=(2, 4, 3), micro_batch=5, class_weight="balanced")
    job = job_config(cfg)
    assert job["micro_batch"] == 5 and job["class_weight"] == "balanced"
    back = config_from_job(job)
    assert back.micro_batch == 5 and back.class_weight == "balanced"


def test_micro_batch_equals_one_pass_and_counts_its_rows_in_the_memory_check(tmp_path):
    data, _ = _data(tmp_path)
    r1 = train_here(_args(data, tmp_path / "one.npz", batch=40))
    r2 = train_here(_args(data, tmp_path / "mb.npz", "--micro-batch", "7", batch=40))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert _max_rel(_params(tmp_path / "mb.npz"), _params(tmp_path / "one.npz")) <= 1e-10
    # the memory check counts the rows of one pass (a model no host holds: refused at once)
    big = ["--data", data, "--layers", f"{D},{2 ** 30},{K}", "--steps", "1", "--batch-size", "40"]
    expect_error(train_here(big + ["--micro-batch", "7"]), "ddp-train", "shards of up to 7 rows")
    r = train_here(_args(data, tmp_path / "z.npz", "--micro-batch", "0"))
    expect_error(r, "ddp-train", "--micro-batch must be a positive integer")


@pytest.mark.parametrize("how", [("1", []), ("2", ["--exchange", "shared"]),
                                 ("3", ["--exchange", "allreduce", "--bucket-mb", "0.0001"]),
                                 ("3", ["--exchange", "shared", "--micro-batch", "2"]),
                                 ("2", ["--exchange", "allreduce", "--bucket-mb", "0.0001",
                                        "--micro-batch", "3"]),
                                 ("zmq", ["--backend", "zmq", "--workers", "3"]),
                                 ("zmq", ["--backend", "zmq", "--workers", "2", "--micro-batch", "3"])],
                         ids=["1", "2-shared", "3-allreduce", "3-shared-micro", "2-allreduce-micro",
                              "zmq3", "zmq2-micro"])
def test_weighted_training_does_not_depend_on_who_computed_what(tmp_path, how):
    data, _ = _data(tmp_path)
    base = _args(data, tmp_path / "ref.npz", "--class-weight", "balanced", "--val-fraction", "0.2",
                 batch=13, steps=8)
    ref = train_here(base)
    assert ref.returncode == 0, ref.stderr
    ranks, extra = how
    args = _args(data, tmp_path / "m.npz", "--class-weight", "balanced", "--val-fraction", "0.2",
                 *extra, batch=13, steps=8)
    r = train(args, n=None if ranks in ("1", "zmq") else int(ranks), timeout=120)
    assert r.returncode == 0, r.stderr
    assert _max_rel(_params(tmp_path / "m.npz"), _params(tmp_path / "ref.npz")) <= 1e-10


def test_resuming_a_weighted_run_is_exact(tmp_path):
    data, _ = _data(tmp_path)
    ref = train_here(_args(data, tmp_path / "ref.npz", "--class-weight", "balanced", steps=12))
    assert ref.returncode == 0, ref.stderr
    d = str(tmp_path / "ck")
    first = train_here(_args(data, tmp_path / "a.npz", "--class-weight", "balanced",
                             "--checkpoint-dir", d, "--checkpoint-every", "5", steps=7))
    assert first.returncode == 0, first.stderr
    assert [s for s, _ in ckpt.list_checkpoints(d)][0] == 7
    second = train(_args(data, tmp_path / "res.npz", "--class-weight", "balanced",
                         "--checkpoint-dir", d, "--checkpoint-every", "5", steps=12), n=2)
    assert second.returncode == 0, second.stderr
    assert _max_rel(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz")) <= 1e-10
    # a checkpoint of a run without class weights is not resumed with them
    third = train_here(_args(data, tmp_path / "x.npz", "--checkpoint-dir", d, steps=14))
    expect_error(third, "ddp-train", "class_weight")
