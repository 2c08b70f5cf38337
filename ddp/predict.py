"""ddp-predict: apply a model file written by `ddp-train --output` to a data set.

The data is read by `ddp.data.load_table`, as for training, except that targets
are optional: an .npz may lack y, a CSV may lack its target column.
"""
from __future__ import annotations

import os

import numpy as np

from . import data as ddata
from .command import console_script, exit_code, write_result
from .config import Config, command_parser
from .errors import EXIT_OK, UsageError
from .files import check_output_target
from .api_model import Model
from .model import loss_sum, quiet_float_warnings
from .validation import MAX_COUNT

PROG = "ddp-predict"

PREDICT_DESCRIPTION = """\
Apply a model written by `ddp-train --output` to a data set: prints loss and
accuracy when the data has targets and writes predictions (class indices for
cross-entropy, outputs for mse) to --output as .npy.

Exit codes: 0 done; 1 internal error; 2 bad input; 4 cannot write the output."""

DEFAULT_PREDICTIONS = "predictions.npy"


def _parser():
    p = command_parser(PROG, PREDICT_DESCRIPTION)
    p.add_argument("--model", required=True, metavar="MODEL.npz", help="model file from ddp-train --output")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a .npz (X, optional y), a .csv (header; target last, optional) or spiral/digits")
    p.add_argument("--output", metavar="PREDS.npy",
                   help="write predictions here (default when the data has no targets: predictions.npy)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass")
    return p


def run_predict(argv: list[str] | None = None) -> int:
    """ddp-predict with `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = _parser()
    quiet_float_warnings()
    try:
        args = _parse(parser, argv)
        model = Model.load(args.model)
        X, y = _inputs(args.data, model)
        preds, line = _predict(model, X, y, args.batch_size)
        if line is not None:
            print(line, flush=True)
        out = args.output if args.output is not None or y is not None else _default_output()
        if out:
            _save(out, preds, model.config["loss"], given=bool(args.output))
        return EXIT_OK
    except BaseException as e:
        return exit_code(PROG, e)


def _parse(parser, argv):
    args = parser.parse_args(argv)
    if not 0 < args.batch_size <= MAX_COUNT:
        raise UsageError(f"--batch-size must be a positive integer (at most {MAX_COUNT:,}), "
                         f"got {args.batch_size}")
    if args.output:  # refused now, not after the predictions were computed
        args.output = _predictions_path(args.output)
    return args


def _predictions_path(path: str) -> str:
    """--output as numpy.save names it (.npy added), refused unless a file can go there."""
    if not path.endswith(".npy"):
        path += ".npy"
    check_output_target(path, "--output")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {path}: directory {parent} does not exist")
    return path


def _inputs(spec: str, model: Model):
    """(X, y or None) of --data, checked against the model's input and output sizes."""
    cfg = model.config
    n_in, n_out = model.layout.layers[0], model.layout.layers[-1]
    X, y = ddata.load_table(spec, _data_config(cfg), need_y=False, n_inputs=n_in)
    what = f"--data {spec}"
    ddata.check_inputs(X, what)
    if X.shape[1] != n_in:
        raise UsageError(f"{what}: samples have {X.shape[1]} features, the model expects {n_in}")
    if y is not None:
        y = ddata.check_targets(np.asarray(y), len(X), cfg["loss"], n_out, what, model.flat.dtype)
    return X, y


def _data_config(model_cfg: dict) -> Config:
    """What the built-in data sets (spiral, random:N) are generated from: the training run's."""
    training = model_cfg.get("training", {})
    return Config(seed=int(training.get("seed", 0)), samples=training.get("samples"),
                  layers=tuple(model_cfg["layers"]), loss=model_cfg["loss"])


def _predict(model: Model, X, y, batch_size: int):
    """(predictions, the loss/accuracy line or None without targets)."""
    loss = model.config["loss"]
    classes = loss == "cross-entropy"
    outputs, total_loss, correct = [], 0.0, 0
    for rows, z in model.outputs(X, batch_size):
        pred = z.argmax(axis=1) if classes else z
        outputs.append(pred)
        if y is not None:
            if classes:
                correct += int(np.count_nonzero(pred == y[rows]))
            total_loss += loss_sum(loss, z, y[rows])
    preds = np.concatenate(outputs)
    if y is None:
        return preds, None
    line = f"{len(X)} samples: loss {total_loss / len(X):.6f}"
    if classes:
        line += f" accuracy {correct / len(X):.4f}"
    return preds, line


def _default_output() -> str:
    """Where predictions of data without targets go when no --output was given."""
    out = DEFAULT_PREDICTIONS
    if os.path.lexists(out):
        raise UsageError(f"the data has no targets, so the predictions go to {out}, which "
                         f"exists; give --output PATH (an existing file there is replaced)")
    return out


def _save(out: str, preds: np.ndarray, loss: str, given: bool) -> None:
    write_result(out, "--output", lambda fh: np.save(fh, preds))
    what = "class indices" if loss == "cross-entropy" else "outputs"
    print(f"predictions ({what}) for {len(preds)} samples written to {os.path.abspath(out)}"
          + ("" if given else " (no --output given)"), flush=True)


predict_main = console_script(run_predict)
