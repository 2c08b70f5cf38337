"""ddp-predict reads its data through ddp.data's loader, as training does; only the
targets are optional (an .npz without y, a CSV without its target column)."""
import numpy as np
import pytest

from helpers import expect_error
from ddp import data as ddata
from ddp.config import Config
from ddp.errors import DataError
from inproc import predict_here, train_here


def _write_csv(path, table: np.ndarray) -> None:
    header = ",".join(f"c{i}" for i in range(table.shape[1]))
    np.savetxt(path, table, delimiter=",", header=header, comments="")


@pytest.fixture
def table():
    rng = np.random.default_rng(3)
    return np.c_[rng.standard_normal((12, 4)), rng.integers(0, 3, 12)]


def test_a_csv_with_its_target_column_reads_as_for_training(tmp_path, table):
    path = tmp_path / "d.csv"
    _write_csv(path, table)
    X, y = ddata.load_table(str(path), Config(), need_y=False, n_inputs=4)
    X_train, y_train = ddata.load_csv(str(path))
    np.testing.assert_array_equal(X, X_train)
    np.testing.assert_array_equal(y, y_train)
    np.testing.assert_array_equal(X, table[:, :4])
    np.testing.assert_array_equal(y, table[:, 4])


def test_a_csv_as_wide_as_the_inputs_has_no_targets(tmp_path, table):
    path = tmp_path / "x.csv"
    _write_csv(path, table[:, :4])
    X, y = ddata.load_table(str(path), Config(), need_y=False, n_inputs=4)
    assert y is None
    np.testing.assert_array_equal(X, table[:, :4])


def test_training_still_needs_the_target_column(tmp_path, table):
    path = tmp_path / "one.csv"
    _write_csv(path, table[:, :1])
    with pytest.raises(DataError, match="needs at least one input column and the target column"):
        ddata.load_table(str(path), Config())


def test_an_npz_without_y_has_no_targets(tmp_path, table):
    path = tmp_path / "x.npz"
    np.savez(path, X=table[:, :4])
    X, y = ddata.load_table(str(path), Config(), need_y=False, n_inputs=4)
    assert y is None
    np.testing.assert_array_equal(X, table[:, :4])


def test_predict_gives_the_same_answers_from_npz_and_csv(tmp_path, classification_npz):
    model = tmp_path / "m.npz"
    r = train_here(["--data", classification_npz, "--steps", "20", "--output", model, "--quiet"])
    assert r.returncode == 0, r.stderr
    with np.load(classification_npz) as f:
        X, y = f["X"], f["y"]
    _write_csv(tmp_path / "xy.csv", np.c_[X, y])
    _write_csv(tmp_path / "x.csv", X)
    lines, preds = {}, {}
    for name, data in (("npz", classification_npz), ("xy", tmp_path / "xy.csv"),
                       ("x", tmp_path / "x.csv")):
        out = tmp_path / f"{name}.npy"
        r = predict_here(["--model", model, "--data", data, "--output", out])
        assert r.returncode == 0, r.stderr
        lines[name] = r.stdout.splitlines()[0]
        preds[name] = np.load(out)
    assert lines["npz"] == lines["xy"] and lines["npz"].startswith("90 samples: loss ")
    assert lines["x"].startswith("predictions (class indices) for 90 samples written to ")
    np.testing.assert_array_equal(preds["npz"], preds["xy"])
    np.testing.assert_array_equal(preds["npz"], preds["x"])


def test_a_csv_of_the_wrong_width_is_refused_in_one_line(tmp_path, classification_npz):
    model = tmp_path / "m.npz"
    r = train_here(["--data", classification_npz, "--steps", "2", "--output", model, "--quiet"])
    assert r.returncode == 0, r.stderr
    _write_csv(tmp_path / "wide.csv", np.zeros((3, 7)))
    r = predict_here(["--model", model, "--data", tmp_path / "wide.csv", "--output",
                      tmp_path / "p.npy"])
    expect_error(r, "ddp-predict", "samples have 6 features, the model expects 4")
    assert not (tmp_path / "p.npy").exists()
