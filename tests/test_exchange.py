"""The pieces of the gradient exchange that need no MPI: bucket plans and the
optimizer applied to one part of the parameters."""
import numpy as np
import pytest

from ddp.coordinator.exchange import Bucket, plan_buckets
from ddp.model import Layout
from ddp.optim import SGD


def spans(layers, head=16):
    return [(head + lo, head + hi) for lo, hi in Layout(layers).layer_spans()]


def test_layer_spans_cover_the_flat_buffer_in_order():
    layout = Layout((784, 1024, 1024, 10))
    s = layout.layer_spans()
    assert s[0][0] == 0 and s[-1][1] == layout.size
    assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
    assert [hi - lo for lo, hi in s] == [784 * 1024 + 1024, 1024 * 1024 + 1024, 1024 * 10 + 10]
    assert Layout((3, 4, 2), bias=False).layer_spans() == [(0, 12), (12, 20)]


def test_zero_gives_one_bucket_over_everything():
    assert plan_buckets(spans((784, 256, 10)), 16 + 203530, 0) == [Bucket(0, 16 + 203530, None)]


@pytest.mark.parametrize("layers", [(784, 1024, 1024, 10), (2, 8, 8, 8, 8, 3), (5, 3)])
@pytest.mark.parametrize("elems", [1, 100, 10**6, 10**9])
def test_buckets_tile_the_buffer_last_layers_first(layers, elems):
    sp = spans(layers)
    size = sp[-1][1]
    plan = plan_buckets(sp, size, elems)
    # contiguous, from the end of the buffer down to 0 (the stats head joins the last)
    assert plan[0].hi == size and plan[-1].lo == 0
    assert all(a.lo == b.hi for a, b in zip(plan, plan[1:]))
    assert plan[-1].after is None  # layer 0 finishes backward: started by wait()
    for b in plan[:-1]:
        assert b.lo == sp[b.after][0]  # starts once its lowest layer is written
        assert b.hi - b.lo >= elems
    starts = [b.after for b in plan[:-1]]
    assert starts == sorted(starts, reverse=True) and 0 not in starts


def test_tiny_buckets_give_one_per_layer():
    sp = spans((784, 1024, 1024, 10))
    plan = plan_buckets(sp, sp[-1][1], 1)
    assert [b.after for b in plan] == [2, 1, None]


@pytest.mark.parametrize("momentum,l2", [(0, 0), (0.9, 0), (0, 1e-2), (0.9, 1e-2)])
def test_sgd_on_parts_equals_sgd_on_the_whole(momentum, l2):
    layout = Layout((6, 5, 3))
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(layout.size)
    v0 = rng.standard_normal(layout.size)
    g = rng.standard_normal(layout.size)
    whole = SGD(layout, np.float64, 0.1, momentum, l2)
    whole.velocity[:] = v0
    pw = p0.copy()
    whole.step_(pw, g.copy(), 7)
    parts = SGD(layout, np.float64, 0.1, momentum, l2)
    parts.velocity[:] = v0
    pp = p0.copy()
    cuts = [0, 4, 29, 30, 31, layout.size]  # parts that cut through W and b blocks
    for lo, hi in zip(cuts, cuts[1:]):
        parts.step_(pp, g[lo:hi].copy(), 7, lo=lo)
    np.testing.assert_array_equal(pp, pw)
    np.testing.assert_array_equal(parts.velocity, whole.velocity)
