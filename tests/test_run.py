"""The shared run, the MPI loop and the exchange in process: one Run, fed the sums of
a step by the MPI loop or by workers' shards added in shard order (as the ZeroMQ
coordinator adds them), ends with the same parameters whoever computed which rows."""
import math

import numpy as np
import pytest

from helpers import load_model
from ddp.coordinator.exchange import LocalExchange
from ddp.coordinator.mpi import LocalComm
from ddp.coordinator.run import Evaluator, Run
from ddp.coordinator.trainer import train
from ddp.config import Config, validate
from ddp.log import Log
from ddp.optim import SGD
from ddp.setup import prepare
from ddp.signals import StopRequest
from inproc import isolated, train_here
from ddp.worker.compute import ShardCompute

BASE = dict(data="spiral", samples=50, layers=(2, 16, 8, 3), activation="tanh", batch_size=7,
            steps=30, dtype="float64", lr=0.2, l2=1e-3, momentum=0.5, progress="never")


def _setup(**kw):
    cfg = Config(**dict(BASE, **kw))
    validate(cfg)
    return prepare(cfg)


def _quiet_log():
    return Log(0, "ddp-train", level="error")


def run_with_fake_workers(setup, workers: int) -> np.ndarray:
    """The step as the ZeroMQ coordinator takes it: each of `workers` computes rows
    [lo, hi) of the global batch into a buffer of its own; the sums are added in shard
    order into the exchange's gradient; the run applies the update."""
    cfg, layout = setup.cfg, setup.layout
    dtype = np.dtype(cfg.dtype)
    exchange = LocalExchange(layout.size, 0, dtype)
    compute = ShardCompute(layout, cfg.activation, cfg.loss, dtype, cfg.batch_size)
    run = Run(setup, _quiet_log(), exchange, Evaluator(setup, compute, exchange))
    run.begin(run.load_start())
    from ddp import data as ddata
    reader = ddata.BatchReader(setup.train, setup.schedule, cfg.batch_size, dtype, None, None)
    sums = [np.empty(layout.size, dtype) for _ in range(workers)]
    run.start_clock()
    while not run.done:
        n = setup.schedule.batch_len(run.step)
        loss = correct = 0.0
        for w in range(workers):
            x, y = reader.batch_part(run.step, *ddata.shard_bounds(n, workers, w))
            sums[w][:] = 0
            part_loss, part_correct = compute.grad_sums_(run.params_views, layout.views(sums[w]), x, y)
            loss, correct = loss + part_loss, correct + part_correct
        np.copyto(exchange.grad, sums[0])
        for s in sums[1:]:
            exchange.grad += s
        run.update_(loss, correct, n, 0.0, 0.0, 0.0)
    run.finish(StopRequest())
    return run.params.copy()


def mpi_loop_params(tmp_path, **kw) -> np.ndarray:
    """The MPI loop on one process (LocalComm), through `train`, its model file read back."""
    setup = _setup(output=str(tmp_path / "m.npz"), **kw)
    with isolated():
        train(setup, LocalComm(), _quiet_log(), StopRequest(), 0.0)
    m = load_model(tmp_path / "m.npz")
    return np.concatenate([m[k].ravel() for k in ("W0", "b0", "W1", "b1", "W2", "b2")])


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_workers_shards_summed_in_order_give_the_mpi_loop_parameters(tmp_path, workers):
    """7-sample batches: 7 workers take one row each; 50 samples end in a short batch."""
    ref = mpi_loop_params(tmp_path)
    got = run_with_fake_workers(_setup(), workers)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


ARGS = ["--data", "spiral", "--samples", "50", "--layers", "2,16,8,3", "--activation", "tanh",
        "--batch-size", "7", "--dtype", "float64", "--lr", "0.2", "--l2", "1e-3", "--momentum", "0.5"]


def test_a_resumed_run_ends_where_the_uninterrupted_one_ends(tmp_path):
    """12 steps with checkpoints, then the same job to step 30: the parameters and the
    momentum state come back from the checkpoint exactly."""
    whole = mpi_loop_params(tmp_path)
    ck = ["--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "5"]
    first = train_here(ARGS + ck + ["--steps", "12"])
    assert first.returncode == 0, first.stderr
    res = train_here(ARGS + ck + ["--steps", "30", "--output", tmp_path / "resumed.npz"])
    assert res.returncode == 0 and "at step 12" in res.stderr, res.stderr
    m = load_model(tmp_path / "resumed.npz")
    got = np.concatenate([m[k].ravel() for k in ("W0", "b0", "W1", "b1", "W2", "b2")])
    np.testing.assert_array_equal(got, whole)


def test_local_exchange_applies_the_optimizer_to_the_summed_gradient():
    """apply_ = the optimizer on the whole gradient sum; the norm only when asked for."""
    setup = _setup()
    layout = setup.layout
    rng = np.random.default_rng(3)
    g = rng.standard_normal(layout.size)
    ex = LocalExchange(layout.size, 4, np.float64)
    ex.params[:] = rng.standard_normal(layout.size)
    p0 = ex.params.copy()
    opt = SGD(layout, np.float64, 0.1, 0.9, 1e-2, ex.optimizer_state(SGD.slots))
    ref = SGD(layout, np.float64, 0.1, 0.9, 1e-2)
    ex.grad[:] = g
    assert ex.apply_(opt, 5, norm_due=lambda: False) is None
    ex.grad[:] = g
    norm = ex.apply_(opt, 5, norm_due=lambda: True)
    assert norm == pytest.approx(math.sqrt(float(g @ g)), rel=1e-12)
    want = p0.copy()
    ref.step_(want, g.copy(), 5)
    ref.step_(want, g.copy(), 5)
    np.testing.assert_array_equal(ex.params, want)
    np.testing.assert_array_equal(opt.velocity, ref.velocity)
    assert opt.state.shape == (1, layout.size) and np.shares_memory(opt.velocity, opt.state)


def test_a_diverging_step_stops_before_it_is_applied():
    """A NaN batch loss raises before the exchange moves anything."""
    from ddp.errors import DivergedError
    setup = _setup()
    ex = LocalExchange(setup.layout.size, 0, np.float64)
    compute = ShardCompute(setup.layout, "tanh", "cross-entropy", np.float64, 7)
    run = Run(setup, _quiet_log(), ex, Evaluator(setup, compute, ex))
    run.begin(run.load_start())
    before = run.params.copy()
    ex.grad[:] = 1.0
    run.start_clock()
    with pytest.raises(DivergedError, match="loss became nan at step 1"):
        run.update_(float("nan"), 0.0, 7, 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(run.params, before)
    assert run.step == 0
