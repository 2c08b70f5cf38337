"""Learning-rate schedules, ReduceLROnPlateau and early stopping: the formulas against
PyTorch's schedulers, the same trajectory on any number of ranks and on ZeroMQ, and
exact resumes."""
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest

from helpers import (_env, expect_error, kill_tree, load_model, one_error_line, read_json, train,
                     train_cmd, unstamped)
from ddp import checkpoint as ckpt
from ddp.errors import UsageError
from ddp.jobspec import run_config
from ddp.monitor import Monitor, prometheus
from ddp.schedule import EarlyStopping, Plateau, scheduled_lr
from inproc import train_here

BASE = ["--data", "spiral", "--samples", "40", "--layers", "2,16,3", "--batch-size", "16",
        "--dtype", "float64", "--progress", "never"]
T, W, LR, LR_MIN = 40, 10, 0.3, 0.01
COSINE = ["--steps", str(T), "--lr", str(LR), "--lr-schedule", "cosine", "--warmup-steps", str(W),
          "--lr-min", str(LR_MIN)]
PLATEAU = ["--val-fraction", "0.25", "--eval-every", "2", "--lr-plateau-patience", "1",
           "--lr-plateau-factor", "0.5"]
# a net that overfits the small spiral soon: the validation loss turns up after ~35 steps
EARLY = ["--data", "spiral", "--samples", "40", "--layers", "2,32,3", "--batch-size", "16",
         "--dtype", "float64", "--progress", "never", "--val-fraction", "0.3", "--lr", "0.5",
         "--eval-every", "5", "--early-stopping", "3"]


def _params(path) -> dict[str, np.ndarray]:
    return {k: v for k, v in load_model(path).items() if k != "config"}


def _assert_same(a, b, atol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def _ok(res):
    assert res.returncode == 0, res.stderr
    return res


# --- the formulas -------------------------------------------------------------------------


def test_the_formula_by_hand():
    assert scheduled_lr(7, 100, 0.2) == 0.2
    assert scheduled_lr(0, 100, 0.2, warmup=4) == pytest.approx(0.05)
    assert scheduled_lr(3, 100, 0.2, warmup=4) == 0.2
    assert scheduled_lr(9, 100, 0.2, "step", step_every=4, gamma=0.5) == pytest.approx(0.05)
    # cosine and linear start after warmup at lr and reach lr_min at t = T
    assert scheduled_lr(10, 110, 0.2, "cosine", warmup=10, lr_min=0.02) == pytest.approx(0.2)
    assert scheduled_lr(60, 110, 0.2, "cosine", warmup=10, lr_min=0.02) == pytest.approx(0.11)
    assert scheduled_lr(110, 110, 0.2, "cosine", warmup=10, lr_min=0.02) == pytest.approx(0.02)
    assert scheduled_lr(60, 110, 0.2, "linear", warmup=10, lr_min=0.02) == pytest.approx(0.11)
    assert scheduled_lr(5, 110, 0.2, "linear", warmup=10, lr_min=0.02) == pytest.approx(0.12)
    # a run no longer than its warmup: p is 0, the rate only rises
    assert scheduled_lr(2, 3, 0.2, "cosine", warmup=5) == pytest.approx(0.12)


def _torch_rates(make_scheduler, lr: float, steps: int) -> list[float]:
    """The rate torch's optimizer uses at each of `steps` updates under a scheduler."""
    torch = pytest.importorskip("torch", reason="the reference schedulers are PyTorch's")
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_scheduler(torch.optim.lr_scheduler, opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("schedule,make", [
    ("constant", lambda s, o: s.LinearLR(o, 1 / W, 1.0, W - 1)),
    ("step", lambda s, o: s.ChainedScheduler([s.StepLR(o, 7, 0.5),
                                              s.LinearLR(o, 1 / W, 1.0, W - 1)])),
    ("cosine", lambda s, o: s.SequentialLR(o, [s.LinearLR(o, 1 / W, 1.0, W - 1),
                                               s.CosineAnnealingLR(o, T - W, LR_MIN)], [W])),
    ("linear", lambda s, o: s.SequentialLR(o, [s.LinearLR(o, 1 / W, 1.0, W - 1),
                                               s.LinearLR(o, 1.0, LR_MIN / LR, T - W)], [W])),
])
def test_each_schedule_with_warmup_matches_pytorch(schedule, make):
    expected = _torch_rates(make, LR, T)
    ours = [scheduled_lr(t, T, LR, schedule, W, LR_MIN, 7 if schedule == "step" else None, 0.5)
            for t in range(T)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule,make", [
    ("step", lambda s, o: s.StepLR(o, 5, 0.3)),
    ("cosine", lambda s, o: s.CosineAnnealingLR(o, T, LR_MIN)),
    ("linear", lambda s, o: s.LinearLR(o, 1.0, LR_MIN / LR, T)),
])
def test_each_schedule_without_warmup_matches_pytorch(schedule, make):
    expected = _torch_rates(make, LR, T)
    ours = [scheduled_lr(t, T, LR, schedule, 0, LR_MIN, 5 if schedule == "step" else None, 0.3)
            for t in range(T)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)


def test_the_plateau_reduces_as_pytorch_does():
    torch = pytest.importorskip("torch", reason="the reference is torch's ReduceLROnPlateau")
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.4)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2,
                                                     threshold=1e-4, threshold_mode="rel")
    ours = Plateau(patience=2, factor=0.5)
    # improvements, flat stretches, and improvements smaller than the relative threshold
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.89995, 0.8999, 0.5, 0.6, 0.7, 0.5, 0.49999, 0.3,
              0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.2999]
    reductions = 0
    for loss in losses:
        reductions += ours.observe(loss)
        ref.step(loss)
        assert 0.4 * ours.scale == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), loss
    assert reductions == 4  # the sequence exercises the rule, not just the first rate


def test_early_stopping_keeps_the_best_and_stops_after_n_without_improvement():
    params = np.zeros(3)
    es = EarlyStopping(patience=3, min_delta=0.01, params=params)
    for step, loss in ((10, 1.0), (20, 0.8), (30, 0.795), (40, 0.7), (50, 0.71), (60, 0.695)):
        params[:] = step
        es.observe(step, loss, params)
        assert not es.stopped
    assert (es.best_step, es.best_loss, es.bad) == (40, 0.7, 2)  # 0.695 is not 0.01 better
    params[:] = 70
    es.observe(70, 0.9, params)
    assert es.stopped and np.array_equal(es.best, [40, 40, 40])


def test_a_checkpoint_keeps_its_extra_arrays_under_the_checksum(tmp_path):
    d = str(tmp_path)
    params, state, best = np.arange(4.0), np.zeros((1, 4)), np.ones(4)
    sgd = {"kind": "sgd", "slots": ["velocity"], "t": 3}
    path = ckpt.save_checkpoint(d, 3, params, state, {"x": 1}, sgd, {"best_params": best})
    got = ckpt.read_checkpoint(path)
    assert list(got.extra) == ["best_params"] and np.array_equal(got.extra["best_params"], best)
    plain = ckpt.read_checkpoint(ckpt.save_checkpoint(d, 4, params, state, {"x": 1}, sgd))
    assert plain.extra == {}
    data = dict(np.load(path, allow_pickle=False))
    data["extra_best_params"] = best + 1e-9
    np.savez(path, **data)
    with pytest.raises(ValueError, match="checksum"):
        ckpt.read_checkpoint(path)


def test_the_gauge_shows_the_rate_the_loop_set():
    monitor = Monitor(backend="mpi", total_steps=10, layers=[2, 3], parameters=9, lr=0.1,
                      classify=True)
    monitor.lr = 0.0375
    text = generate_latest(prometheus.registry(monitor.run)).decode()
    assert "ddp_learning_rate 0.0375" in text


# --- flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,fragment", [
    (["--lr-schedule", "exp"], "--lr-schedule 'exp' is not one of"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--lr-schedule", "cosine", "--lr-min", "0.5"], "--lr-min must be in [0, --lr 0.1]"),
    (["--lr-min", "-0.1"], "--lr-min must be in"),
    (["--lr-step-every", "5"], "apply to --lr-schedule step only"),
    (["--lr-gamma", "0.5"], "apply to --lr-schedule step only"),
    (["--lr-schedule", "step"], "needs --lr-step-every"),
    (["--lr-schedule", "step", "--lr-step-every", "5", "--lr-gamma", "1.5"], "--lr-gamma must be in (0, 1]"),
    (["--lr-schedule", "step", "--lr-step-every", "0"], "--lr-step-every must be a positive"),
    (["--lr-plateau-patience", "2"], "--lr-plateau-patience needs validation data"),
    (["--lr-plateau-patience", "2", "--val-fraction", "0.2"], "give --eval-every"),
    (["--lr-plateau-patience", "0", "--val-fraction", "0.2", "--eval-every", "5"],
     "--lr-plateau-patience must be a positive"),
    (["--lr-plateau-factor", "0.5"], "goes with --lr-plateau-patience"),
    (["--lr-plateau-patience", "2", "--lr-plateau-factor", "1", "--val-fraction", "0.2",
      "--eval-every", "5"], "--lr-plateau-factor must be in (0, 1)"),
    (["--early-stopping", "3"], "--early-stopping needs validation data"),
    (["--early-stopping", "3", "--val-fraction", "0.2"], "give --eval-every"),
    (["--min-delta", "0.1"], "goes with --early-stopping"),
    (["--early-stopping", "2", "--min-delta", "-1", "--val-fraction", "0.2", "--eval-every", "5"],
     "--min-delta must be a number >= 0"),
])
def test_bad_schedule_flags_are_one_line_errors(args, fragment):
    expect_error(train_here(["--steps", "5"] + args), "ddp-train", fragment)


def test_toml_keys_configure_the_schedule(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr_schedule = "step"\nlr_step_every = 3\nlr_gamma = 0.5\nwarmup_steps = 2\n')
    jsonl = tmp_path / "run.jsonl"
    _ok(train_here(BASE + ["--config", toml, "--steps", "12", "--log-every", "1",
                           "--log-jsonl", jsonl]))
    steps = [json.loads(line) for line in open(jsonl)]
    rates = {e["step"]: e["lr"] for e in steps if e.get("event", e.get("kind")) == "step"}
    assert sorted(rates) == list(range(1, 13))
    for step, lr in rates.items():  # the event after update t + 1 names update t's rate
        assert lr == pytest.approx(scheduled_lr(step - 1, 12, 0.1, "step", 2, 0.0, 3, 0.5),
                                   rel=1e-15)


# --- one trajectory whatever the world -------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Cosine with warmup and a plateau, on one process: the model and the summary."""
    tmp = tmp_path_factory.mktemp("one")
    _ok(train_here(BASE + COSINE + PLATEAU + ["--output", tmp / "m.npz",
                                              "--summary-json", tmp / "s.json"]))
    summary = read_json(tmp / "s.json")
    # the plateau acted: the last rate is below the schedule's
    assert summary["lr"] < scheduled_lr(T - 1, T, LR, "cosine", W, LR_MIN) * 0.99
    return _params(tmp / "m.npz"), summary


@pytest.mark.parametrize("n,exchange", [(2, "shared"), (3, "shared"), (2, "allreduce"),
                                        (3, "allreduce")])
def test_the_schedule_is_the_same_on_any_number_of_ranks(tmp_path, one_process, n, exchange):
    ref, ref_summary = one_process
    _ok(train(BASE + COSINE + PLATEAU + ["--exchange", exchange, "--output", str(tmp_path / "m.npz"),
                                         "--summary-json", str(tmp_path / "s.json")], n=n))
    _assert_same(_params(tmp_path / "m.npz"), ref)
    assert read_json(tmp_path / "s.json")["lr"] == pytest.approx(ref_summary["lr"], rel=1e-12)


def test_the_schedule_is_the_same_on_zeromq_workers(tmp_path, one_process):
    ref, _ = one_process
    _ok(train(BASE + COSINE + PLATEAU + ["--backend", "zmq", "--workers", "2",
                                         "--output", str(tmp_path / "m.npz")], timeout=180))
    _assert_same(_params(tmp_path / "m.npz"), ref)


# --- early stopping ----------------------------------------------------------------------------------


def test_early_stopping_stops_alike_on_1_and_3_ranks_and_keeps_the_best_model(tmp_path):
    _ok(train_here(EARLY + ["--steps", "300", "--output", tmp_path / "one.npz",
                            "--summary-json", tmp_path / "one.json"]))
    one = read_json(tmp_path / "one.json")
    assert one["stopped_early"] and one["steps"] < 300 and not one["interrupted"]
    assert one["best_step"] == one["steps"] - 3 * 5  # three evaluations, five steps apart
    three_run = _ok(train(EARLY + ["--steps", "300", "--output", str(tmp_path / "three.npz"),
                                   "--summary-json", str(tmp_path / "three.json")], n=3))
    assert "stopped early" in three_run.stdout
    three = read_json(tmp_path / "three.json")
    assert (three["steps"], three["best_step"]) == (one["steps"], one["best_step"])
    assert three["best_val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-10)
    _assert_same(_params(tmp_path / "three.npz"), _params(tmp_path / "one.npz"))
    # the model is the parameters after best_step updates (the rate is constant)
    plain = [a for a in EARLY if a not in ("--early-stopping", "3")]
    _ok(train_here(plain + ["--steps", one["best_step"], "--output", tmp_path / "best.npz"]))
    _assert_same(_params(tmp_path / "one.npz"), _params(tmp_path / "best.npz"), atol=1e-12)
    assert one["val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-12)


# --- resume ---------------------------------------------------------------------------------------------


def _keep_up_to(directory: str, step: int) -> None:
    """As if the run had died after writing the checkpoint of `step`: drop the later ones."""
    for s, path in ckpt.list_checkpoints(directory):
        if s > step:
            os.unlink(path)


@pytest.mark.parametrize("extra,resume_at", [([], 20), (PLATEAU, 20)], ids=["cosine", "plateau"])
def test_a_resumed_scheduled_run_ends_where_an_uninterrupted_one_ends(tmp_path, extra, resume_at):
    d = str(tmp_path / "ck")
    args = BASE + COSINE + extra + ["--checkpoint-dir", d, "--checkpoint-every", "10"]
    _ok(train_here(args + ["--output", tmp_path / "ref.npz", "--summary-json", tmp_path / "ref.json"]))
    _keep_up_to(d, resume_at)
    if extra:  # the plateau reduced the rate before the resume point: that state must carry
        meta = ckpt.read_checkpoint(ckpt.checkpoint_path(d, resume_at)).meta
        assert meta["lr_plateau"][2] < 1
    res = _ok(train(args + ["--exchange", "shared", "--output", str(tmp_path / "res.npz"),
                            "--summary-json", str(tmp_path / "res.json")], n=2))
    assert "resuming from" in res.stderr and f"step {resume_at}" in res.stderr
    _assert_same(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz"))
    assert read_json(tmp_path / "res.json")["lr"] == read_json(tmp_path / "ref.json")["lr"]


def test_a_resumed_early_stopping_run_stops_where_an_uninterrupted_one_stops(tmp_path):
    d = str(tmp_path / "ck")
    args = EARLY + ["--steps", "300", "--checkpoint-dir", d, "--checkpoint-every", "1"]
    _ok(train_here(args + ["--output", tmp_path / "ref.npz", "--summary-json", tmp_path / "ref.json"]))
    ref = read_json(tmp_path / "ref.json")
    # resume after the best evaluation and two bad ones: the best parameters and the
    # count of bad evaluations come from the checkpoint
    resume_at = ref["steps"] - 2
    _keep_up_to(d, resume_at)
    found = ckpt.read_checkpoint(ckpt.checkpoint_path(d, resume_at))
    assert found.meta["early_stopping"][1:3] == [ref["best_step"], 2]
    res = _ok(train(args + ["--exchange", "shared", "--output", str(tmp_path / "res.npz"),
                            "--summary-json", str(tmp_path / "res.json")], n=2))
    assert f"step {resume_at}" in res.stderr
    got = read_json(tmp_path / "res.json")
    assert (got["steps"], got["best_step"], got["stopped_early"]) == (ref["steps"], ref["best_step"], True)
    # every rank holds the best parameters: the final pass over the data is theirs
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-10)
    _assert_same(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz"))
    # the same command once more: the run is complete, it writes the same model again
    again = _ok(train_here(args + ["--output", tmp_path / "again.npz"]))
    assert "resuming from" in again.stderr
    _assert_same(_params(tmp_path / "again.npz"), _params(tmp_path / "ref.npz"), atol=0)
    assert math.isfinite(got["best_val_loss"])


def test_a_service_job_takes_the_schedule_keys(tmp_path):
    keys = {"lr_schedule": "cosine", "warmup_steps": 5, "lr_min": 0.001, "val_fraction": 0.2,
            "eval_every": 10, "lr_plateau_patience": 2, "lr_plateau_factor": 0.5,
            "early_stopping": 3, "min_delta": 0.001}
    cfg = run_config(keys, str(tmp_path))
    assert {k: getattr(cfg, k) for k in keys} == keys
    with pytest.raises(UsageError, match="--early-stopping needs validation data"):
        run_config({"early_stopping": 3, "eval_every": 10}, str(tmp_path))


def test_a_checkpoint_with_malformed_early_stopping_state_is_one_line_error(tmp_path):
    d = str(tmp_path / "ck")
    args = EARLY + ["--steps", "20", "--checkpoint-dir", d, "--checkpoint-every", "10"]
    _ok(train_here(args))
    found = ckpt.read_checkpoint(ckpt.checkpoint_path(d, 20))
    meta = dict(found.meta, early_stopping=["x", 1, 2])
    ckpt.save_checkpoint(d, 20, found.params, found.state, meta, found.optimizer, found.extra)
    res = train_here(args[:args.index("20")] + ["30"] + args[args.index("20") + 1:])
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert "ckpt-00000020.npz" in line and "early-stopping state is malformed" in line


def test_a_run_interrupted_by_sigterm_resumes_with_schedule_plateau_and_early_stopping(tmp_path):
    d = str(tmp_path / "ck")
    # stops early near step 860 of 3000, after plateau reductions, on any number of ranks
    args = ["--data", "spiral", "--layers", "2,128,128,3", "--dtype", "float64", "--steps", "3000",
            "--val-fraction", "0.2", "--eval-every", "10", "--lr-schedule", "cosine",
            "--warmup-steps", "100", "--lr-min", "0.001", "--lr-plateau-patience", "5",
            "--lr-plateau-factor", "0.5", "--early-stopping", "60", "--log-every", "1",
            "--progress", "never", "--checkpoint-every", "100000"]
    _ok(train_here(args + ["--output", tmp_path / "ref.npz", "--summary-json", tmp_path / "ref.json"]))
    mine = args + ["--checkpoint-dir", d, "--output", str(tmp_path / "res.npz"),
                   "--summary-json", str(tmp_path / "res.json")]
    proc = subprocess.Popen(train_cmd(mine, n=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # wait until training is under way
            if unstamped(line).startswith("step 20/") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, rest
    (stopped_at, _), = ckpt.list_checkpoints(d)
    ref = read_json(tmp_path / "ref.json")
    assert 20 <= stopped_at < ref["steps"]
    res = _ok(train(mine, n=2))
    assert f"step {stopped_at}" in res.stderr
    got = read_json(tmp_path / "res.json")
    assert (got["steps"], got["best_step"], got["stopped_early"]) == (ref["steps"], ref["best_step"], True)
    assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
    _assert_same(_params(tmp_path / "res.npz"), _params(tmp_path / "ref.npz"))
