"""Bad input to ddp-train and ddp-predict: one `<prog>: error` line, no traceback, exit 2.

Every case runs the command on an input that differs from a known-good one by a
single defect, and checks that the error line names that defect (the flag, key,
array or file), so a test cannot pass because some other error fired. Positive
controls run the same inputs without the defect and must succeed, so a test
cannot pass because everything fails.

Most cases call the entry point inside the test process (`inproc.train_here`, `predict_here`):
validation needs no process of its own. A few of each family run the real command
as a subprocess, for the exit code and the single error line of a real process,
and every case that needs MPI ranks runs under mpirun.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import one_error_line, predict, train
from inproc import predict_here, train_here

EXIT_USAGE = 2
LAYERS = "4,8,3"  # matches the classification_npz fixture: 4 features, labels 0..2


# --- helpers -------------------------------------------------------------------------


def _show(res) -> str:
    return f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def expect_error(res, *fragments: str, prog: str = "ddp-train") -> str:
    """Exit 2, exactly one error line, no traceback, and the line contains every fragment."""
    line = one_error_line(res.stderr, prog)
    assert res.returncode == EXIT_USAGE, _show(res)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in the error line:\n{line}\n\n{_show(res)}"
    return line


def expect_ok(res) -> None:
    assert res.returncode == 0, _show(res)
    assert "Traceback" not in res.stderr, res.stderr
    assert ": error" not in res.stderr, res.stderr


def fmt(args: list[str], tmp_path) -> list[str]:
    return [a.format(tmp=tmp_path) for a in args]


@pytest.fixture
def arrays(classification_npz):
    """(X, y) of the classification fixture, to build defective variants from."""
    with np.load(classification_npz) as z:
        return z["X"].copy(), z["y"].copy()


def good_init(bias: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {"W0": rng.standard_normal((4, 8)) * 0.1, "W1": rng.standard_normal((8, 3)) * 0.1}
    if bias:
        out["b0"], out["b1"] = np.zeros(8), np.zeros(3)
    return out


class Canary:
    """Unpickling this creates a directory: proof that a file was (wrongly) unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path, 0o777, True))  # exist_ok: every element may fire


def canary_array(path, shape) -> np.ndarray:
    a = np.empty(int(np.prod(shape)), dtype=object)
    for i in range(a.size):
        a[i] = Canary(str(path))
    return a.reshape(shape)


# --- positive controls ------------------------------------------------------------------


def test_control_good_npz_trains(classification_npz):
    # a real process: the console entry point's exit 0, the counterpart of the in-process runs
    expect_ok(train(["--data", str(classification_npz), "--steps", "3"]))


def test_control_good_npz_with_explicit_layers_trains(classification_npz):
    expect_ok(train_here(["--data", str(classification_npz), "--layers", LAYERS, "--steps", "2"]))


# --- flags ------------------------------------------------------------------------------

FLAG_CASES = [
    ("unknown-flag", ["--bogus-flag"], ["unrecognized arguments", "--bogus-flag"]),
    ("unknown-flag-near-miss", ["--batchsize", "8"], ["unrecognized arguments", "--batchsize"]),
    ("abbreviated-flag", ["--batch", "8"], ["--batch"]),
    ("stray-positional", ["extra"], ["unrecognized arguments", "extra"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size", "got 0"]),
    ("batch-size-negative", ["--batch-size", "-4"], ["--batch-size", "-4"]),
    ("batch-size-not-int", ["--batch-size", "4.5"], ["--batch-size", "'4.5'"]),
    ("lr-0", ["--lr", "0"], ["--lr", "positive"]),
    ("lr-negative", ["--lr", "-0.1"], ["--lr", "-0.1"]),
    ("lr-nan", ["--lr", "nan"], ["--lr", "nan"]),
    ("lr-inf", ["--lr", "inf"], ["--lr", "inf"]),
    ("lr-not-a-number", ["--lr", "fast"], ["--lr", "'fast'"]),
    ("steps-0", ["--steps", "0"], ["--steps", "got 0"]),
    ("steps-negative", ["--steps", "-3"], ["--steps", "-3"]),
    ("epochs-0", ["--epochs", "0"], ["--epochs", "got 0"]),
    ("epochs-negative", ["--epochs", "-1"], ["--epochs", "-1"]),
    ("momentum-1.5", ["--momentum", "1.5"], ["--momentum", "1.5"]),
    ("momentum-1", ["--momentum", "1"], ["--momentum", "[0, 1)"]),
    ("momentum-negative", ["--momentum", "-0.5"], ["--momentum", "-0.5"]),
    ("val-fraction-1.0", ["--val-fraction", "1.0"], ["--val-fraction", "1.0"]),
    ("val-fraction-negative", ["--val-fraction", "-0.2"], ["--val-fraction", "-0.2"]),
    ("val-fraction-leaves-no-validation", ["--val-fraction", "0.001"],
     ["--val-fraction 0.001", "0 for validation"]),
    ("val-fraction-and-val-data", ["--val-fraction", "0.2", "--val-data", "spiral"],
     ["--val-fraction", "--val-data"]),
    ("activation-unknown", ["--activation", "swish"],
     ["--activation 'swish'", "relu", "sigmoid", "tanh", "identity"]),
    ("loss-unknown", ["--loss", "hinge"], ["--loss 'hinge'", "cross-entropy", "mse"]),
    ("dtype-unknown", ["--dtype", "float16"], ["--dtype 'float16'", "float32", "float64"]),
    ("progress-unknown", ["--progress", "sometimes"], ["--progress 'sometimes'", "auto", "never"]),
    ("l2-negative", ["--l2", "-1"], ["--l2"]),
    ("seed-negative", ["--seed", "-1"], ["--seed"]),
    ("threads-0", ["--threads", "0"], ["--threads"]),
    ("bucket-mb-negative", ["--bucket-mb", "-1"], ["--bucket-mb", ">= 0"]),
    ("bucket-mb-nan", ["--bucket-mb", "nan"], ["--bucket-mb"]),
    ("exchange-unknown", ["--exchange", "ring"], ["--exchange 'ring'", "shared", "allreduce"]),
    ("log-every-0", ["--log-every", "0"], ["--log-every"]),
    ("checkpoint-every-0", ["--checkpoint-every", "0"], ["--checkpoint-every"]),
    ("eval-every-negative", ["--eval-every", "-1"], ["--eval-every"]),
    ("samples-0", ["--samples", "0"], ["--samples"]),
    ("layers-single-size", ["--layers", "4"], ["--layers", "at least"]),
    ("layers-zero-size", ["--layers", "4,0,3"], ["--layers", "positive"]),
    ("layers-not-integers", ["--layers", "4,x,3"], ["--layers", "integers"]),
    ("output-dir-missing", ["--output", "{tmp}/no/such/dir/model.npz"],
     ["--output", "no/such/dir", "does not exist"]),
    ("summary-json-dir-missing", ["--summary-json", "{tmp}/no/such/dir/s.json"],
     ["--summary-json", "does not exist"]),
]


@pytest.mark.parametrize("extra,fragments", [c[1:] for c in FLAG_CASES],
                         ids=[c[0] for c in FLAG_CASES])
def test_bad_flag(classification_npz, tmp_path, extra, fragments):
    res = train_here(_flag_args(classification_npz, tmp_path, extra))
    expect_error(res, *fragments)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("case", ["unknown-flag", "lr-nan"])
def test_bad_flag_through_the_real_command(classification_npz, tmp_path, case):
    """An argparse error and a validation error in a process of their own: the exit code
    and the single line of the real command, without a traceback."""
    extra, fragments = {c[0]: c[1:] for c in FLAG_CASES}[case]
    expect_error(train(_flag_args(classification_npz, tmp_path, extra)), *fragments)


def _flag_args(npz, tmp_path, extra: list[str]) -> list[str]:
    # the last occurrence of a flag wins, so `extra` overrides the good base values
    return ["--data", str(npz), "--layers", LAYERS, "--steps", "2", *fmt(extra, tmp_path)]


# --- --config TOML -------------------------------------------------------------------------

TOML_CASES = [
    ("unknown-key", 'colour = "red"\n', ["--config", "unknown key 'colour'"]),
    ("typo-suggests-batch_size", "batch_sise = 8\n",
     ["unknown key 'batch_sise'", "did you mean 'batch_size'"]),
    ("typo-suggests-momentum", "momentun = 0.5\n", ["'momentun'", "did you mean 'momentum'"]),
    ("table-is-unknown-key", "[model]\nlayers = [4, 8, 3]\n", ["unknown key 'model'"]),
    ("lr-is-a-string", 'lr = "fast"\n', ["lr must be a float", "'fast'"]),
    ("batch_size-is-a-float", "batch_size = 8.5\n", ["batch_size must be an int", "8.5"]),
    ("steps-is-a-bool", "steps = true\n", ["steps must be an int", "True"]),
    ("shuffle-is-an-int", "shuffle = 1\n", ["shuffle must be a bool"]),
    ("data-is-a-number", "data = 5\n", ["data must be a str"]),
    ("layers-hold-a-string", 'layers = [4, "x", 3]\n', ["--layers", "integers"]),
    ("layers-hold-a-float", "layers = [4, 8.5, 3]\n", ["--layers", "integers"]),
    ("syntax-double-equals", "lr = = 0.1\n", ["--config", "not valid TOML"]),
    ("syntax-unterminated-string", 'data = "cls.npz\n', ["--config", "not valid TOML"]),
    ("syntax-bare-word", "this is not toml\n", ["--config", "not valid TOML"]),
    ("valid-type-out-of-range", "momentum = 1.5\n", ["--momentum", "1.5"]),
    ("batch_size-0-in-file", "batch_size = 0\n", ["--batch-size", "got 0"]),
]


@pytest.mark.parametrize("text,fragments", [c[1:] for c in TOML_CASES],
                         ids=[c[0] for c in TOML_CASES])
def test_bad_config_file(classification_npz, tmp_path, text, fragments):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    res = train_here(["--config", str(cfg), "--data", str(classification_npz), "--steps", "2"])
    expect_error(res, *fragments)


def test_missing_config_file(classification_npz, tmp_path):
    res = train_here(["--config", str(tmp_path / "nope.toml"), "--data", str(classification_npz)])
    expect_error(res, "--config", "nope.toml", "no such file")


def test_config_that_is_a_directory(classification_npz, tmp_path):
    res = train_here(["--config", str(tmp_path), "--data", str(classification_npz)])
    expect_error(res, "--config", "is a directory, not a regular file")


@pytest.mark.parametrize("kind", ["binary-bytes", "an-npz-file"])
def test_config_file_that_is_not_utf8(classification_npz, tmp_path, kind):
    if kind == "binary-bytes":
        cfg = tmp_path / "run.toml"
        cfg.write_bytes(b"\xff\xfe\x00 lr = 0.1\n")
    else:
        cfg = classification_npz
    res = train_here(["--config", str(cfg), "--data", str(classification_npz), "--steps", "2"])
    expect_error(res, "--config", cfg.name)


def test_control_good_config_file_and_flags_override_it(classification_npz, tmp_path):
    cfg = tmp_path / "run.toml"
    # dashed and underscored keys; `steps = 0` in the file is invalid but the flag overrides it
    cfg.write_text('batch-size = 16\nlr = 0.05\nlayers = [4, 8, 3]\nactivation = "tanh"\n'
                   "steps = 0\nshuffle = false\n")
    expect_ok(train_here(["--config", str(cfg), "--data", str(classification_npz), "--steps", "2"]))


# --- data that does not match the layers or the loss -----------------------------------------


def _npz(tmp_path, name, **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _mse_targets(n, k=None):
    """Float targets of shape (n, k), or (n,) when k is None."""
    return np.random.default_rng(1).standard_normal(n if k is None else (n, k))


def case_first_size_not_features(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X, y=y), ["--layers", "5,8,3"], ["4 features", "starts with 5"]


def case_label_ge_classes(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X, y=y), ["--layers", "4,8,2"], ["label 2", "2 outputs"]


def case_negative_label(tmp_path, X, y):
    y = y.copy()
    y[10] = -1
    return _npz(tmp_path, "d.npz", X=X, y=y), ["--layers", LAYERS], [">= 0", "-1"]


def case_negative_label_default_layers(tmp_path, X, y):
    y = y.copy()
    y[10] = -2
    return _npz(tmp_path, "d.npz", X=X, y=y), [], [">= 0", "-2"]


def case_float_labels(tmp_path, X, y):
    yf = y.astype(np.float64)
    yf[4] = 0.5
    return _npz(tmp_path, "d.npz", X=X, y=yf), ["--layers", LAYERS], ["non-integer", "--loss mse"]


def case_float_labels_default_layers(tmp_path, X, y):
    yf = y.astype(np.float64) + 0.25
    return _npz(tmp_path, "d.npz", X=X, y=yf), [], ["non-integer", "cross-entropy"]


def case_cross_entropy_2d_targets(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=X, y=_mse_targets(len(X), 3)), ["--layers", LAYERS],
            ["cross-entropy", "(90, 3)"])


def case_mse_targets_too_wide(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=X, y=_mse_targets(len(X), 3)),
            ["--loss", "mse", "--layers", "4,8,2"], ["(90, 2)", "(90, 3)"])


def case_mse_1d_targets_for_2_outputs(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=X, y=_mse_targets(len(X))),
            ["--loss", "mse", "--layers", "4,8,2"], ["(90,)", "ends in 2"])


def case_cross_entropy_single_output(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=X, y=np.zeros(len(X), dtype=np.int64)), ["--layers", "4,8,1"],
            ["cross-entropy", "2 outputs"])


def case_cross_entropy_single_output_random(tmp_path, X, y):
    return "random:50", ["--layers", "4,1"], ["cross-entropy", "2 outputs"]


def case_empty_X(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=np.zeros((0, 4)), y=np.zeros(0, dtype=np.int64)),
            ["--layers", LAYERS], ["no samples"])


def case_empty_X_default_layers(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=np.zeros((0, 4)), y=np.zeros(0, dtype=np.int64)), [],
            ["no samples"])


def case_nan_in_X(tmp_path, X, y):
    X = X.copy()
    X[5, 2] = np.nan
    return _npz(tmp_path, "d.npz", X=X, y=y), [], ["NaN or Inf", "row 5", "column 2"]


def case_inf_in_X(tmp_path, X, y):
    X = X.copy()
    X[7, 0] = -np.inf
    return _npz(tmp_path, "d.npz", X=X, y=y), ["--layers", LAYERS], ["NaN or Inf", "row 7"]


def case_nan_in_mse_targets(tmp_path, X, y):
    t = _mse_targets(len(X), 2)
    t[3, 1] = np.nan
    return (_npz(tmp_path, "d.npz", X=X, y=t), ["--loss", "mse", "--layers", "4,8,2"],
            ["NaN or Inf in the targets"])


def case_X_y_length_mismatch(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X, y=y[:80]), [], ["90 samples", "80 targets"]


def case_X_is_1d(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X[:, 0], y=y), [], ["2-D", "(90,)"]


def case_X_not_numeric(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=np.full((90, 4), "a"), y=y), ["--layers", LAYERS],
            ["X must be numeric"])


def case_y_not_numeric(tmp_path, X, y):
    return (_npz(tmp_path, "d.npz", X=X, y=np.array(["a", "b", "c"] * 30)), ["--layers", LAYERS],
            ["y must be numeric"])


def case_npz_missing_y(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X), [], ["missing array 'y'"]


def case_npz_missing_X(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", features=X, y=y), [], ["missing array 'X'", "features"]


def case_not_a_zip(tmp_path, X, y):
    path = tmp_path / "d.npz"
    path.write_bytes(b"this is plain text, not a zip archive\n" * 20)
    return str(path), [], ["d.npz", "not a readable .npz"]


def case_truncated_npz(tmp_path, X, y):
    full = tmp_path / "full.npz"
    np.savez(full, X=X, y=y)
    data = full.read_bytes()
    path = tmp_path / "d.npz"
    path.write_bytes(data[:len(data) // 2])
    return str(path), [], ["d.npz", "not a readable .npz"]


def case_npz_is_a_directory(tmp_path, X, y):
    path = tmp_path / "d.npz"
    path.mkdir()
    return str(path), [], ["d.npz", "is a directory, not a regular file"]


def case_missing_npz(tmp_path, X, y):
    return str(tmp_path / "nope.npz"), [], ["nope.npz", "no such file"]


def case_missing_csv(tmp_path, X, y):
    return str(tmp_path / "nope.csv"), [], ["nope.csv", "no such file"]


def case_missing_no_extension(tmp_path, X, y):
    return str(tmp_path / "nope"), [], ["nope", "no such file"]


def case_unknown_extension(tmp_path, X, y):
    path = tmp_path / "d.txt"
    path.write_text("1 2 3\n")
    return str(path), [], ["d.txt", "unknown format"]


def _csv(tmp_path, X, y, bad_cell=None) -> str:
    lines = ["a,b,c,d,label"] + [",".join(map(str, [*row, int(t)])) for row, t in zip(X, y)]
    if bad_cell:
        cells = lines[3].split(",")
        cells[1] = bad_cell
        lines[3] = ",".join(cells)
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def case_csv_non_numeric_cell(tmp_path, X, y):
    return _csv(tmp_path, X, y, bad_cell="oops"), [], ["d.csv", "not a numeric CSV"]


def case_csv_single_column(tmp_path, X, y):
    path = tmp_path / "d.csv"
    path.write_text("label\n0\n1\n2\n")
    return str(path), [], ["d.csv", "at least one input column"]


def case_random_not_a_number(tmp_path, X, y):
    return "random:abc", ["--layers", LAYERS], ["random:abc", "positive integer"]


def case_random_zero(tmp_path, X, y):
    return "random:0", ["--layers", LAYERS], ["random:0", "positive integer"]


def case_random_negative(tmp_path, X, y):
    return "random:-5", ["--layers", LAYERS], ["random:-5", "positive integer"]


def case_random_empty(tmp_path, X, y):
    return "random:", ["--layers", LAYERS], ["random:", "positive integer"]


def case_random_without_layers(tmp_path, X, y):
    return "random:100", [], ["random:100", "needs --layers"]


DATA_CASES = [f for name, f in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("make", DATA_CASES, ids=[f.__name__[5:].replace("_", "-") for f in DATA_CASES])
def test_bad_data(tmp_path, arrays, make):
    spec, extra, fragments = make(tmp_path, *arrays)
    res = train_here(["--data", spec, "--steps", "2", *extra])
    expect_error(res, *fragments)


@pytest.mark.parametrize("where", ["X", "y"])
@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_object_array_is_refused_without_unpickling(tmp_path, arrays, where, compressed):
    X, y = arrays
    canary = tmp_path / "unpickled"
    content = {"X": X, "y": y}
    content[where] = canary_array(canary, (90, 4) if where == "X" else (90,))
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, allow_pickle=True, **content)
    res = train_here(["--data", str(path), "--layers", LAYERS, "--steps", "2"])
    expect_error(res, "--data", "d.npz")
    assert not canary.exists(), "the object array was unpickled"


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="running as root: chmod 000 does not stop root from reading the file")
def test_unreadable_data_file(classification_npz):
    os.chmod(classification_npz, 0)
    try:
        res = train_here(["--data", str(classification_npz), "--steps", "2"])
    finally:
        os.chmod(classification_npz, 0o644)
    expect_error(res, "--data", classification_npz.name)


# controls for the data cases: the same kinds of input without the defect

def test_control_good_data_variants(tmp_path, arrays):
    X, y = arrays
    runs = {
        "float-integer-labels": ["--data", _npz(tmp_path, "f.npz", X=X, y=y.astype(np.float64)),
                                 "--layers", LAYERS],
        "mse-2-targets": ["--data", _npz(tmp_path, "m2.npz", X=X, y=_mse_targets(90, 2)),
                          "--loss", "mse", "--layers", "4,8,2"],
        "mse-1d-targets-1-output": ["--data", _npz(tmp_path, "m1.npz", X=X, y=_mse_targets(90)),
                                    "--loss", "mse", "--layers", "4,8,1"],
        "compressed-npz": ["--data", str(tmp_path / "c.npz")],
        "csv": ["--data", _csv(tmp_path, X, y)],
        "random": ["--data", "random:50", "--layers", "3,8,2"],
        "random-mse-1-output": ["--data", "random:50", "--layers", "3,1", "--loss", "mse"],
    }
    np.savez_compressed(tmp_path / "c.npz", X=X, y=y)
    for name, args in runs.items():
        res = train_here([*args, "--steps", "2"])
        assert res.returncode == 0, f"{name}: {_show(res)}"
        assert "Traceback" not in res.stderr, f"{name}: {res.stderr}"


# --- edge cases: labels and values that only go wrong late (inference, casts) --------------


def edge_nan_label_default_layers(tmp_path, X, y):
    yf = y.astype(np.float64)
    yf[3] = np.nan
    return _npz(tmp_path, "d.npz", X=X, y=yf), [], ["d.npz", "label"]


def edge_string_labels_default_layers(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X, y=np.array(["a", "b", "c"] * 30)), [], ["d.npz", "numeric"]


def edge_scalar_y(tmp_path, X, y):
    return _npz(tmp_path, "d.npz", X=X, y=np.int64(1)), ["--layers", LAYERS], ["d.npz"]


def edge_huge_label_default_layers(tmp_path, X, y):
    y = y.copy()
    y[0] = 10 ** 15  # default layers would be (4, 100, 10**15 + 1): 355 PiB, fails at once
    return _npz(tmp_path, "d.npz", X=X, y=y), [], ["d.npz", "label"]


def edge_huge_float_label_misreported(tmp_path, X, y):
    yf = y.astype(np.float64)
    yf[0] = 1e30
    return _npz(tmp_path, "d.npz", X=X, y=yf), ["--layers", LAYERS], ["d.npz"]


def edge_X_overflows_float32(tmp_path, X, y):
    X = X.copy()
    X[5, 1] = 1e300  # finite in float64, inf once cast to the default --dtype float32
    return _npz(tmp_path, "d.npz", X=X, y=y), ["--layers", LAYERS], ["d.npz", "row 5"]


EDGE_CASES = [
    pytest.param(edge_nan_label_default_layers, id="nan-label-default-layers"),
    pytest.param(edge_string_labels_default_layers, id="string-labels-default-layers"),
    pytest.param(edge_scalar_y, id="scalar-y"),
    pytest.param(edge_huge_label_default_layers, id="huge-label-default-layers"),
    pytest.param(edge_huge_float_label_misreported, id="huge-float-label-misreported"),
    pytest.param(edge_X_overflows_float32, id="X-overflows-float32"),
]


@pytest.mark.parametrize("make", EDGE_CASES)
def test_bad_data_edge_cases(tmp_path, arrays, make):
    spec, extra, fragments = make(tmp_path, *arrays)
    res = train_here(["--data", spec, "--steps", "2", *extra])
    line = expect_error(res, *fragments)
    assert "-9223372036854775808" not in line, line


def test_batch_size_far_above_the_data_size(classification_npz):
    res = train_here(["--data", str(classification_npz), "--batch-size", str(10 ** 15), "--steps", "2"])
    assert "Traceback" not in res.stderr, res.stderr
    if res.returncode != 0:
        expect_error(res, "--batch-size")


def test_checkpoint_dir_is_a_file(classification_npz):
    res = train_here(["--data", str(classification_npz), "--steps", "2",
                 "--checkpoint-dir", str(classification_npz)])
    line = one_error_line(res.stderr)
    assert res.returncode in (2, 4), _show(res)  # bad input or cannot write: either is a fair code
    assert classification_npz.name in line, line


# --- --init -----------------------------------------------------------------------------


def init_missing(tmp_path):
    return str(tmp_path / "nope.npz"), [], ["--init", "nope.npz", "no such file"]


def init_corrupt(tmp_path):
    path = tmp_path / "init.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return str(path), [], ["--init", "not a readable .npz"]


def init_truncated(tmp_path):
    full = tmp_path / "full.npz"
    np.savez(full, **good_init())
    data = full.read_bytes()
    path = tmp_path / "init.npz"
    path.write_bytes(data[:len(data) // 2])
    return str(path), [], ["--init", "not a readable .npz"]


def init_wrong_W_shape(tmp_path):
    arrays = good_init()
    arrays["W0"] = np.zeros((4, 9))
    return _npz(tmp_path, "init.npz", **arrays), [], ["W0", "(4, 9)", "(4, 8)"]


def init_missing_W1(tmp_path):
    arrays = good_init()
    del arrays["W1"]
    return _npz(tmp_path, "init.npz", **arrays), [], ["missing array W1", "(8, 3)"]


def init_extra_layer(tmp_path):
    arrays = good_init()
    arrays["W2"] = np.zeros((3, 3))
    return _npz(tmp_path, "init.npz", **arrays), [], ["W2"]


def init_biases_with_no_bias(tmp_path):
    return _npz(tmp_path, "init.npz", **good_init()), ["--no-bias"], ["b0", "drop --no-bias"]


def init_nan(tmp_path):
    arrays = good_init()
    arrays["W1"][2, 1] = np.nan
    return _npz(tmp_path, "init.npz", **arrays), [], ["W1", "NaN"]


def init_inf_bias(tmp_path):
    arrays = good_init()
    arrays["b0"][0] = np.inf
    return _npz(tmp_path, "init.npz", **arrays), [], ["b0", "Inf"]


def init_not_numeric(tmp_path):
    arrays = good_init()
    arrays["b1"] = np.array(["x", "y", "z"])
    return _npz(tmp_path, "init.npz", **arrays), [], ["b1", "numeric"]


INIT_CASES = [f for name, f in sorted(globals().items()) if name.startswith("init_")]


@pytest.mark.parametrize("make", INIT_CASES, ids=[f.__name__[5:].replace("_", "-") for f in INIT_CASES])
def test_bad_init(classification_npz, tmp_path, make):
    path, extra, fragments = make(tmp_path)
    res = train_here(["--data", str(classification_npz), "--layers", LAYERS, "--steps", "2",
                 "--init", path, *extra])
    expect_error(res, *fragments)


def test_init_object_array_is_refused_without_unpickling(classification_npz, tmp_path):
    canary = tmp_path / "unpickled"
    arrays = good_init()
    arrays["W0"] = canary_array(canary, (4, 8))
    path = tmp_path / "init.npz"
    np.savez(path, allow_pickle=True, **arrays)
    res = train_here(["--data", str(classification_npz), "--layers", LAYERS, "--steps", "2",
                 "--init", str(path)])
    expect_error(res, "--init", "init.npz")
    assert not canary.exists(), "the --init file was unpickled"


def test_init_value_overflows_float32(classification_npz, tmp_path):
    arrays = good_init()
    arrays["W0"][0, 0] = 1e300
    path = _npz(tmp_path, "init.npz", **arrays)
    res = train_here(["--data", str(classification_npz), "--layers", LAYERS, "--steps", "2",
                 "--init", path])
    expect_error(res, "--init", "W0")


def test_control_good_init(classification_npz, tmp_path):
    with_bias = _npz(tmp_path, "init.npz", **good_init())
    without_bias = _npz(tmp_path, "init_nb.npz", **good_init(bias=False))
    base = ["--data", str(classification_npz), "--layers", LAYERS, "--steps", "2"]
    expect_ok(train_here([*base, "--init", with_bias]))
    expect_ok(train_here([*base, "--init", without_bias, "--no-bias"]))


# --- the same under mpirun -n 2 -----------------------------------------------------------

MPI_TIMEOUT = 60

MPI_CASES = [
    ("unknown-flag", lambda tmp, npz: ["--data", npz, "--bogus-flag"], ["--bogus-flag"]),
    ("label-out-of-range", lambda tmp, npz: ["--data", npz, "--layers", "4,8,2"], ["label 2"]),
    ("missing-init", lambda tmp, npz: ["--data", npz, "--layers", LAYERS,
                                       "--init", str(tmp / "nope.npz")], ["--init", "no such file"]),
    ("nan-in-X", lambda tmp, npz: ["--data", _nan_copy(tmp, npz)], ["NaN or Inf", "row 5"]),
    ("toml-typo", lambda tmp, npz: ["--data", npz, "--config", _toml(tmp, "batch_sise = 8\n")],
     ["did you mean 'batch_size'"]),
    ("missing-data", lambda tmp, npz: ["--data", str(tmp / "nope.npz")], ["no such file"]),
]


def _nan_copy(tmp_path, npz) -> str:
    with np.load(npz) as z:
        X, y = z["X"].copy(), z["y"]
    X[5, 0] = np.nan
    return _npz(tmp_path, "nan.npz", X=X, y=y)


def _toml(tmp_path, text) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make,fragments", [c[1:] for c in MPI_CASES], ids=[c[0] for c in MPI_CASES])
def test_bad_input_under_mpirun(classification_npz, tmp_path, make, fragments):
    args = make(tmp_path, str(classification_npz)) + ["--steps", "2"]
    res = train(args, n=2, timeout=MPI_TIMEOUT)  # fails the test (and kills the group) on a hang
    expect_error(res, *fragments)  # exactly one error line over both ranks


def test_control_good_input_under_mpirun(classification_npz):
    res = train(["--data", str(classification_npz), "--steps", "3"], n=2, timeout=MPI_TIMEOUT)
    expect_ok(res)
    assert "2 ranks" in res.stdout, res.stdout


# --- ddp-predict -----------------------------------------------------------------------------


@pytest.fixture
def model_file(classification_npz, tmp_path):
    path = tmp_path / "model.npz"
    res = train_here(["--data", str(classification_npz), "--steps", "5", "--output", str(path)])
    assert res.returncode == 0 and path.exists(), _show(res)
    return path


def test_predict_on_good_data_prints_accuracy(model_file, classification_npz):
    # a real process: ddp-predict's console entry point and its exit 0
    res = predict(["--model", str(model_file), "--data", str(classification_npz)])
    expect_ok(res)
    assert "90 samples" in res.stdout and "accuracy" in res.stdout, res.stdout


@pytest.mark.parametrize("explicit_output", [True, False], ids=["--output", "default-name"])
def test_predict_without_targets_writes_predictions(model_file, tmp_path, explicit_output):
    X = np.random.default_rng(5).standard_normal((37, 4))
    data = _npz(tmp_path, "noy.npz", X=X)
    out = tmp_path / ("preds.npy" if explicit_output else "predictions.npy")
    args = ["--model", str(model_file), "--data", data]
    res = predict_here(args + (["--output", str(out)] if explicit_output else []), cwd=tmp_path)
    expect_ok(res)
    preds = np.load(out)
    assert preds.shape == (37,), preds.shape
    assert preds.min() >= 0 and preds.max() < 3


def _predict_data(tmp_path, n_features=4, y=True, label=None):
    rng = np.random.default_rng(6)
    content = {"X": rng.standard_normal((20, n_features))}
    if y:
        content["y"] = rng.integers(0, 3, 20)
        if label is not None:
            content["y"][4] = label
    return _npz(tmp_path, "pdata.npz", **content)


PREDICT_CASES = [
    ("missing-model", lambda tmp, m: ["--model", str(tmp / "nope.npz"), "--data", _predict_data(tmp)],
     ["--model", "nope.npz", "no such file"]),
    ("model-is-training-data", lambda tmp, m: ["--model", _predict_data(tmp), "--data", "spiral"],
     ["--model", "'config'"]),
    ("model-random-bytes", lambda tmp, m: ["--model", _bytes(tmp, "junk.npz"), "--data", "spiral"],
     ["--model", "junk.npz", "not a readable .npz"]),
    ("feature-count-mismatch", lambda tmp, m: ["--model", m, "--data", _predict_data(tmp, 5)],
     ["5 features", "expects 4"]),
    ("builtin-data-feature-mismatch", lambda tmp, m: ["--model", m, "--data", "spiral"],
     ["2 features", "expects 4"]),
    ("label-out-of-range", lambda tmp, m: ["--model", m, "--data", _predict_data(tmp, label=7)],
     ["label 7"]),
    ("negative-label", lambda tmp, m: ["--model", m, "--data", _predict_data(tmp, label=-1)],
     [">= 0", "-1"]),
    ("missing-data", lambda tmp, m: ["--model", m, "--data", str(tmp / "nope.npz")],
     ["--data", "nope.npz", "no such file"]),
    ("data-not-a-zip", lambda tmp, m: ["--model", m, "--data", _bytes(tmp, "bad.npz")],
     ["--data", "bad.npz", "not a readable .npz"]),
    ("missing-model-flag", lambda tmp, m: ["--data", "spiral"], ["--model"]),
    ("unknown-flag", lambda tmp, m: ["--model", m, "--data", "spiral", "--bogus"], ["--bogus"]),
    ("batch-size-0", lambda tmp, m: ["--model", m, "--data", _predict_data(tmp), "--batch-size", "0"],
     ["--batch-size"]),
]


def _bytes(tmp_path, name) -> str:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(2).bytes(2048))
    return str(path)


@pytest.mark.parametrize("make,fragments", [c[1:] for c in PREDICT_CASES],
                         ids=[c[0] for c in PREDICT_CASES])
def test_predict_bad_input(model_file, tmp_path, make, fragments):
    res = predict_here(make(tmp_path, str(model_file)), cwd=tmp_path)
    expect_error(res, *fragments, prog="ddp-predict")
    assert not (tmp_path / "predictions.npy").exists()


def test_predict_bad_input_through_the_real_command(model_file, tmp_path):
    """One case above in a process of its own: exit 2 and a single line, no traceback."""
    make, fragments = {c[0]: c[1:] for c in PREDICT_CASES}["feature-count-mismatch"]
    res = predict(make(tmp_path, str(model_file)), cwd=tmp_path)
    expect_error(res, *fragments, prog="ddp-predict")
    assert not (tmp_path / "predictions.npy").exists()


def test_predict_scalar_y(model_file, tmp_path):
    data = _npz(tmp_path, "d.npz", X=np.zeros((5, 4)), y=np.int64(1))
    res = predict_here(["--model", str(model_file), "--data", data], cwd=tmp_path)
    expect_error(res, "d.npz", prog="ddp-predict")
