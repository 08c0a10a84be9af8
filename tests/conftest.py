"""Shared fixtures: tests run from the repository root, whatever directory pytest was started in."""
import os

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # several test workers share the cores: one compute thread each (and in the notebooks they start), so that they do not
    # oversubscribe them (measured on 2 cores: `pytest -n 2` took 10.1 minutes with the default threads, 7.6 with one)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"): os.environ.setdefault(_var, "1")

import project_lib  # noqa: E402,F401  (before NumPy: pins the portable numerical paths, as the stages do)
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
