"""ddp.sklearn's estimators: scikit-learn's own estimator checks, and the estimators
inside Pipeline, GridSearchCV and clone, with labels of any type and partial_fit."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
from inproc import deadline, isolated  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from ddp.sklearn import DDPClassifier, DDPRegressor  # noqa: E402


# the default parameters (seeded: some checks compare two fits); no check is skipped
# or expected to fail (those that need pandas skip themselves when it is absent)
@parametrize_with_checks([DDPClassifier(random_state=0), DDPRegressor(random_state=0)])
def test_scikit_learn_estimator_checks(estimator, check):
    with deadline(), isolated():
        check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600], y[:600]


def test_grid_search_over_two_learning_rates_in_a_pipeline(digits):
    X, y = digits
    pipe = make_pipeline(StandardScaler(), DDPClassifier(hidden_layer_sizes=(32,), max_iter=15,
                                                         random_state=0))
    search = GridSearchCV(pipe, {"ddpclassifier__learning_rate_init": [1e-3, 1e-2]}, cv=3)
    with deadline(), isolated():
        search.fit(X, y)
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert search.best_params_["ddpclassifier__learning_rate_init"] in (1e-3, 1e-2)
    assert search.score(X, y) > 0.9


def test_clone_keeps_the_parameters_and_drops_the_fit(digits):
    X, y = digits
    est = DDPClassifier(hidden_layer_sizes=(16, 8), solver="sgd", momentum=0.5, max_iter=3,
                        random_state=1)
    with deadline(), isolated():
        est.fit(X, y)
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    assert not hasattr(twin, "model_")
    with deadline(), isolated():
        twin.fit(X, y)
    np.testing.assert_array_equal(twin.predict_proba(X), est.predict_proba(X))  # seeded alike


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "emu"]), np.array([-5, 7, 100]),
                                    np.array([1.0, 2.0, 3.0])])
def test_labels_of_any_type(labels):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 4))
    codes = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)
    y = labels[codes]
    est = DDPClassifier(hidden_layer_sizes=(16,), max_iter=100, learning_rate_init=0.01, random_state=0)
    with deadline(), isolated():
        est.fit(X, y)
    np.testing.assert_array_equal(est.classes_, np.sort(labels))
    pred = est.predict(X)
    assert pred.dtype == labels.dtype and set(pred) <= set(labels)
    assert est.score(X, y) > 0.8
    assert est.n_features_in_ == 4 and est.n_iter_ == 100 and len(est.loss_curve_) == 100


def test_partial_fit_is_one_more_epoch_from_the_current_parameters(digits):
    X, y = digits
    full = DDPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0, shuffle=False)
    with deadline(), isolated():
        full.fit(X, y)
        step = DDPClassifier(hidden_layer_sizes=(16,), max_iter=2, random_state=0, shuffle=False)
        step.fit(X, y)
        step.partial_fit(X, y)
    assert step.n_iter_ == 3 and len(step.loss_curve_) == 3
    # Adam's moments start over at each call, so the third epoch differs from fit's: it
    # moves on from the current parameters, not from a new start
    assert step.loss_curve_[2] < step.loss_curve_[0]
    first = DDPClassifier(hidden_layer_sizes=(16,), random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        first.partial_fit(X, y)
    with deadline(), isolated():
        first.partial_fit(X, y, classes=np.arange(10))
    assert first.n_iter_ == 1


def test_regressor_multi_output_and_r2(digits):
    X, _ = digits
    X = StandardScaler().fit_transform(X)
    Y = np.column_stack([X[:, 10] + X[:, 20], X[:, 30] - X[:, 40]])
    est = DDPRegressor(hidden_layer_sizes=(32,), max_iter=60, learning_rate_init=0.01, random_state=0)
    with deadline(), isolated():
        est.fit(X, Y)
    assert est.predict(X).shape == Y.shape
    assert est.score(X, Y) > 0.9
    with deadline(), isolated():
        est.fit(X, Y[:, 0])
    assert est.predict(X).shape == (len(X),)


def test_sample_weight_zero_rows_are_as_absent(digits):
    X, y = digits
    w = np.ones(len(X))
    w[:100] = 0
    with deadline(), isolated():
        weighted = DDPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0, shuffle=False,
                                 batch_size=len(X)).fit(X, y, sample_weight=w)
    assert weighted.n_iter_ == 2 and np.isfinite(weighted.loss_)
