"""MPI across emulated hosts (network namespaces joined by a bridge): every result
equals one process's, and the byte counters of the links show that the gradients
crossed them (a run that moved them through shared memory fails)."""
import numpy as np
import pytest

from cluster_helpers import make_cluster, train_across
from ddp import cluster
from helpers import load_model, read_json
from inproc import train_here

STEPS = 30
LAYERS = "2,64,64,3"
PARAMS = 2 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3   # the flat gradient, float64
KEYS = ("W0", "b0", "W1", "b1", "W2", "b2")


@pytest.fixture(scope="module")
def net():
    net = make_cluster(3)
    yield net
    net.close()


def _args(tmp_path, name, extra=()):
    # 7-sample batches: shards of 4,3 over 2 ranks, 2,2,2,1 over 4, 3,2,2 over 3
    return ["--data", "spiral", "--samples", "60", "--layers", LAYERS, "--activation", "tanh",
            "--batch-size", "7", "--steps", str(STEPS), "--dtype", "float64", "--lr", "0.1",
            "--optimizer", "adam", "--l2", "1e-3", "--val-fraction", "0.2", "--eval-every", "10",
            "--progress", "never", "--output", str(tmp_path / f"{name}.npz"),
            "--summary-json", str(tmp_path / f"{name}.json"), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    r = train_here(_args(tmp, "ref"))
    assert r.returncode == 0, r.stderr
    return load_model(tmp / "ref.npz"), read_json(tmp / "ref.json")


@pytest.mark.parametrize("exchange", ["allreduce", "auto"])
@pytest.mark.parametrize("layout", [[1, 1], [2, 2], [1, 1, 1]], ids=["2x1", "2x2", "3x1"])
def test_ranks_on_several_hosts_end_with_the_one_process_parameters(net, reference, tmp_path,
                                                                      layout, exchange):
    extra = ["--exchange", exchange, "--bucket-mb", "0.01"]   # a bucket per layer, in backward
    res, sent = train_across(net, layout, _args(tmp_path, "got", extra), hosts=list(range(len(layout))))
    assert res.returncode == 0, res.stderr
    ref, ref_summary = reference
    got, s = load_model(tmp_path / "got.npz"), read_json(tmp_path / "got.json")
    assert s["world_size"] == sum(layout) and s["steps"] == STEPS
    # auto never takes the shared window across hosts; with several ranks on each, the hierarchy
    assert s["exchange"] == ("hierarchical" if exchange == "auto" and layout == [2, 2] else "allreduce")
    for k in KEYS:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-10, err_msg=k)
    assert s["val_loss"] == pytest.approx(ref_summary["val_loss"], abs=1e-10)
    # each host sent at least half a gradient a step over its link (an Allreduce of
    # two parts sends a whole one), so the sums did cross the links
    floor = STEPS * PARAMS * 8 // 2
    assert all(b > floor for b in sent.values()), (sent, floor)


def test_ranks_on_one_emulated_host_share_memory_and_leave_the_link_idle(net, tmp_path):
    """The control of the counters: two ranks on one host take the shared window, and
    their link carries almost nothing."""
    res, sent = train_across(net, [2], _args(tmp_path, "one"), hosts=[0])
    assert res.returncode == 0, res.stderr
    assert read_json(tmp_path / "one.json")["exchange"] == "shared"
    assert sent[0] < STEPS * PARAMS * 8 // 20, sent


def test_link_specs_parse_and_bad_ones_say_what_is_expected():
    assert cluster.parse_link("1gbit") == cluster.Link(1e9, 0.0)
    assert cluster.parse_link("10gbit,0.5%") == cluster.Link(1e10, 0.5)
    assert cluster.parse_link("unshaped,1%") == cluster.Link(None, 1.0)
    assert str(cluster.parse_link("100mbit,2%")) == "100mbit,2%"
    for bad, said in (("1gb", "link rate"), ("fast", "link rate"), ("0gbit", "link rate"),
                      ("1gbit,x%", "link loss"), ("1gbit,100%", "link loss")):
        with pytest.raises(cluster.UsageError, match=said):
            cluster.parse_link(bad)
