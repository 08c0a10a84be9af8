"""Shared fixtures: tests run from the repository root, whatever directory pytest was started in."""
import project_lib  # noqa: F401  (before NumPy: pins the portable numerical paths, as the stages do)
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _run_from_repository_root():
    os.chdir(ROOT)
    yield


def volts(mask, active_mv=-30.0, rest_mv=-70.0):
    """A field in volts: `active_mv` where `mask` is set, `rest_mv` elsewhere."""
    import numpy as np
    return np.where(mask, active_mv, rest_mv) / 1000.0
