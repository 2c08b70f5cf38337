"""--exchange hierarchical: a shared window on each emulated host, one Allreduce per
local rank's part across hosts. Every result equals one process's (Adam, --clip-norm,
buckets during backward or one sum after it, a resumed run), the links carry the
sums, and hosts with different numbers of ranks are refused in one line."""
import numpy as np
import pytest

from cluster_helpers import make_cluster, train_across
from ddp import checkpoint as ckpt
from helpers import expect_error, load_model, read_json, train
from inproc import train_here

STEPS = 30
LAYERS = "2,64,64,3"
PARAMS = 2 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3   # the flat gradient, float64
KEYS = ("W0", "b0", "W1", "b1", "W2", "b2")
CLIP = ["--clip-norm", "0.5"]


@pytest.fixture(scope="module")
def net():
    net = make_cluster(3)
    yield net
    net.close()


def _args(tmp_path, name, extra=(), steps=STEPS):
    # 7-sample batches: shards of 2,2,2,1 over 4 ranks, 2,1,1,1,1,1 over 6
    return ["--data", "spiral", "--samples", "60", "--layers", LAYERS, "--activation", "tanh",
            "--batch-size", "7", "--steps", str(steps), "--dtype", "float64", "--lr", "0.1",
            "--optimizer", "adam", "--l2", "1e-3", "--val-fraction", "0.2", "--eval-every", "10",
            "--progress", "never", "--output", str(tmp_path / f"{name}.npz"),
            "--summary-json", str(tmp_path / f"{name}.json"), *extra]


def _one_process(tmp, name, extra=()):
    r = train_here(_args(tmp, name, extra))
    assert r.returncode == 0, r.stderr
    return load_model(tmp / f"{name}.npz"), read_json(tmp / f"{name}.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with --clip-norm; the clip acts (the run without it ends elsewhere)."""
    tmp = tmp_path_factory.mktemp("ref")
    clipped, unclipped = _one_process(tmp, "ref", CLIP), _one_process(tmp, "free")
    assert max(np.abs(clipped[0][k] - unclipped[0][k]).max() for k in KEYS) > 1e-3
    return clipped


def _assert_as_one_process(tmp_path, name, reference):
    ref, ref_summary = reference
    got, s = load_model(tmp_path / f"{name}.npz"), read_json(tmp_path / f"{name}.json")
    for k in KEYS:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-10, err_msg=k)
    assert s["val_loss"] == pytest.approx(ref_summary["val_loss"], abs=1e-10)
    assert s["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-10)
    return s


@pytest.mark.parametrize("bucket_mb", ["0.01", "0"], ids=["bucket-per-layer", "one-sum"])
@pytest.mark.parametrize("layout", [[2, 2], [2, 2, 2]], ids=["2x2", "3x2"])
def test_hierarchical_across_hosts_ends_with_the_one_process_parameters(net, reference, tmp_path,
                                                                        layout, bucket_mb):
    extra = ["--exchange", "hierarchical", "--bucket-mb", bucket_mb, *CLIP]
    res, sent = train_across(net, layout, _args(tmp_path, "got", extra), hosts=list(range(len(layout))))
    assert res.returncode == 0, res.stderr
    s = _assert_as_one_process(tmp_path, "got", reference)
    assert s["exchange"] == "hierarchical"
    assert s["world_size"] == sum(layout) and s["steps"] == STEPS
    # every part's Allreduce sends that part from each host at least once: the whole
    # gradient a step per host, so more than half of one did cross each link
    floor = STEPS * PARAMS * 8 // 2
    assert all(b > floor for b in sent.values()), (sent, floor)


def test_hierarchical_resumes_across_hosts_where_one_process_ends(net, reference, tmp_path):
    """The checkpoint holds rank 0's host's parameters and Adam moments; on resuming
    each local rank brings its part of them to the other host."""
    extra = ["--exchange", "hierarchical", "--bucket-mb", "0.01", *CLIP,
             "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "10"]
    first, _ = train_across(net, [2, 2], _args(tmp_path, "first", extra, steps=20), hosts=[0, 1])
    assert first.returncode == 0, first.stderr
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ck")] == [20, 10]
    second, _ = train_across(net, [2, 2], _args(tmp_path, "got", extra), hosts=[0, 1])
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr
    s = _assert_as_one_process(tmp_path, "got", reference)
    assert s["resumed_from_step"] == 20


def test_hosts_with_different_numbers_of_ranks_are_refused_in_one_line(net, tmp_path):
    res, _ = train_across(net, [1, 2], _args(tmp_path, "bad", ["--exchange", "hierarchical"]),
                          hosts=[0, 1])
    expect_error(res, "ddp-train", "--exchange hierarchical", "same number of ranks on every host",
                 "1 to 2", "--exchange allreduce")
    assert not (tmp_path / "bad.npz").exists()


def test_hierarchical_on_one_host_is_the_shared_window(reference, tmp_path):
    """Plain mpirun, no namespaces: one host, whose window is the whole exchange (the
    Allreduces across hosts have one member each)."""
    res = train(_args(tmp_path, "got", ["--exchange", "hierarchical", "--bucket-mb", "0.01", *CLIP]),
                n=2, timeout=180)
    assert res.returncode == 0, res.stderr
    assert _assert_as_one_process(tmp_path, "got", reference)["exchange"] == "hierarchical"


def test_an_unknown_exchange_names_the_choices(tmp_path):
    expect_error(train_here(_args(tmp_path, "x", ["--exchange", "ring"])), "ddp-train",
                 "--exchange 'ring'", "hierarchical")


@pytest.mark.parametrize("layout, chosen", [([2, 2], "hierarchical"), ([1, 1], "allreduce"),
                                            ([1, 2], "allreduce")], ids=["2x2", "2x1", "1+2"])
def test_auto_takes_the_hierarchy_when_every_host_has_the_same_several_ranks(net, reference, tmp_path,
                                                                              layout, chosen):
    res, _ = train_across(net, layout, _args(tmp_path, "got", ["--exchange", "auto", *CLIP]),
                          hosts=list(range(len(layout))))
    assert res.returncode == 0, res.stderr
    assert _assert_as_one_process(tmp_path, "got", reference)["exchange"] == chosen
