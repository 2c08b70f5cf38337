"""Data loading, splits and the schedule, without MPI."""
import numpy as np
import pytest

from ddp import data as ddata
from ddp.config import Config


@pytest.mark.parametrize("n,world", [(10, 3), (7, 7), (3, 5), (256, 2), (0, 2)])
def test_shards_are_contiguous_near_equal_and_cover_the_batch(n, world):
    bounds = [ddata.shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_schedule_epochs_are_seeded_permutations_with_a_short_last_batch():
    s = ddata.Schedule(n_train=10, batch_size=4, seed=1)
    assert s.steps_per_epoch == 3
    assert s.locate(2) == (0, 8, 10) and s.locate(3) == (1, 0, 4)
    e0, e1 = s.epoch_order(0), s.epoch_order(1)
    assert sorted(e0) == list(range(10)) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, ddata.Schedule(10, 4, 1).epoch_order(0))
    assert ddata.Schedule(10, 4, 1, shuffle=False).epoch_order(0) is None


def test_a_global_batch_is_the_same_samples_whatever_the_world_size():
    X = np.arange(40, dtype=np.float64).reshape(20, 2)
    data = ddata.Dataset(X, np.zeros(20, dtype=np.intp), "t")
    sched = ddata.Schedule(20, 7, seed=3)
    for step in range(6):
        rows = {}
        for world in (1, 2, 3, 5):
            parts = []
            for r in range(world):
                reader = ddata.BatchReader(data, sched, 7, np.float64)
                x, _ = reader.shard(step, r, world)
                parts.append(x.copy())
            rows[world] = np.concatenate(parts)
        for world in (2, 3, 5):
            np.testing.assert_array_equal(rows[world], rows[1])


def test_uncompressed_npz_is_memory_mapped_and_compressed_still_loads(tmp_path):
    X = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    y = np.arange(50) % 3
    np.savez(tmp_path / "plain.npz", X=X, y=y)
    np.savez_compressed(tmp_path / "packed.npz", X=X, y=y)
    Xm, ym = ddata.load_npz(str(tmp_path / "plain.npz"))
    assert isinstance(Xm, np.memmap)
    np.testing.assert_array_equal(Xm, X)
    np.testing.assert_array_equal(ym, y)
    Xc, _ = ddata.load_npz(str(tmp_path / "packed.npz"))
    np.testing.assert_array_equal(Xc, X)


def test_csv_with_header_and_target_last(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n0.5,1.0,1\n-1,2,0\n")
    X, y = ddata.load_csv(str(path))
    np.testing.assert_array_equal(X, [[0.5, 1.0], [-1, 2]])
    np.testing.assert_array_equal(y, [1, 0])


def test_spiral_digits_and_random_are_deterministic():
    X, y = ddata.spiral(100, seed=0)
    assert X.shape == (300, 2) and set(y) == {0, 1, 2}
    np.testing.assert_array_equal(X, ddata.spiral(100, seed=0)[0])
    Xd, yd = ddata.digits()
    assert Xd.shape == (1797, 64) and Xd.min() == 0 and Xd.max() == 1 and set(yd) == set(range(10))
    Xr, yr = ddata.random_data("random:64", (5, 3), "cross-entropy", 0, "float32")
    assert Xr.shape == (64, 5) and Xr.dtype == np.float32 and yr.max() < 3


def test_validation_split_is_seeded_and_disjoint():
    cfg = Config(data="spiral", val_fraction=0.2)
    data, _ = ddata.load("spiral", cfg)
    train, val = ddata.split(data, 0.2, seed=0)
    assert len(train) == 240 and len(val) == 60
    assert not set(train.rows) & set(val.rows)
    np.testing.assert_array_equal(ddata.split(data, 0.2, seed=0)[1].rows, val.rows)


def test_standardization_uses_training_rows_only():
    X = np.array([[0.0, 5.0], [2.0, 5.0], [100.0, 5.0]])
    data = ddata.Dataset(X, np.zeros(3, dtype=np.intp), "t").subset(np.array([0, 1]))
    mean, std = ddata.standardization(data)
    np.testing.assert_allclose(mean, [1.0, 5.0])
    np.testing.assert_allclose(std, [1.0, 1.0])  # constant column: std 0 -> 1


def test_shards_of_a_memory_mapped_npz_member_are_the_right_rows(tmp_path):
    """np.savez members sit at unaligned offsets in the zip; gathers must still read only their rows."""
    X = np.random.default_rng(1).standard_normal((300, 7)).astype(np.float32)
    y = np.arange(300) % 4
    np.savez(tmp_path / "d.npz", X=X, y=y)
    Xm, ym = ddata.load_npz(str(tmp_path / "d.npz"))
    assert isinstance(Xm, np.memmap)
    data = ddata.Dataset(Xm, ym, "d").subset(np.arange(10, 300))
    sched = ddata.Schedule(len(data), 32, seed=0)
    reader = ddata.BatchReader(data, sched, 16, np.float32)
    for step in range(12):
        epoch, start, stop = sched.locate(step)
        lo, hi = ddata.shard_bounds(stop - start, 2, 1)
        rows = 10 + sched.epoch_order(epoch)[start + lo:start + hi]
        x, yy = reader.shard(step, 1, 2)
        np.testing.assert_array_equal(x, X[rows])
        np.testing.assert_array_equal(yy, y[rows])
