"""The math, without MPI: finite-difference gradient checks of every activation ×
loss × bias combination in float64, loss semantics, the flat-buffer layout, SGD."""
import itertools

import numpy as np
import pytest

from ddp.model import ACTIVATIONS, LOSSES, Layout, init_params_, log_softmax, loss_sum
from ddp.optim import SGD
from ddp.worker.compute import ShardCompute

LAYERS = (4, 5, 3, 3)


def _problem(loss, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, LAYERS[0]))
    if loss == "cross-entropy":
        y = rng.integers(0, LAYERS[-1], n)
    else:
        y = rng.standard_normal((n, LAYERS[-1]))
    return x, y


def _total_loss(compute, layout, flat, x, y):
    z = compute.forward(layout.views(flat), x)
    return loss_sum(compute.loss_name, z, y)


@pytest.mark.parametrize("activation,loss,bias", list(itertools.product(ACTIVATIONS, LOSSES, [True, False])))
def test_gradient_matches_finite_differences(activation, loss, bias):
    layout = Layout(LAYERS, bias)
    flat = np.empty(layout.size)
    init_params_(flat, layout, activation, seed=3)
    if bias:  # non-zero biases so their gradient is exercised away from zero
        for _, b in layout.views(flat):
            b[...] = np.random.default_rng(1).standard_normal(b.shape) * 0.1
    x, y = _problem(loss)
    compute = ShardCompute(layout, activation, loss, np.float64, max_rows=len(x))
    grad = np.empty(layout.size)
    loss_value, _ = compute.grad_sums_(layout.views(flat), layout.views(grad), x, y)
    assert loss_value == pytest.approx(_total_loss(compute, layout, flat, x, y), rel=1e-12)

    eps = 1e-6
    numeric = np.empty(layout.size)
    for k in range(layout.size):
        old = flat[k]
        flat[k] = old + eps
        up = _total_loss(compute, layout, flat, x, y)
        flat[k] = old - eps
        down = _total_loss(compute, layout, flat, x, y)
        flat[k] = old
        numeric[k] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_cross_entropy_is_mean_negative_log_softmax_and_stable():
    z = np.array([[1000.0, 0.0, -1000.0], [0.5, 0.2, 0.1]])
    y = np.array([0, 2])
    expected = -(log_softmax(z)[0, 0] + log_softmax(z)[1, 2])
    assert np.isfinite(expected)
    assert loss_sum("cross-entropy", z, y) == pytest.approx(expected)
    # gradient of the sum: softmax - onehot
    delta = z.copy()
    LOSSES["cross-entropy"](delta, y)
    p = np.exp(log_softmax(z))
    p[[0, 1], y] -= 1
    np.testing.assert_allclose(delta, p)


def test_squared_error_is_half_sum_of_squares_per_sample():
    z = np.array([[1.0, 2.0], [0.0, -1.0]])
    t = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert loss_sum("mse", z, t) == pytest.approx(0.5 * (1 + 4 + 1 + 4))
    z1 = np.array([[3.0], [1.0]])
    assert loss_sum("mse", z1, np.array([1.0, 1.0])) == pytest.approx(2.0)  # (N,) targets, 1 output


def test_layout_views_share_one_flat_buffer():
    layout = Layout((3, 4, 2), bias=True)
    assert layout.size == 3 * 4 + 4 + 4 * 2 + 2
    flat = np.arange(layout.size, dtype=np.float64)
    (W0, b0), (W1, b1) = layout.views(flat)
    assert W0.shape == (3, 4) and b0.shape == (4,) and W1.shape == (4, 2) and b1.shape == (2,)
    for v in (W0, b0, W1, b1):
        assert np.shares_memory(v, flat)
    W1[0, 0] = -1
    assert flat[16] == -1
    no_bias = Layout((3, 4, 2), bias=False)
    assert no_bias.size == 12 + 8 and all(b is None for _, b in no_bias.views(np.zeros(20)))


def test_empty_shard_gives_zero_sums():
    layout = Layout((3, 4, 2))
    flat = np.ones(layout.size)
    grad = np.full(layout.size, 7.0)
    compute = ShardCompute(layout, "relu", "cross-entropy", np.float64, 4)
    loss, correct = compute.grad_sums_(layout.views(flat), layout.views(grad),
                                       np.zeros((0, 3)), np.zeros(0, dtype=np.intp))
    assert (loss, correct) == (0.0, 0) and not grad.any()


def test_sgd_momentum_and_l2_follow_the_formulas():
    layout = Layout((2, 1), bias=True)  # W0 (2,1), b0 (1,)
    params = np.array([1.0, -2.0, 0.5])
    opt = SGD(layout, np.float64, lr=0.1, momentum=0.9, l2=0.01)
    g_sum = np.array([4.0, 2.0, 6.0])  # summed over n=2 samples
    opt.step_(params, g_sum.copy(), 2)
    g = np.array([2.0, 1.0, 3.0]) + 0.01 * np.array([1.0, -2.0, 0.0])  # L2 on W only
    v1 = g
    np.testing.assert_allclose(opt.velocity, v1)
    np.testing.assert_allclose(params, np.array([1.0, -2.0, 0.5]) - 0.1 * v1)
    before = params.copy()
    opt.step_(params, g_sum.copy(), 2)
    g2 = np.array([2.0, 1.0, 3.0]) + 0.01 * np.array([before[0], before[1], 0.0])
    v2 = 0.9 * v1 + g2
    np.testing.assert_allclose(params, before - 0.1 * v2)
    assert opt.l2_penalty(params) == pytest.approx(0.5 * 0.01 * (params[0] ** 2 + params[1] ** 2))


def test_plain_sgd_divides_by_the_global_count():
    layout = Layout((2, 1), bias=False)
    params = np.array([1.0, 1.0])
    SGD(layout, np.float64, lr=0.5).step_(params, np.array([3.0, 6.0]), 3)
    np.testing.assert_allclose(params, [0.5, 0.0])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_default_init_scale(activation):
    layout = Layout((400, 300, 10))
    flat = np.empty(layout.size)
    init_params_(flat, layout, activation, seed=0)
    W0 = layout.views(flat)[0][0]
    expected = np.sqrt(2 / 400) if activation == "relu" else np.sqrt(2 / (400 + 300))
    assert W0.std() == pytest.approx(expected, rel=0.05)
    again = np.empty(layout.size)
    init_params_(again, layout, activation, seed=0)
    np.testing.assert_array_equal(flat, again)
