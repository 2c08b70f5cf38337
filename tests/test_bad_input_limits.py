"""Inputs that once ended in a traceback (MemoryError, OverflowError, ValueError,
TypeError) or were accepted wrongly (issue 12, item 9): each is one `PROG: error` line
and exit 2. The commands run in the test process (`in_process`), as their entry points,
with a time limit; one case of each kind runs the real command as a subprocess, for the
exit code and the single line of a real process; the validation functions are called
directly where no command is needed.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import helpers
from helpers import PY, predict, run, train
from inproc import predict_here, train_here

TIMEOUT = 60


def expect_error(res, prog: str, *fragments: str) -> str:
    line = helpers.expect_error(res, prog, *fragments)
    assert "Warning" not in res.stderr, res.stderr  # no numpy warning line either
    return line


def in_process(command, args: list) -> helpers.Result:
    """`command(args)` (train_here or predict_here), and no warning: a subprocess would print
    one on stderr, where expect_error looks; in process the warnings are recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = command(args)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    return res


# --- ddp-train: flags and config files ----------------------------------------------------

FLAG_CASES = [  # (id, flags, fragments of the error line)
    ("huge-layer", ["--layers", "2,100000000000,3"], ["--layers 2,100000000000,3", "memory", "available"]),
    # no bias: the last entry is a 2^40 x 2^40 matrix, whose size must not wrap around in int64
    ("huge-matrix", ["--no-bias", "--layers", "2,1099511627776,1099511627776"], ["memory", "available"]),
    ("absurd-layer", ["--layers", "2,99999999999999999999,3"], ["--layers", "at most"]),
    ("huge-samples", ["--samples", "100000000000"], ["--samples 100,000,000,000", "memory", "available"]),
    ("huge-random", ["--data", "random:100000000000", "--layers", "2,10,3"],
     ["--data random:100000000000", "memory", "available"]),
    ("huge-threads", ["--threads", "99999999999999999999"], ["--threads", "at most 1,024"]),
    ("huge-bucket", ["--bucket-mb", "1e305"], ["--bucket-mb", "at most"]),
    ("huge-steps", ["--steps", str(10 ** 16)], ["--steps", "at most"]),
    ("huge-seed", ["--seed", str(10 ** 30)], ["--seed", "at most"]),
    ("huge-stall-timeout", ["--stall-timeout", "1e300"], ["--stall-timeout", "at most"]),
    ("huge-worker-timeout", ["--backend", "zmq", "--worker-timeout", "1e300"], ["--worker-timeout"]),
    ("pushgateway-bracket", ["--pushgateway", "http://[::1"], ["--pushgateway"]),
    ("pushgateway-port", ["--pushgateway", "http://localhost:99999"], ["--pushgateway"]),
]


@pytest.mark.parametrize("flags,fragments", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_train_flag_out_of_bounds(flags, fragments):
    args = [*flags, "--steps", "1"] if "--steps" not in flags else flags
    if "zmq" in flags:  # a real process: code that regressed would start a coordinator and
        res = train(args, timeout=TIMEOUT)  # its workers, which the timeout kills as a group
    else:
        res = in_process(train_here, args)
    expect_error(res, "ddp-train", *fragments)


TOML_CASES = [
    ("nul-in-data", 'data = "train\\u0000.npz"', ["--data", "NUL"]),
    ("nul-in-output", 'output = "m\\u0000.npz"', ["--output", "NUL"]),
    ("nul-in-metrics-addr", 'metrics_addr = "127.0.0.1\\u0000"', ["--metrics-addr", "NUL"]),
    ("huge-layer", "layers = [2, 99999999999999999999, 3]", ["layers"]),
]


@pytest.mark.parametrize("text,fragments", [c[1:] for c in TOML_CASES], ids=[c[0] for c in TOML_CASES])
def test_train_config_file_values(tmp_path, text, fragments):
    path = tmp_path / "run.toml"
    path.write_text(text + "\nsteps = 1\n")
    res = in_process(train_here, ["--config", str(path)])
    expect_error(res, "ddp-train", *fragments)


def test_worker_threads_out_of_bounds():
    # a real process: without --retry-for, code that regressed would try to connect forever
    res = run([PY, "-m", "ddp", "worker", "--connect", "tcp://127.0.0.1:1", "--threads",
               "99999999999999999999"], timeout=TIMEOUT)
    expect_error(res, "ddp-worker", "--threads", "1024")


# --- data that was accepted wrongly -------------------------------------------------------


def _data(tmp_path, kind: str) -> str:
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 2)), np.arange(30) % 3
    path = tmp_path / ("d.csv" if kind == "header-only-csv" else "d.npz")
    if kind == "complex-y":
        np.savez(path, X=X, y=y + 0.5j)
    elif kind == "timedelta-X":
        np.savez(path, X=np.arange(60).reshape(30, 2).astype("timedelta64[s]"), y=y)
    elif kind == "datetime-X":
        np.savez(path, X=np.arange(60).reshape(30, 2).astype("datetime64[s]"), y=y)
    else:
        path.write_text("x0,x1,y\n")
    return str(path)


@pytest.mark.parametrize("kind,fragments", [
    ("complex-y", ["y must be numeric", "complex128"]),
    ("timedelta-X", ["X must be numeric", "timedelta64"]),
    ("datetime-X", ["X must be numeric", "datetime64"]),
    ("header-only-csv", ["no data rows"]),
])
def test_train_refuses_data(tmp_path, kind, fragments):
    path = _data(tmp_path, kind)
    res = in_process(train_here, ["--data", path, "--layers", "2,8,3", "--steps", "1"])
    expect_error(res, "ddp-train", f"--data {path}", *fragments)


def test_in_process_checks_of_the_same_data(tmp_path):
    from ddp import data as ddata
    from ddp.errors import DataError

    with pytest.raises(DataError, match="y must be numeric"):
        ddata.check_targets(np.arange(4) + 1j, 4, "mse", 1, "y", np.float64)
    with pytest.raises(DataError, match="X must be numeric"):
        ddata.check_inputs(np.zeros((3, 2), "timedelta64[s]"), "X")
    with pytest.raises(DataError, match="no data rows"):
        ddata.load_csv(_data(tmp_path, "header-only-csv"))


# --- ddp-predict on crafted model files ---------------------------------------------------


@pytest.fixture(scope="module")
def model_arrays(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.npz"
    res = train_here(["--steps", "2", "--standardize", "--output", str(path)])
    assert res.returncode == 0, res.stderr
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


MODEL_CASES = [  # (id, change to the config, fragment)
    ("standardize-yes", lambda c: c.update(standardize="yes"), "standardize"),
    ("seed-x", lambda c: c["training"].update(seed="x"), "training.seed"),
    ("samples-negative", lambda c: c["training"].update(samples=-3), "training.samples"),
    ("layers-float", lambda c: c.update(layers=[2, 1e12, 3]), "layers"),
    ("layers-huge", lambda c: c.update(layers=[2, 10 ** 11, 3]), "memory"),
    ("bias-string", lambda c: c.update(bias="no"), "bias"),
    ("mean-wrong-length", lambda c: c["standardize"].update(mean=[0.0] * 5), "standardize.mean"),
    ("std-zero", lambda c: c["standardize"].update(std=[0.0, 1.0]), "standardize.std"),
    ("config-not-object", lambda c: c.clear() or c.update(x=1), "layers"),
]


@pytest.mark.parametrize("change,fragment", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_predict_refuses_a_crafted_model_config(tmp_path, model_arrays, change, fragment):
    path = _crafted(tmp_path, model_arrays, change)
    res = in_process(predict_here, ["--model", str(path), "--data", "spiral"])
    expect_error(res, "ddp-predict", f"--model {path}", fragment)


def test_predict_refuses_a_crafted_model_config_through_the_real_command(tmp_path, model_arrays):
    """One case above in a process of its own: exit 2, one line, no traceback or warning."""
    change, fragment = {c[0]: c[1:] for c in MODEL_CASES}["std-zero"]
    path = _crafted(tmp_path, model_arrays, change)
    res = predict(["--model", str(path), "--data", "spiral"], timeout=TIMEOUT)
    expect_error(res, "ddp-predict", f"--model {path}", fragment)


def _crafted(tmp_path, model_arrays, change):
    """The model file with `change` made to its config."""
    config = json.loads(str(model_arrays["config"]))
    change(config)
    path = tmp_path / "crafted.npz"
    np.savez(path, **dict(model_arrays, config=np.array(json.dumps(config))))
    return path


def test_predict_control_the_untouched_model_works(tmp_path, model_arrays):
    path = tmp_path / "m.npz"
    np.savez(path, **model_arrays)
    res = in_process(predict_here, ["--model", str(path), "--data", "spiral"])
    assert res.returncode == 0 and "accuracy" in res.stdout, res.stderr


def test_predict_header_only_csv(tmp_path, model_arrays):
    path = tmp_path / "m.npz"
    np.savez(path, **model_arrays)
    csv = _data(tmp_path, "header-only-csv")
    res = in_process(predict_here, ["--model", str(path), "--data", csv])
    expect_error(res, "ddp-predict", f"--data {csv}", "no data rows")


# --- the validation functions in process --------------------------------------------------


@pytest.mark.parametrize("kwargs,fragment", [
    ({"threads": 10 ** 20}, "--threads must be at most"),
    ({"bucket_mb": 1e305}, "--bucket-mb must be at most"),
    ({"pushgateway": "http://[::1"}, "--pushgateway"),
    ({"metrics_addr": "a\0b"}, "NUL"),
    ({"checkpoint_dir": "ck\0"}, "--checkpoint-dir"),
    ({"backend": "zmq", "shard_timeout": 1e300}, "--shard-timeout must be at most"),
    # in process only: code that regressed would start that many processes
    ({"backend": "zmq", "workers": 100000}, "--workers must be at most"),
])
def test_validate_in_process(kwargs, fragment):
    from ddp.config import Config, validate
    from ddp.errors import UsageError

    with pytest.raises(UsageError, match=fragment.replace("[", r"\[")):
        validate(Config(**kwargs))


def test_parse_layers_bounds_each_size():
    from ddp.config import parse_layers
    from ddp.errors import UsageError

    with pytest.raises(UsageError, match="at most"):
        parse_layers([2, 99999999999999999999, 3])
    assert parse_layers("2,100000000000,3") == (2, 100000000000, 3)  # the memory check refuses it
