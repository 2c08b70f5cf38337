"""The `config` entry of a model file, checked field by field before any of it is used.

A model file may come from anywhere: every field ddp-predict reads (the architecture,
the standardization, the training seed and samples that regenerate spiral data) is
checked for its type and range here, so a crafted file is one line and exit 2.
"""
from __future__ import annotations

import math

from .config import DTYPES, MAX_COUNT, MAX_LAYER
from .errors import DataError
from .model import ACTIVATIONS, LOSSES


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_model_config(config, what: str) -> tuple[tuple[int, ...], bool]:
    """(layers, bias) of a valid model description; DataError naming the bad field."""
    def need(cond: bool, field: str, expected: str):
        if not cond:
            raise DataError(f"{what}: its 'config' entry is not a valid model description "
                            f"({field} must be {expected})")

    need(isinstance(config, dict), "config", "a JSON object")
    layers = config.get("layers")
    need(isinstance(layers, list) and len(layers) >= 2
         and all(_is_int(n) and 1 <= n <= MAX_LAYER for n in layers),
         "layers", f"a list of at least 2 integers in [1, {MAX_LAYER}]")
    need(isinstance(config.get("bias"), bool), "bias", "true or false")
    need(config.get("activation") in ACTIVATIONS, "activation", f"one of {', '.join(ACTIVATIONS)}")
    need(config.get("loss") in LOSSES, "loss", f"one of {', '.join(LOSSES)}")
    need(config.get("dtype", "float64") in DTYPES, "dtype", f"one of {', '.join(DTYPES)}")
    std = config.get("standardize")
    if std is not None:
        need(isinstance(std, dict) and set(std) >= {"mean", "std"}, "standardize",
             "null or an object with mean and std")
        for key in ("mean", "std"):
            v = std[key]
            need(isinstance(v, list) and len(v) == layers[0] and all(_is_real(x) for x in v),
                 f"standardize.{key}", f"a list of {layers[0]} finite numbers (one per input)")
        need(all(x > 0 for x in std["std"]), "standardize.std", "positive")
    training = config.get("training", {})
    need(isinstance(training, dict), "training", "an object")
    seed, samples = training.get("seed", 0), training.get("samples")
    need(_is_int(seed) and 0 <= seed <= MAX_COUNT, "training.seed", "an integer >= 0")
    need(samples is None or (_is_int(samples) and 0 < samples <= MAX_COUNT), "training.samples",
         "null or a positive integer")
    return tuple(layers), config["bias"]
