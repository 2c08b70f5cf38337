"""A run's data and model, loaded and validated once: the same on every rank, on the
ZeroMQ coordinator and on each of its workers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import data as ddata
from . import weights
from .config import Config
from .memory import check_model_fits
from .model import Layout


@dataclass
class Setup:
    """Everything a run needs, identical on every rank."""

    cfg: Config
    layout: Layout
    train: ddata.Dataset
    val: ddata.Dataset | None
    schedule: ddata.Schedule
    mean: np.ndarray | None
    std: np.ndarray | None
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def total_steps(self) -> int:
        return self.cfg.steps or self.cfg.epochs * self.schedule.steps_per_epoch

    def fingerprint(self) -> str:
        """The content hash of the training data (see data.fingerprint): what a ZeroMQ
        worker's data and a resumed checkpoint must match. Hashed on first use only: it
        reads every byte of the data."""
        if self._fingerprint is None:
            self._fingerprint = ddata.fingerprint(self.train, self.mean, self.std)
        return self._fingerprint


def prepare(cfg: Config) -> Setup:
    """Load and validate the data; resolve the layers. Raises DDPError on bad input."""
    data, layers = ddata.load(cfg.data, cfg)
    data = weights.with_weights(data, cfg.data, "--data", cfg.dtype)
    cfg = replace(cfg, layers=layers)
    val = None
    if cfg.val_fraction > 0:
        data, val = ddata.split(data, cfg.val_fraction, cfg.seed)
    elif cfg.val_data:
        val, _ = ddata.load(cfg.val_data, cfg, flag="--val-data")
        val = weights.with_weights(val, cfg.val_data, "--val-data", cfg.dtype)
    weights.check_some_weight(data, f"--data {cfg.data} (training rows)")
    if val is not None:
        weights.check_some_weight(val, f"--data {cfg.data} (validation rows)")
    if cfg.class_weight == "balanced":
        data = weights.with_class_weights(data)
    mean = std = None
    if cfg.standardize:
        mean, std = ddata.standardization(data)
    return assemble(cfg, data, val, mean, std)


def assemble(cfg: Config, train: ddata.Dataset, val: ddata.Dataset | None,
             mean: np.ndarray | None, std: np.ndarray | None) -> Setup:
    """The Setup of `cfg` (layers resolved) over data already loaded and checked for it:
    the memory check, the layout and the schedule."""
    check_model_fits(cfg.layers, cfg.bias, np.dtype(cfg.dtype).itemsize,
                     min(cfg.batch_size, max(len(train), 1), cfg.micro_batch or cfg.batch_size))
    schedule = ddata.Schedule(len(train), cfg.batch_size, cfg.seed, cfg.shuffle)
    return Setup(cfg, Layout(cfg.layers, cfg.bias), train, val, schedule, mean, std)
