"""`data: cryoppp` end to end: a CryoPPP-layout folder written by the simulator (not real data), trained and evaluated by the
stages' notebooks (papermill, tiny profile, another params file), rendered; and the parameters it needs refused when wrong."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from project_lib.core import load_study_params
from project_lib.cryoem.io import read_cryoppp_folder, write_cryoppp_folder
from project_lib.cryoem.stage import CryoEMStudyParams, study_units
from project_lib.cryoem.train import simulate_dataset
from project_lib.report import external_references


def _cryoppp_params(tmp_path, folder, **changes):
    params = yaml.safe_load(Path("params.yaml").read_text())
    p = load_study_params("cryoem", CryoEMStudyParams, "tiny")
    cfg = p.micrograph_config()
    params["cryoem"]["tiny"].update({"data": "cryoppp", "cryoppp": {"folder": str(folder), "pixel_size_a": 10.0,
                                                                    "diameter_a": float(cfg.diameter_px * cfg.pixel_size_a)}, **changes})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path, p, cfg


@pytest.fixture
def folder(tmp_path):
    p = load_study_params("cryoem", CryoEMStudyParams, "tiny")
    mics = simulate_dataset(p.micrograph_config(), p.n_train + p.n_val + p.n_test, seed=7)
    return write_cryoppp_folder(mics, tmp_path / "10017", 10.0), mics


def test_a_cryoppp_folder_is_one_condition_of_the_micrographs_it_holds(folder, tmp_path):
    path, mics = folder
    params, p, _ = _cryoppp_params(tmp_path, path)
    q = load_study_params("cryoem", CryoEMStudyParams, "tiny", params)
    (name, (d, units)), = study_units(q).items()
    assert name == "10017" and d.alt_sets == {} and len(units) == 2 * len(q.seeds)
    split = {k: [int(i) for i in v] for k, v in d.split.items()}
    for k in ("train", "val", "test"):
        assert all(np.array_equal(a.mask, mics[i].mask) for a, i in zip(d.sets[k], split[k], strict=True))   # the particles where they were
    assert d.training_set(1) is d.sets["train"]                                       # real data: one training set for every seed
    assert units[0].identity["train_recipe"] == units[-1].identity["train_recipe"]


@pytest.mark.parametrize("changes, message", [({"data": "cryo"}, "data must be 'simulated' or 'cryoppp'"),
                                              ({"cryoppp": {"folder": "x"}}, "needs cryoppp with exactly the keys"),
                                              ({"cryoppp": {"folder": "x", "pixel_size_a": -1.0, "diameter_a": 100.0}}, "must be positive numbers")])
def test_bad_cryoppp_settings_are_refused_when_read(tmp_path, changes, message):
    params, *_ = _cryoppp_params(tmp_path, tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_study_params("cryoem", CryoEMStudyParams, "tiny", params)


def test_too_few_micrographs_in_the_folder_is_a_clear_error(tmp_path):
    p = load_study_params("cryoem", CryoEMStudyParams, "tiny")
    path = write_cryoppp_folder(simulate_dataset(p.micrograph_config(), 3, seed=1), tmp_path / "10028", 10.0)
    params, *_ = _cryoppp_params(tmp_path, path)
    with pytest.raises(ValueError, match="holds 3 micrographs; n_train \\+ n_val \\+ n_test = 16"):
        study_units(load_study_params("cryoem", CryoEMStudyParams, "tiny", params))


def test_the_stages_run_a_cryoppp_folder_end_to_end(folder, tmp_path):
    path, _ = folder
    params, p, _ = _cryoppp_params(tmp_path, path)
    out = tmp_path / "tiny" / "cryoem"
    (out / "train").mkdir(parents=True)
    papermill = [Path(sys.executable).parent / "papermill", "-k", "python3", "--no-progress-bar", "--cwd", "."]
    for notebook, target in (("cryoem_train", out / "train" / "cryoem_train.ipynb"), ("cryoem", out / "cryoem.ipynb")):
        subprocess.run([*papermill, f"nbs/studies/{notebook}.ipynb", target, "-p", "profile", "tiny", "-p", "output_root", str(tmp_path),
                        "-p", "params_file", str(params)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "project_lib.report", "render", out / "cryoem.ipynb", "--provenance", out / "provenance.json",
                    "--out", tmp_path / "cryoem.html", "--title", "cryoem"], check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["conditions"]) == ["10017"] and "f1_ideal_observer" not in metrics["conditions"]["10017"]
    assert "original_protocol_gap_min" not in metrics and metrics["pooled"]["k"] == 1
    assert len(list((out / "runs" / "10017").glob("*/unit.json"))) == 2 * len(p.seeds)
    provenance = json.loads((out / "provenance.json").read_text())
    assert "CryoPPP folder" in json.dumps(provenance)
    html = (tmp_path / "cryoem.html").read_text()
    assert external_references(html) == [] and "real data (CryoPPP folder 10017)" in html
