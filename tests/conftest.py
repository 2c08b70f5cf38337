"""pytest's hooks and fixtures; what the tests import is in helpers.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import SESSION_TMP


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture
def classification_npz(tmp_path):
    """A small separable 3-class problem in an .npz (X float64, y int)."""
    rng = np.random.default_rng(7)
    centers = np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    y = rng.integers(0, 3, 90)
    X = centers[y] + 0.3 * rng.standard_normal((90, 4))
    path = tmp_path / "cls.npz"
    np.savez(path, X=X, y=y)
    return path
