"""`ddp.Model`: a trained model file (ddp-train --output) as a Python object."""
from __future__ import annotations

import numpy as np

from . import checkpoint as ckpt
from .model import Layout, forward, log_softmax

PREDICT_BATCH = 4096  # rows per forward pass: bounds the activations' memory


class Model:
    """A multilayer perceptron read from, or written to, a model file.

    Parameters
    ----------
    layout : Layout
        The layer sizes and whether there are biases.
    flat : ndarray
        The parameters in one flat buffer, as `layout` places them.
    config : dict
        The model file's config entry (layers, activation, loss, dtype,
        standardize, training).

    Attributes
    ----------
    params : dict of str to ndarray
        ``W0, b0, W1, …``: copies of the flat buffer's parts.
    config : dict
        As given.
    """

    def __init__(self, layout: Layout, flat: np.ndarray, config: dict):
        self.layout, self.flat, self.config = layout, flat, config

    @classmethod
    def load(cls, path: str, flag: str = "--model") -> "Model":
        """Read and validate a model file; raises ``ddp.errors.DataError`` on a bad one.

        Parameters
        ----------
        path : str
            A file written by ``ddp-train --output`` or `Model.save`.
        flag : str, default="--model"
            How error messages name the file.
        """
        found = ckpt.load_model(path, flag)
        return cls(found.layout, found.params, found.config)

    def save(self, path: str) -> None:
        """Write the model atomically in the file format of ``ddp-train --output``."""
        ckpt.save_model(path, self.layout, self.flat, self.config)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """``W0, b0, W1, …`` (copies), named as in the model file."""
        return self.layout.arrays(self.flat)

    @property
    def is_classifier(self) -> bool:
        """Trained with cross-entropy: predicts class indices."""
        return self.config["loss"] == "cross-entropy"

    def outputs(self, X, batch_size: int = PREDICT_BATCH):
        """Yield (rows, z): the output layer's z for consecutive batches of X,
        standardized as the training data was."""
        dtype = self.flat.dtype
        views = self.layout.views(self.flat)
        mean, inv_std = self._standardization()
        for start in range(0, len(X), batch_size):
            x = np.asarray(X[start:start + batch_size], dtype=dtype)
            if mean is not None:
                x = (x - mean) * inv_std
            yield slice(start, start + batch_size), forward(views, self.config["activation"], x)

    def _standardization(self):
        std = self.config.get("standardize")
        if not std:
            return None, None
        dtype = self.flat.dtype
        return np.asarray(std["mean"], dtype=dtype), 1.0 / np.asarray(std["std"], dtype=dtype)

    def decision_function(self, X) -> np.ndarray:
        """The output layer's values for every row of X, shape (n_samples, n_outputs)."""
        X = np.asarray(X)
        parts = [z for _, z in self.outputs(X)]
        return np.concatenate(parts) if parts else np.empty((0, self.layout.layers[-1]), self.flat.dtype)

    def predict(self, X) -> np.ndarray:
        """Class indices (cross-entropy) or outputs (mse) for every row of X."""
        z = self.decision_function(X)
        return z.argmax(axis=1) if self.is_classifier else z

    def predict_proba(self, X) -> np.ndarray:
        """Softmax class probabilities, shape (n_samples, n_classes); cross-entropy models only."""
        if not self.is_classifier:
            raise ValueError("predict_proba needs a cross-entropy model; this one was trained with mse")
        return np.exp(log_softmax(self.decision_function(X)))

    def score(self, X, y) -> float:
        """Accuracy (cross-entropy) or the coefficient of determination R² (mse),
        as scikit-learn's ``score`` (R² averaged uniformly over the outputs)."""
        pred, y = self.predict(X), np.asarray(y)
        if self.is_classifier:
            return float(np.mean(pred == y))
        return r2_score(y.reshape(pred.shape), pred)


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - Σ(y - ŷ)² / Σ(y - ȳ)² per output, averaged; a constant output scores 1 when
    predicted exactly and 0 otherwise (scikit-learn's convention)."""
    y = y.reshape(len(y), -1).astype(np.float64)
    pred = pred.reshape(len(pred), -1)
    residual = ((y - pred) ** 2).sum(axis=0)
    total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    safe = total > 0
    scores = np.where(residual == 0, 1.0, 0.0)
    scores[safe] = 1.0 - residual[safe] / total[safe]
    return float(scores.mean())
