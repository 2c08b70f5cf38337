"""ddp.train: a training run from Python, with the keys of the TOML config or with
arrays, in process, under mpirun (every rank calls it) or on ZeroMQ workers."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .api_model import Model
from .config import FIELDS, Config, _coerce, _unknown_key_message, load_toml
from .errors import EXIT_INTERNAL, EXIT_OK, EXIT_SIGNAL_BASE, DDPError, UsageError
from .log import Log
from .model import quiet_float_warnings
from .session import Training, check_zmq_run
from .signals import StopRequest
from .validation import validate

PROG = "ddp.train"


@dataclass
class TrainResult:
    """What `ddp.train` returns.

    Attributes
    ----------
    model : Model or None
        The trained model (the best parameters under early stopping); None when the
        run was stopped by a signal before its last step.
    summary : dict
        The run's summary, as ``ddp-train --summary-json`` writes it.
    history : list of dict
        The ``--log-jsonl`` record: one dict per logged step (``"event": "step"``,
        with step, epoch, loss, accuracy, val_loss, …) and per event (start, end, …).
        Under mpirun only rank 0 has it; the other ranks get an empty list.
    """

    model: Model | None
    summary: dict
    history: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> list[dict]:
        """The logged steps of `history`."""
        return [r for r in self.history if r.get("event") == "step"]


def train(config: str | None = None, *, X=None, y=None, sample_weight=None, verbose: bool = True,
          init_params: Model | None = None, **keys) -> TrainResult:
    """Train a multilayer perceptron as ``ddp-train`` does and return the result.

    Parameters
    ----------
    config : str, optional
        A TOML file of config keys, as ``ddp-train --config``; keyword arguments
        override its keys, as flags do.
    X : array-like of shape (n_samples, n_features), optional
        Training inputs, instead of the ``data`` key.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs), optional
        Targets: class indices 0..K-1 for cross-entropy, values for mse.
    sample_weight : array-like of shape (n_samples,), optional
        Per-sample weights (the ``w`` array of a data file).
    verbose : bool, default=True
        False shows errors only (``quiet = true``): no log lines, warnings or
        progress bar. True shows a progress bar in a notebook (tqdm.auto).
    init_params : Model, optional
        Start from these parameters (``--init``) instead of a random start.
    **keys
        Any key of the TOML config (``data``, ``layers``, ``optimizer``, ``lr``,
        ``epochs``, ``backend``, ``workers``, …).

    Returns
    -------
    TrainResult
        ``.model``, ``.summary`` and ``.history``.

    Raises
    ------
    ddp.errors.DDPError
        Bad keys, data or files (UsageError, DataError), a diverged run
        (DivergedError), an unwritable output (OutputError): the message is the
        line that ``ddp-train`` prints after ``ddp-train: error:``.

    Notes
    -----
    Under ``mpirun -n N`` every rank calls ``train`` with its own copy of the same
    arguments and they train together; every rank gets the same model and summary.
    With ``backend="zmq", workers=N`` this process becomes the coordinator of N
    local worker processes. Arrays reach the run (and the workers) as an
    uncompressed .npz in a private temporary directory, read memory-mapped; the
    directory is removed when ``train`` returns or raises.
    """
    scratch = tempfile.mkdtemp(prefix="ddp-train-")
    try:
        values = _values(config, keys, verbose)
        if X is not None or y is not None:
            values["data"] = _write_arrays(scratch, X, y, sample_weight, "data" in values)
        elif sample_weight is not None:
            raise UsageError("sample_weight needs X and y (a data file carries its weights as w)")
        if init_params is not None:
            values["init"] = os.path.join(scratch, "init.npz")
            init_params.save(values["init"])
        values.setdefault("output", os.path.join(scratch, "model.npz"))
        values.setdefault("log_jsonl", os.path.join(scratch, "log.jsonl"))
        scratch_keys = [k for k in ("data", "init", "output", "log_jsonl")
                        if str(values.get(k, "")).startswith(scratch)]
        cfg = Config(**values)
        validate(cfg)
        with _process_state():
            result = _run(cfg)
        if result.model is not None:  # the scratch files' paths mean nothing once they are gone
            training = result.model.config.get("training", {})
            for key in scratch_keys:
                training[key] = None
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _process_state():
    """The run sets numpy's error mode and the BLAS threads as ddp-train does for its
    process; the caller's process gets its own back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    errors = np.geterr()
    blas = {pool["user_api"]: pool["num_threads"] for pool in threadpool_info()}
    quiet_float_warnings()
    try:
        yield
    finally:
        threadpool_limits(limits=blas)
        np.seterr(**errors)


def _values(config: str | None, keys: dict, verbose: bool) -> dict:
    """The config's keys: the file's, then the keyword arguments, checked as TOML values."""
    values = load_toml(config) if config is not None else {}
    for name, value in keys.items():
        if name not in FIELDS:
            raise UsageError(_unknown_key_message(name, PROG))
        if isinstance(value, np.generic):  # numpy scalars (a grid search's values)
            value = value.item()
        if value is not None:
            values[name] = _coerce(name, value, PROG)
    if not verbose:
        values["quiet"] = True
    elif "ipykernel" in sys.modules and "progress" not in values:
        values["progress"] = "always"  # a notebook's stderr is no terminal, yet shows a bar
    return values


def _write_arrays(directory: str, X, y, w, data_given: bool) -> str:
    """X, y (and w) as an uncompressed .npz, which the data loader memory-maps."""
    if data_given:
        raise UsageError("give the training data either as data= or as X= and y=, not both")
    if X is None or y is None:
        raise UsageError("X and y go together: give both (or data= a data file)")
    arrays = {"X": _array(X, "X"), "y": _array(y, "y")}
    if w is not None:
        arrays["w"] = _array(w, "sample_weight")
    path = os.path.join(directory, "data.npz")
    np.savez(path, **arrays)
    return path


def _array(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise UsageError(f"{name} must be numeric, got dtype {a.dtype}")
    return a


def _comm(cfg: Config):
    from ddp.coordinator.mpi import LocalComm, launched_size, make_comm

    if cfg.backend == "zmq":
        check_zmq_run(cfg, PROG, launched_size())
        return LocalComm()
    # alone, the run needs no MPI (a world of one)
    return LocalComm() if launched_size() <= 1 else make_comm()


def _run(cfg: Config) -> TrainResult:
    """Train `cfg`; the error of a failed run raised, as ddp-train would say it."""
    wall_start = time.perf_counter()
    comm = _comm(cfg)
    log = Log(comm.rank, PROG, level="error" if cfg.quiet else "info")
    stop = StopRequest()
    training = Training(PROG, cfg, comm, log, stop, wall_start)
    code = EXIT_INTERNAL
    try:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            stop.install()
        summary = training.run()
        code = EXIT_SIGNAL_BASE + summary["signal"] if summary["interrupted"] else EXIT_OK
        model = _final_model(cfg, comm, training, summary)
        return TrainResult(model, summary, _history(cfg.log_jsonl) if comm.rank == 0 else [])
    except DDPError as e:
        code = e.exit_code
        if comm.world_size > 1 and not (e.agreed or e.collective):
            # raised on this rank alone: the others may wait for it in a collective
            from .command import print_error

            print_error(PROG, e, comm.rank)
            comm.abort(code)
        raise
    finally:
        stop.restore()
        if training.monitor is not None:
            training.monitor.close(code, training.summary)


def _final_model(cfg: Config, comm, training: Training, summary: dict) -> Model | None:
    """The model rank 0 wrote, on every rank (rank 0 sends its parameters)."""
    if summary["interrupted"]:
        return None
    from ddp.coordinator.run import model_config

    layout = training.setup.layout
    if comm.rank == 0:
        model = Model.load(cfg.output, "--output")
    else:
        model = Model(layout, np.empty(layout.size, np.dtype(cfg.dtype)), model_config(training.setup))
    if comm.world_size > 1:
        comm.bcast_(model.flat)
    return model


def _history(path: str) -> list[dict]:
    """The --log-jsonl record of this run (the file may hold earlier runs' too: the last
    run begins at its last start event)."""
    try:
        with open(path) as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return []
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    return records[starts[-1]:] if starts else records
