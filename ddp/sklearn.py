"""scikit-learn estimators over ddp.train: DDPClassifier and DDPRegressor.

Needs scikit-learn (``pip install "ddp-train[sklearn]"``). The constructor's
parameters are named as `sklearn.neural_network.MLPClassifier`'s where they mean
the same; each fit is one ``ddp.train`` run (in process by default, float64).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .api import train
from .api_model import Model

ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": "identity"}
SOLVERS = ("sgd", "adam", "adamw")


class _DDPEstimator(BaseEstimator):
    """What the classifier and the regressor share: the parameters, the run's keys and fit."""

    _loss = "mse"

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, momentum=0.9, nesterovs_momentum=True,
                 early_stopping=False, validation_fraction=0.1, n_iter_no_change=10, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-8, n_workers=None, backend="mpi"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_workers = n_workers
        self.backend = backend

    def _keys(self, n_samples: int, n_features: int, n_outputs: int, seed: int) -> dict:
        """The ddp.train keys these parameters mean for a data set of this shape."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        hidden = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else list(
            self.hidden_layer_sizes)
        batch = min(200, n_samples) if self.batch_size == "auto" else min(int(self.batch_size), n_samples)
        keys = dict(layers=[n_features, *map(int, hidden), n_outputs], activation=ACTIVATIONS[self.activation],
                    loss=self._loss, dtype="float64", optimizer=self.solver, lr=self.learning_rate_init,
                    l2=self.alpha, batch_size=batch, epochs=int(self.max_iter), seed=seed,
                    shuffle=bool(self.shuffle), log_every=1, backend=self.backend)
        if self.solver == "sgd":
            keys.update(momentum=self.momentum, nesterov=bool(self.nesterovs_momentum and self.momentum > 0))
        else:
            keys.update(betas=f"{self.beta_1},{self.beta_2}", eps=self.epsilon)
        if self.backend == "zmq":
            keys["workers"] = self.n_workers
        if self.early_stopping:
            n_train = n_samples - int(round(self.validation_fraction * n_samples))
            keys.update(val_fraction=self.validation_fraction, early_stopping=int(self.n_iter_no_change),
                        min_delta=self.tol, eval_every=max(1, math.ceil(n_train / batch)))
        return keys

    def _fit(self, X, y, sample_weight, init: Model | None, epochs: int | None = None):
        """One ddp.train run on (X, y): the learned attributes set from its result."""
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        keys = self._keys(len(X), X.shape[1], y.shape[1] if y.ndim == 2 else self._n_outputs, seed)
        if epochs is not None:
            keys["epochs"] = epochs
        w = None if sample_weight is None else _check_sample_weight(sample_weight, X, dtype=np.float64)
        result = train(X=X, y=y, sample_weight=w, verbose=bool(self.verbose), init_params=init, **keys)
        self.model_ = result.model
        curve = _epoch_losses(result.steps)
        self.loss_curve_ = (getattr(self, "loss_curve_", []) if init is not None else []) + curve
        self.loss_ = self.loss_curve_[-1] if self.loss_curve_ else float(result.summary["final_loss"])
        self.n_iter_ = (getattr(self, "n_iter_", 0) if init is not None else 0) + len(curve)
        self.t_ = self.n_iter_ * keys["batch_size"]
        self.summary_ = result.summary
        self.n_layers_ = len(keys["layers"])
        self.n_outputs_ = keys["layers"][-1]
        return self

    @property
    def coefs_(self) -> list[np.ndarray]:
        check_is_fitted(self, "model_")
        return [self.model_.params[f"W{i}"] for i in range(self.model_.layout.n_layers)]

    @property
    def intercepts_(self) -> list[np.ndarray]:
        check_is_fitted(self, "model_")
        return [self.model_.params[f"b{i}"] for i in range(self.model_.layout.n_layers)]

    def _inputs(self, X, reset: bool):
        return validate_data(self, X, reset=reset, dtype=np.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags


def _epoch_losses(steps: list[dict]) -> list[float]:
    """The mean logged loss of each epoch (MLPClassifier's loss_curve_): steps are logged
    one by one, their epoch a fraction that reaches a whole number at each epoch's end."""
    by_epoch: dict[int, list[float]] = {}
    for s in steps:
        by_epoch.setdefault(math.ceil(s["epoch"] - 1e-9), []).append(s["loss"])
    return [float(np.mean(v)) for _, v in sorted(by_epoch.items())]


class DDPClassifier(ClassifierMixin, _DDPEstimator):
    """A multilayer perceptron classifier trained data-parallel by ddp-train.

    Cross-entropy over softmax outputs (one per class, also for two classes).

    Parameters
    ----------
    hidden_layer_sizes : array-like of shape (n_layers - 2,), default=(100,)
        The sizes of the hidden layers.
    activation : {"relu", "tanh", "logistic", "identity"}, default="relu"
        The hidden layers' activation ("logistic" is ddp-train's sigmoid).
    solver : {"adam", "sgd", "adamw"}, default="adam"
        The optimizer.
    alpha : float, default=0.0001
        ddp-train's ``l2``: ``½·alpha·Σ‖W‖²`` is added to the mean loss (MLPClassifier
        divides its penalty by the batch size; this one does not, so that fitting with
        weights equals fitting with repeated rows whatever the data's size).
    batch_size : int or "auto", default="auto"
        Global batch size; "auto" is ``min(200, n_samples)``.
    learning_rate_init : float, default=0.001
        The learning rate (constant).
    max_iter : int, default=200
        Epochs (every one of them runs unless early stopping ends the run).
    shuffle : bool, default=True
        Shuffle the samples each epoch.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialization, the shuffling and the validation split.
    tol : float, default=1e-4
        With early stopping: the least decrease of the validation loss that counts.
    verbose : bool, default=False
        Show ddp-train's log lines (or progress bar in a notebook).
    momentum : float, default=0.9
        solver="sgd": the momentum.
    nesterovs_momentum : bool, default=True
        solver="sgd": Nesterov's momentum.
    early_stopping : bool, default=False
        Hold out `validation_fraction` of the data, evaluate it each epoch and stop
        after `n_iter_no_change` epochs without a lower validation *loss*; the model
        is the best epoch's.
    validation_fraction : float, default=0.1
        The held-out fraction with early stopping.
    n_iter_no_change : int, default=10
        The early-stopping patience, in epochs.
    beta_1, beta_2 : float, default=0.9, 0.999
        Adam's decay rates.
    epsilon : float, default=1e-8
        Adam's ε.
    n_workers : int or None, default=None
        backend="zmq": worker processes to start (None: one per core).
    backend : {"mpi", "zmq"}, default="mpi"
        "mpi": in process (or with the other ranks under mpirun); "zmq": this
        process coordinates `n_workers` local worker processes.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels, of any type ``numpy.unique`` sorts.
    loss_curve_ : list of float
        Each epoch's mean training loss (L2 penalty included).
    loss_ : float
        The last epoch's loss.
    n_iter_ : int
        Epochs run.
    n_features_in_ : int
        Features seen in fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        The column names, when X had string column names.
    coefs_, intercepts_ : list of ndarray
        The weights and biases of each layer.
    model_ : ddp.Model
        The trained model.
    summary_ : dict
        The last run's summary.
    """

    _loss = "cross-entropy"

    def fit(self, X, y, sample_weight=None):
        """Train a new model on (X, y) for `max_iter` epochs; returns self."""
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        return self._fit_codes(X, codes, sample_weight, init=None)

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One more epoch on (X, y), from the current parameters (a new model at first).

        Parameters
        ----------
        classes : array-like of shape (n_classes,), default=None
            Every class label; required at the first call.
        """
        first = not hasattr(self, "model_")
        X, y = validate_data(self, X, y, reset=first, dtype=np.float64)
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self.classes_ = np.unique(classes)
        unknown = np.setdiff1d(y, self.classes_)
        if len(unknown):
            raise ValueError(f"y holds labels not in classes: {unknown[:5]}")
        codes = np.searchsorted(self.classes_, y)
        return self._fit_codes(X, codes, sample_weight, None if first else self.model_, epochs=1)

    def _fit_codes(self, X, codes, sample_weight, init, epochs=None):
        if len(self.classes_) < 2:
            raise ValueError(f"the data holds 1 class ({self.classes_[0]!r}); a classifier "
                             f"needs samples of at least 2 classes")
        self._n_outputs = len(self.classes_)
        return self._fit(X, codes, sample_weight, init, epochs)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (softmax), shape (n_samples, n_classes), in `classes_` order."""
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(self._inputs(X, reset=False))

    def predict_log_proba(self, X) -> np.ndarray:
        """The logarithm of `predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class label of each sample."""
        check_is_fitted(self, "model_")
        return self.classes_[self.model_.predict(self._inputs(X, reset=False))]


class DDPRegressor(RegressorMixin, _DDPEstimator):
    """A multilayer perceptron regressor trained data-parallel by ddp-train (squared error).

    The parameters and attributes are `DDPClassifier`'s, without ``classes_``;
    ``score`` is R². The outputs are linear; one per target column.
    """

    def fit(self, X, y, sample_weight=None):
        """Train a new model on (X, y) for `max_iter` epochs; returns self."""
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64, multi_output=True, y_numeric=True)
        return self._fit_targets(X, y, sample_weight, init=None)

    def partial_fit(self, X, y, sample_weight=None):
        """One more epoch on (X, y), from the current parameters (a new model at first)."""
        first = not hasattr(self, "model_")
        X, y = validate_data(self, X, y, reset=first, dtype=np.float64, multi_output=True, y_numeric=True)
        return self._fit_targets(X, y, sample_weight, None if first else self.model_, epochs=1)

    def _fit_targets(self, X, y, sample_weight, init, epochs=None):
        self._y_1d = y.ndim == 1
        self._n_outputs = 1 if y.ndim == 1 else y.shape[1]
        return self._fit(X, y.astype(np.float64), sample_weight, init, epochs)

    def predict(self, X) -> np.ndarray:
        """The model's outputs, shape (n_samples,) or (n_samples, n_outputs) as y was."""
        check_is_fitted(self, "model_")
        z = self.model_.predict(self._inputs(X, reset=False))
        return z.ravel() if self._y_1d else z

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # one output per target column
        return tags
