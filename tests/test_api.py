"""ddp.train: the same run as ddp-train, in process, under mpirun and on ZeroMQ workers;
its errors are the CLI's, raised; the arrays' temporary file goes afterwards."""
import os
import tempfile

import numpy as np
import pytest
from helpers import MPIRUN, PY, load_model, one_error_line, run
from inproc import deadline, isolated, train_here

import ddp
from ddp.errors import DataError, DDPError, UsageError

ATOL = 1e-10
KEYS = dict(layers=[64, 16, 10], optimizer="adam", lr=0.01, batch_size=40, epochs=2,
            dtype="float64", seed=3)
FLAGS = ["--layers", "64,16,10", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "40",
         "--epochs", "2", "--dtype", "float64", "--seed", "3"]


@pytest.fixture
def arrays(tmp_path):
    """The first 400 digits with weights, as arrays and as the data file ddp-train reads."""
    from ddp.data import digits

    X, y = digits()
    X, y = X[:400], y[:400]
    w = np.linspace(0.5, 1.5, len(X))
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=y, w=w)
    return X, y, w, path


@pytest.fixture
def reference(arrays, tmp_path):
    """The parameters ddp-train gives for KEYS on the data file."""
    out = tmp_path / "ref.npz"
    res = train_here(["--data", arrays[3], *FLAGS, "--output", out], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return {k: v for k, v in load_model(out).items() if k != "config"}


def assert_same(params: dict, reference: dict) -> None:
    assert set(params) == set(reference)
    for name, a in reference.items():
        np.testing.assert_allclose(params[name], a, rtol=0, atol=ATOL, err_msg=name)


def train_in_process(**kw):
    with deadline(), isolated():
        return ddp.train(**kw)


def test_in_process_equals_ddp_train(arrays, reference):
    X, y, w, _ = arrays
    result = train_in_process(X=X, y=y, sample_weight=w, verbose=False, **KEYS)
    assert_same(result.model.params, reference)
    assert result.model.config["training"]["data"] is None  # the arrays' file is gone
    assert result.summary["steps"] == 20 and not result.summary["interrupted"]
    steps = result.steps
    assert steps and steps[-1]["step"] == 20 and all("loss" in s for s in steps)


def test_keys_from_a_toml_file_overridden_by_keywords(arrays, reference, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{arrays[3]}"\nlayers = [64, 16, 10]\noptimizer = "adam"\nlr = 0.5\n'
                    f'batch_size = 40\nepochs = 2\ndtype = "float64"\nseed = 3\n')
    result = train_in_process(config=str(toml), lr=0.01, verbose=False)
    assert_same(result.model.params, reference)


SCRIPT = """\
import os
import sys
import numpy as np
import ddp
from ddp.data import digits

X, y = digits()
X, y = X[:400], y[:400]
w = np.linspace(0.5, 1.5, len(X))
keys = {keys!r}
result = ddp.train(X=X, y=y, sample_weight=w, verbose=False, **keys, **{extra!r})
rank = int(os.environ.get("PMI_RANK", "0"))  # MPICH's mpirun names each rank
np.savez(sys.argv[1] + f"-{{rank}}.npz", world=result.summary["world_size"], **result.model.params)
"""


def run_script(tmp_path, extra: dict, n: int | None = None):
    """The script on n ranks (alone without n), its temporary files in tmp_path/tmp,
    which is left empty."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(keys=KEYS, extra=extra))
    cmd = [PY, str(script), str(tmp_path / "params")]
    if n is not None:
        if MPIRUN is None:
            pytest.skip("no mpirun/mpiexec found (pip install mpich)")
        cmd = [MPIRUN, "-n", str(n), *cmd]
    res = run(cmd, timeout=180, cwd=tmp_path, env=dict(os.environ, TMPDIR=str(scratch)))
    assert res.returncode == 0, res.stderr
    assert os.listdir(scratch) == []  # the arrays' file (and the workers' sockets) went


def saved(path) -> tuple[int, dict]:
    arrays = load_model(path)
    return int(arrays.pop("world")), arrays


def test_every_rank_under_mpirun_trains_together(tmp_path, reference):
    run_script(tmp_path, {}, n=2)
    for rank in (0, 1):  # every rank has the trained model
        world, params = saved(tmp_path / f"params-{rank}.npz")
        assert world == 2
        assert_same(params, reference)


def test_zmq_workers(tmp_path, reference):
    run_script(tmp_path, {"backend": "zmq", "workers": 2})
    world, params = saved(tmp_path / "params-0.npz")
    assert world == 2
    assert_same(params, reference)


def cli_error(args, tmp_path) -> str:
    res = train_here(args, cwd=tmp_path)
    assert res.returncode == 2
    return one_error_line(res.stderr).split("ddp-train: error: ", 1)[1]


@pytest.mark.parametrize("keys, flags, kind", [
    ({"lr": -1.0}, ["--lr", "-1"], UsageError),
    ({"layers": [3, 10]}, ["--layers", "3,10"], DataError),
    ({"optimizer": "adam", "momentum": 0.5}, ["--optimizer", "adam", "--momentum", "0.5"], UsageError),
])
def test_errors_raise_the_cli_message(keys, flags, kind, tmp_path):
    expected = cli_error(["--data", "digits", *flags], tmp_path)
    with pytest.raises(kind) as raised:
        train_in_process(data="digits", verbose=False, **keys)
    assert str(raised.value) == expected
    assert isinstance(raised.value, DDPError)


def test_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(UsageError, match="ddp.train: unknown key 'lrr'; did you mean 'lr'"):
        train_in_process(data="digits", lrr=0.1)
    with pytest.raises(UsageError, match="ddp.train: epochs must be an int, got 'two'"):
        train_in_process(data="digits", epochs="two")
    with pytest.raises(UsageError, match="--workers 0 starts no workers"):
        train_in_process(data="digits", backend="zmq", workers=0)
    with pytest.raises(UsageError, match="not both"):
        train_in_process(data="digits", X=np.zeros((3, 2)), y=np.zeros(3))


def test_the_arrays_file_is_removed_afterwards(arrays, tmp_path, monkeypatch):
    X, y, w, _ = arrays
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    train_in_process(X=X, y=y, verbose=False, layers=[64, 8, 10], steps=2)
    assert os.listdir(private) == []
    with pytest.raises(DataError):  # also when the run fails
        train_in_process(X=X, y=y, verbose=False, layers=[3, 10], steps=2)
    assert os.listdir(private) == []


def test_a_model_file_and_an_init_model(arrays, tmp_path):
    X, y, _, _ = arrays
    out = tmp_path / "model.npz"
    first = train_in_process(X=X, y=y, verbose=False, output=str(out), **KEYS)
    assert out.exists()
    np.testing.assert_array_equal(ddp.Model.load(str(out)).flat, first.model.flat)
    more = train_in_process(X=X, y=y, verbose=False, init_params=first.model, **dict(KEYS, epochs=1))
    assert more.summary["steps"] == 10
    assert more.model.score(X, y) >= 0.5


def test_verbose_false_prints_nothing(arrays, capfd):
    X, y, _, _ = arrays
    train_in_process(X=X, y=y, verbose=False, layers=[64, 8, 10], steps=3)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_the_callers_numpy_error_mode_and_blas_threads_come_back(arrays):
    from threadpoolctl import threadpool_info

    X, y, _, _ = arrays
    before = (np.geterr(), [p["num_threads"] for p in threadpool_info()])
    with deadline():
        ddp.train(X=X, y=y, verbose=False, layers=[64, 8, 10], steps=2, threads=1)
    assert (np.geterr(), [p["num_threads"] for p in threadpool_info()]) == before
