"""The MFN stages: simulate_mfn writes the datasets and the clamp runs as engine units, evaluation only reads them."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from project_lib.core import load_study_params
from project_lib.mfn import stage
from project_lib.mfn.stage import MFNStudyParams
from project_lib.mfn.dataset import generate_dataset, sweep
from project_lib.mfn.features import FeatureConfig

SMALL = dataclasses.replace(load_study_params("mfn", MFNStudyParams, "tiny"), grid_sizes=[16], alphas=[0.05, 0.2], seeds=[0, 1], steps=[20])


def test_evaluation_refuses_without_the_simulations(tmp_path):
    bin_dir = Path(sys.executable).parent
    run = subprocess.run([bin_dir / "papermill", "-k", "python3", "--no-progress-bar", "--cwd", ".", "nbs/studies/mfn.ipynb",
                          tmp_path / "mfn.ipynb", "-p", "profile", "tiny", "-p", "output_root", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "not trained with this configuration" in run.stderr and "dataset-default" in run.stderr
    assert not (tmp_path / "tiny" / "mfn" / "runs").exists()                  # it never simulates


def test_a_finished_dataset_is_reused(tmp_path, monkeypatch):
    first = stage.simulate_study(SMALL, tmp_path)
    assert {k: r["n_simulations"] for k, r in first.items()} == {"dataset-default": 8, "dataset-v41": 8, "targets-default": 8, "growth-default": 6,
                                                                 "clamp-default": 8}
    def no_simulation(*args, **kwargs): raise AssertionError("a finished unit was simulated again")
    monkeypatch.setattr(stage, "generate_dataset", no_simulation)
    monkeypatch.setattr(stage, "clamp_effect", no_simulation)
    assert stage.simulate_study(dataclasses.replace(SMALL, n_jobs=2, bootstrap_resamples=7), tmp_path) == first   # workers and analysis params: same units


def test_a_changed_sweep_is_simulated_again(tmp_path):
    stage.simulate_study(SMALL, tmp_path)
    other = dataclasses.replace(SMALL, seeds=[0, 2])
    with pytest.raises(FileNotFoundError, match="dataset-default"):
        stage.load_study_data(other, tmp_path)                                  # stale for evaluation
    records = stage.simulate_study(other, tmp_path)
    datasets, clamp, audit = stage.load_study_data(other, tmp_path)
    assert records["dataset-default"]["n_simulations"] == 8 and sorted(set(clamp.random_seed)) == [0, 2]
    want = generate_dataset(sweep([16], [0.05, 0.2], [0, 2], [20], dynamics="v41"), feature_config=FeatureConfig(max_box_size=SMALL.max_box_size), progress=False)
    assert datasets["v41"].equals(want)
    assert sorted(set(audit["targets"].random_seed)) == [0, 2] and sorted(set(audit["growth"].steps)) == SMALL.growth_steps
