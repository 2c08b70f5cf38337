"""Adam, AdamW, Nesterov and --clip-norm: against float64 PyTorch on the same data and
initial parameters; on parts of the buffer as under the shared window; the same
parameters on 1, 2 and 3 ranks, every exchange and ZeroMQ; checkpoints that resume
each optimizer exactly, read the ones written before Adam and refuse another
optimizer's state; flags that belong to another optimizer refused."""
import json

import numpy as np
import pytest

from ddp import checkpoint as ckpt
from ddp.coordinator.exchange import optimizer_step_
from ddp.model import Layout
from ddp.optim import SGD, Adam, AdamW
from helpers import expect_error, load_model, train
from inproc import train_here

LAYERS = (4, 8, 3)
N, BATCH, STEPS = 40, 10, 7  # 4 batches an epoch: the run wraps into a second epoch


def _problem(tmp_path):
    """A small classification set and initial parameters, as files."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((N, LAYERS[0]))
    y = rng.integers(0, LAYERS[-1], N)
    np.savez(tmp_path / "data.npz", X=X, y=y)
    init = {}
    for i, (fan_in, fan_out) in enumerate(zip(LAYERS, LAYERS[1:])):
        init[f"W{i}"] = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        init[f"b{i}"] = 0.1 * rng.standard_normal(fan_out)
    np.savez(tmp_path / "init.npz", **init)
    return X, y, init


def _ours(tmp_path, flags):
    out = tmp_path / "ours.npz"
    r = train_here(["--data", tmp_path / "data.npz", "--init", tmp_path / "init.npz",
                    "--layers", ",".join(map(str, LAYERS)), "--activation", "tanh",
                    "--batch-size", BATCH, "--steps", STEPS, "--no-shuffle", "--dtype", "float64",
                    "--output", out, *flags])
    assert r.returncode == 0, r.stderr
    return load_model(out)


def _options(flags) -> dict:
    """{"--lr": "0.01", "--nesterov": True, ...} from a list of flags."""
    opts, rest = {}, list(flags)
    while rest:
        flag = rest.pop(0)
        opts[flag] = True if flag == "--nesterov" else rest.pop(0)
    return opts


def _torch_optimizer(torch, model, flags):
    """torch.optim's counterpart of our flags; AdamW decays the weights, not the biases."""
    opts = _options(flags)
    lr = float(opts.get("--lr", 0.1))
    kind = opts.get("--optimizer", "sgd")
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=float(opts.get("--momentum", 0.9)),
                               nesterov="--nesterov" in flags)
    betas = tuple(float(b) for b in opts.get("--betas", "0.9,0.999").split(","))
    eps = float(opts.get("--eps", 1e-8))
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)
    weights = [layer.weight for layer in model if hasattr(layer, "weight")]
    biases = [layer.bias for layer in model if hasattr(layer, "bias")]
    return torch.optim.AdamW([{"params": weights, "weight_decay": float(opts.get("--weight-decay", 0.01))},
                              {"params": biases, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def _reference(X, y, init, flags):
    """The same steps with torch.nn.Linear layers in float64; also the largest gradient
    norm seen before clipping."""
    torch = pytest.importorskip("torch", reason="the reference needs PyTorch (pip install torch)")
    opts = _options(flags)
    l2, clip = float(opts.get("--l2", 0.0)), opts.get("--clip-norm")
    linears = [torch.nn.Linear(a, b, dtype=torch.float64) for a, b in zip(LAYERS, LAYERS[1:])]
    with torch.no_grad():
        for i, layer in enumerate(linears):
            layer.weight.copy_(torch.from_numpy(init[f"W{i}"].T))  # ours: y = x·W + b
            layer.bias.copy_(torch.from_numpy(init[f"b{i}"]))
    model = torch.nn.Sequential(linears[0], torch.nn.Tanh(), linears[1])
    opt = _torch_optimizer(torch, model, flags)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    largest = 0.0
    for step in range(STEPS):
        lo = (step % (N // BATCH)) * BATCH  # --no-shuffle: the file's order, epoch after epoch
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[lo:lo + BATCH]), y[lo:lo + BATCH])
        loss = loss + 0.5 * l2 * sum((layer.weight ** 2).sum() for layer in linears)
        loss.backward()
        if clip is not None:
            largest = max(largest, float(torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))))
        opt.step()
    params = {}
    for i, layer in enumerate(linears):
        params[f"W{i}"] = layer.weight.detach().numpy().T
        params[f"b{i}"] = layer.bias.detach().numpy()
    return params, largest


@pytest.mark.parametrize("flags", [
    ["--momentum", "0"],                                    # plain SGD: the fast path
    ["--momentum", "0.9", "--l2", "1e-2"],
    ["--nesterov", "--momentum", "0.8"],
    ["--nesterov", "--momentum", "0.9", "--l2", "1e-2", "--clip-norm", "0.3"],
    ["--optimizer", "adam", "--lr", "0.01"],
    ["--optimizer", "adam", "--lr", "0.02", "--betas", "0.8,0.99", "--eps", "1e-6", "--l2", "1e-2"],
    ["--optimizer", "adam", "--lr", "0.01", "--clip-norm", "0.2"],
    ["--optimizer", "adamw", "--lr", "0.01"],                              # torch's WD 0.01
    ["--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0"],
    ["--optimizer", "adamw", "--lr", "0.05", "--weight-decay", "0.5", "--l2", "1e-2",
     "--clip-norm", "0.3"],
    ["--momentum", "0.9", "--clip-norm", "0.2"],
])
def test_each_optimizer_follows_pytorch(tmp_path, flags):
    X, y, init = _problem(tmp_path)
    want, largest = _reference(X, y, init, flags)
    got = _ours(tmp_path, flags)
    if "--clip-norm" in flags:  # the clip did act
        assert largest > float(flags[flags.index("--clip-norm") + 1])
    for k, ref in want.items():
        np.testing.assert_allclose(got[k], ref, rtol=1e-9, atol=1e-12, err_msg=k)
        assert not np.allclose(got[k], init[k])  # the steps moved it


def _make(kind, layout, state):
    if kind == "nesterov":
        return SGD(layout, np.float64, 0.1, 0.9, 1e-2, state, nesterov=True, clip_norm=0.5)
    if kind == "adam":
        return Adam(layout, np.float64, 0.01, (0.8, 0.99), 1e-8, 1e-2, state)
    return AdamW(layout, np.float64, 0.01, (0.9, 0.999), 1e-8, 0.1, 1e-2, state, clip_norm=0.5)


@pytest.mark.parametrize("kind", ["nesterov", "adam", "adamw"])
def test_parts_updated_by_their_own_optimizers_equal_the_whole(kind):
    """As under the shared window: one copy of parameters and state, and each rank's
    optimizer (its own step count, its own scratch) updates its part, clipping by the
    norm of the whole averaged gradient."""
    layout = Layout((6, 5, 3))
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(layout.size)
    whole, pw = _make(kind, layout, None), p0.copy()
    cuts = [0, 4, 29, 30, 31, layout.size]  # parts that cut through W and b blocks
    shared = np.zeros((whole.slots, layout.size))
    parts, pp = [_make(kind, layout, shared) for _ in cuts[1:]], p0.copy()
    clipped = 0
    for _ in range(3):
        g = rng.standard_normal(layout.size) * 5
        mean = g / 7  # what the ranks' parts add up to: ‖Σg/n + λ·W‖² over the whole
        for a, b in whole.weight_parts(0, layout.size):
            mean[a:b] += 1e-2 * pp[a:b]
        total = float(np.dot(mean, mean))
        clipped += whole.clip_norm is not None and np.sqrt(total) > whole.clip_norm
        optimizer_step_(whole, pw, g.copy(), 7)
        for opt, lo, hi in zip(parts, cuts, cuts[1:]):
            optimizer_step_(opt, pp, g[lo:hi].copy(), 7, lo, lambda sq: total)
    np.testing.assert_allclose(pp, pw, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(shared, whole.state, rtol=1e-13, atol=1e-15)
    assert all(opt.t == whole.t == 3 for opt in parts)
    assert clipped == (3 if whole.clip_norm is not None else 0)


# --- the same parameters however the gradients meet ---------------------------------

# 7-sample batches over 3 ranks give shards of 3, 2, 2; 50 samples give a short last batch
SPIRAL = ["--data", "spiral", "--samples", "50", "--layers", "2,16,8,3", "--activation", "tanh",
          "--batch-size", "7", "--dtype", "float64", "--lr", "0.02", "--l2", "1e-3"]
ADAM_CLIP = ["--optimizer", "adamw", "--weight-decay", "0.05", "--clip-norm", "0.5"]
KEYS = ("W0", "b0", "W1", "b1", "W2", "b2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """AdamW with clipping on one process; the clip acts (without it the model differs)."""
    where = tmp_path_factory.mktemp("one")
    r = train_here([*SPIRAL, *ADAM_CLIP, "--steps", "30", "--output", where / "one.npz"])
    assert r.returncode == 0, r.stderr
    r = train_here([*SPIRAL, *ADAM_CLIP[:-2], "--steps", "30", "--output", where / "free.npz"])
    assert r.returncode == 0, r.stderr
    one, free = load_model(where / "one.npz"), load_model(where / "free.npz")
    assert not np.allclose(one["W0"], free["W0"], rtol=0, atol=1e-6)
    return one


@pytest.mark.parametrize("n,extra", [
    (2, ["--exchange", "shared"]),
    (3, ["--exchange", "shared"]),                              # parts of unequal length
    (3, ["--exchange", "allreduce", "--bucket-mb", "0.0001"]),  # a bucket per layer
    (None, ["--backend", "zmq", "--workers", "2"]),
])
def test_adamw_with_clipping_does_not_depend_on_how_gradients_meet(tmp_path, one_process, n, extra):
    out = tmp_path / "got.npz"
    r = train([*SPIRAL, *ADAM_CLIP, "--steps", "30", "--output", str(out), *extra], n=n, timeout=120)
    assert r.returncode == 0, r.stderr
    got = load_model(out)
    for k in KEYS:
        np.testing.assert_allclose(got[k], one_process[k], rtol=0, atol=1e-10, err_msg=k)


# --- checkpoints --------------------------------------------------------------------

def _whole_and_resumed(tmp_path, flags, n=None):
    """The model after 20 steps in one go, and after 10, a stop, and 10 more."""
    base = [*SPIRAL, "--checkpoint-every", "5", *flags]
    run = (lambda args: train_here(args)) if n is None else (lambda args: train(args, n=n))
    whole = run(base + ["--steps", "20", "--output", str(tmp_path / "whole.npz")])
    assert whole.returncode == 0, whole.stderr
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    first = run(base + ck + ["--steps", "10"])
    assert first.returncode == 0, first.stderr
    second = run(base + ck + ["--steps", "20", "--output", str(tmp_path / "resumed.npz")])
    assert second.returncode == 0 and "resuming from" in second.stderr, second.stderr
    return load_model(tmp_path / "whole.npz"), load_model(tmp_path / "resumed.npz")


@pytest.mark.parametrize("flags", [
    ["--nesterov"],
    ["--optimizer", "adam", "--betas", "0.8,0.99"],
    ADAM_CLIP,
])
def test_each_optimizer_resumes_exactly(tmp_path, flags):
    whole, resumed = _whole_and_resumed(tmp_path, flags)
    for k in KEYS:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)
    saved = ckpt.read_checkpoint(ckpt.checkpoint_path(str(tmp_path / "ck"), 20))
    assert saved.optimizer["t"] == 20 and saved.state.shape[0] == (1 if flags == ["--nesterov"] else 2)


@pytest.mark.parametrize("n,exchange", [(2, "shared"), (2, "allreduce")])
def test_adam_resumes_exactly_under_mpi(tmp_path, n, exchange):
    """The moments and the step count reach every rank: through the shared window's one
    copy, or broadcast to every rank's own."""
    whole, resumed = _whole_and_resumed(tmp_path, [*ADAM_CLIP, "--exchange", exchange], n=n)
    for k in KEYS:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)


def test_zmq_resumes_an_adam_checkpoint_of_mpi(tmp_path):
    """The ZeroMQ coordinator loads the moments and the step count as ddp-train does."""
    base = [*SPIRAL, *ADAM_CLIP, "--checkpoint-every", "5"]
    whole = train_here(base + ["--steps", "20", "--output", tmp_path / "whole.npz"])
    assert whole.returncode == 0, whole.stderr
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    assert train_here(base + ck + ["--steps", "10"]).returncode == 0
    r = train(base + ck + ["--steps", "20", "--backend", "zmq", "--workers", "2",
                           "--output", str(tmp_path / "zmq.npz")])
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr
    a, b = load_model(tmp_path / "whole.npz"), load_model(tmp_path / "zmq.npz")
    for k in KEYS:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-10, err_msg=k)


def test_sgd_checkpoints_keep_the_format_older_readers_read(tmp_path):
    """`velocity` and a checksum over params, velocity and meta, as before Adam; and a
    checkpoint written then (no optimizer entry in its meta) resumes an SGD run exactly."""
    base = [*SPIRAL, "--checkpoint-every", "5"]
    ck = tmp_path / "ck"
    assert train_here(base + ["--steps", "20", "--output", tmp_path / "whole.npz"]).returncode == 0
    assert train_here(base + ["--checkpoint-dir", ck, "--steps", "10"]).returncode == 0
    path = ckpt.checkpoint_path(str(ck), 10)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    assert sorted(arrays) == ["checksum", "meta", "params", "velocity"]
    # the checksum as readers before Adam compute it: over params, velocity and meta
    assert str(arrays["checksum"]) == ckpt._checksum(arrays["params"], arrays["velocity"],
                                                     str(arrays["meta"]))
    meta = json.loads(str(arrays["meta"]))
    assert meta["optimizer"] == {"kind": "sgd", "slots": ["velocity"], "t": 10}
    del meta["optimizer"]  # as ddp-train wrote it before Adam
    meta_json = json.dumps(meta, sort_keys=True)
    arrays["meta"] = np.array(meta_json)
    arrays["checksum"] = np.array(ckpt._checksum(arrays["params"], arrays["velocity"], meta_json))
    np.savez(path, **arrays)
    r = train_here(base + ["--checkpoint-dir", ck, "--steps", "20", "--output", tmp_path / "res.npz"])
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr
    whole, resumed = load_model(tmp_path / "whole.npz"), load_model(tmp_path / "res.npz")
    for k in KEYS:
        np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)


@pytest.mark.parametrize("first,then,fragment", [
    (["--optimizer", "adam"], [], "holds the state of --optimizer adam (exp_avg, exp_avg_sq), "
                                  "this run uses --optimizer sgd (velocity)"),
    ([], ["--optimizer", "adamw"], "holds the state of --optimizer sgd"),
    (["--optimizer", "adam"], ["--optimizer", "adamw"], "this run uses --optimizer adamw"),
])
def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path, first, then, fragment):
    base = [*SPIRAL, "--checkpoint-dir", tmp_path / "ck", "--steps", "10"]
    assert train_here(base + first).returncode == 0
    r = train_here(base + ["--steps", "20"] + then)
    expect_error(r, "ddp-train", fragment, "--no-resume")


@pytest.mark.parametrize("optimizer", [
    "not a dict", {"kind": "adam", "slots": ["params"], "t": 3}, {"kind": "adam", "slots": [], "t": 1},
    {"kind": "sgd", "slots": ["velocity"], "t": -1}, {"kind": "sgd", "slots": ["velocity"], "t": True},
    {"kind": "adam", "slots": ["exp_avg", "exp_avg_sq"], "t": 4},  # slots the file does not hold
])
def test_a_checkpoint_with_a_bad_optimizer_entry_is_skipped(tmp_path, optimizer):
    params = np.zeros(5)
    path = ckpt.save_checkpoint(str(tmp_path), 3, params, np.zeros((1, 5)), {},
                                {"kind": "sgd", "slots": ["velocity"], "t": 3})
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = dict(json.loads(str(arrays["meta"])), optimizer=optimizer)
    meta_json = json.dumps(meta, sort_keys=True)
    arrays["meta"], arrays["checksum"] = np.array(meta_json), np.array(
        ckpt._checksum(params, arrays["velocity"], meta_json))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="optimizer|missing"):
        ckpt.read_checkpoint(path)


# --- flags --------------------------------------------------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (["--betas", "0.9,0.99"], "--betas applies to --optimizer adam or adamw only, not sgd"),
    (["--eps", "1e-6"], "--eps applies to --optimizer adam or adamw only, not sgd"),
    (["--weight-decay", "0.1"], "--weight-decay applies to --optimizer adamw only, not sgd"),
    (["--optimizer", "adam", "--weight-decay", "0.1"], "--weight-decay applies to --optimizer adamw"),
    (["--optimizer", "adam", "--nesterov"], "--nesterov applies to --optimizer sgd only, not adam"),
    (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum applies to --optimizer sgd only, not adamw"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --momentum > 0"),
    (["--optimizer", "lion"], "--optimizer 'lion' is not one of: sgd, adam, adamw"),
    (["--optimizer", "adam", "--betas", "0.9"], "--betas must be two numbers in [0, 1)"),
    (["--optimizer", "adam", "--betas", "0.9,1"], "--betas must be two numbers in [0, 1)"),
    (["--optimizer", "adam", "--betas", "a,b"], "--betas must be two numbers in [0, 1)"),
    (["--optimizer", "adam", "--betas", "nan,0.9"], "--betas must be two numbers in [0, 1)"),
    (["--optimizer", "adam", "--eps", "0"], "--eps must be a positive number"),
    (["--optimizer", "adamw", "--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
    (["--clip-norm", "0"], "--clip-norm must be a positive number"),
    (["--clip-norm", "inf"], "--clip-norm must be a positive number"),
])
def test_optimizer_flags_are_checked(tmp_path, flags, fragment):
    r = train_here(["--steps", "1", "--output", tmp_path / "m.npz", *flags])
    expect_error(r, "ddp-train", fragment)
    assert not (tmp_path / "m.npz").exists()


def test_the_optimizer_keys_in_toml_train_as_the_flags_do(tmp_path):
    (tmp_path / "c.toml").write_text('optimizer = "adam"\nbetas = "0.8,0.99"\neps = 1e-6\n'
                                     'clip_norm = 0.5\n')
    flags = ["--optimizer", "adam", "--betas", "0.8,0.99", "--eps", "1e-6", "--clip-norm", "0.5"]
    a = train_here([*SPIRAL, "--steps", "5", "--config", tmp_path / "c.toml",
                    "--output", tmp_path / "a.npz"])
    b = train_here([*SPIRAL, "--steps", "5", *flags, "--output", tmp_path / "b.npz"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ma, mb = load_model(tmp_path / "a.npz"), load_model(tmp_path / "b.npz")
    for k in KEYS:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    (tmp_path / "bad.toml").write_text('betas = "0.9,0.999"\n')
    expect_error(train_here(["--config", tmp_path / "bad.toml"]), "ddp-train",
                 "--betas applies to --optimizer adam or adamw only")
