"""ddp.Model: a model file written by ddp-train, read, applied and written again."""
import numpy as np
import pytest

from helpers import load_model
from inproc import predict_here, train_here

from ddp import Model
from ddp.errors import DataError


@pytest.fixture
def cli_model(tmp_path):
    out = tmp_path / "model.npz"
    res = train_here(["--data", "digits", "--layers", "64,16,10", "--steps", "5", "--standardize",
                      "--output", out], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return out


def test_round_trip_of_a_cli_model_file(cli_model, tmp_path):
    model = Model.load(str(cli_model))
    again = tmp_path / "again.npz"
    model.save(str(again))
    reread = Model.load(str(again))
    original = load_model(cli_model)
    assert set(reread.params) == {k for k in original if k != "config"}
    for name, a in reread.params.items():
        np.testing.assert_array_equal(a, original[name])
    assert reread.config == model.config
    assert model.config["standardize"]  # the standardization is part of what round-trips


def test_predictions_equal_ddp_predicts(cli_model, tmp_path):
    from ddp.data import digits

    X, y = digits()
    res = predict_here(["--model", cli_model, "--data", "digits", "--output", tmp_path / "p.npy"],
                       cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    model = Model.load(str(cli_model))
    np.testing.assert_array_equal(model.predict(X), np.load(tmp_path / "p.npy"))
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(axis=1), model.predict(X))
    accuracy = float(res.stdout.split("accuracy ")[1].split()[0])
    assert model.score(X, y) == pytest.approx(accuracy, abs=1e-4)


def test_a_file_that_is_no_model_raises_data_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros(3))
    with pytest.raises(DataError, match="has no 'config' entry"):
        Model.load(str(bad))


def test_r2_of_a_regression_model(tmp_path):
    out = tmp_path / "reg.npz"
    res = train_here(["--data", "random:200", "--layers", "4,8,1", "--loss", "mse", "--steps", "20",
                      "--output", out], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    model = Model.load(str(out))
    X = np.random.default_rng(0).normal(size=(50, 4))
    z = model.predict(X)
    assert model.score(X, z) == 1.0
    with pytest.raises(ValueError, match="cross-entropy"):
        model.predict_proba(X)
