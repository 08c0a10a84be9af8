"""The stage shape every study follows (README, "Stages"): train (MFN: simulate) -> evaluate -> render -> render_index,
where training depends only on what changes what is trained and evaluation never on rendering code."""
import re
from pathlib import Path

import pytest
import yaml

STUDIES = {"mfn": "simulate_mfn", "cryoem": "train_cryoem", "cryoem_al": "train_cryoem_al", "synapse": "train_synapse",
           "cascade": "train_cascade"}
STAGES = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load(Path("params.yaml").read_text())
ANALYSIS_MODULES = {"analysis", "al_analysis", "compare", "stats", "study"}   # what only evaluation imports


def _paths(entries):
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_every_study_has_the_four_stages_and_nothing_else():
    expected = {"render_index"} | {s for study, train in STUDIES.items() for s in (train, f"evaluate_{study}", f"render_{study}")}
    assert set(STAGES) == expected


@pytest.mark.parametrize("study", STUDIES)
def test_training_depends_only_on_what_changes_what_is_trained(study):
    train = STAGES[STUDIES[study]]
    deps = _paths(train["deps"])
    assert not any(d.endswith("report.py") for d in deps), deps
    assert not [d for d in deps if Path(d).stem in ANALYSIS_MODULES], "training must not depend on analysis modules"
    assert "project_lib" not in deps and f"project_lib/{study}" not in deps, "training lists the modules it imports, not whole packages"
    assert f"{study}_analysis" not in train.get("params", []) and study in train["params"]
    assert f"{study}_analysis" in PARAMS, f"params.yaml has no {study}_analysis group for evaluation-only parameters"
    assert set(PARAMS[f"{study}_analysis"]) == set(PARAMS[study]) == {"tiny", "cpu", "paper"}
    for profile in PARAMS[study]:
        assert not set(PARAMS[study][profile]) & set(PARAMS[f"{study}_analysis"][profile])
    persisted = [next(iter(o)) for o in train["outs"] if isinstance(o, dict) and next(iter(o.values())).get("persist")]
    assert persisted, "finished trainings must survive `dvc repro` (persist: true)"
    assert all(next(iter(o.values())).get("cache") is False for o in train["outs"] if isinstance(o, dict) and next(iter(o)) in persisted), \
        "trained artefacts must not be copied into DVC's cache (cache: false): at the paper profile that doubles the disk"


@pytest.mark.parametrize("study", STUDIES)
def test_evaluation_reads_the_trainings_and_never_rendering_code(study):
    evaluate, train = STAGES[f"evaluate_{study}"], STAGES[STUDIES[study]]
    deps = _paths(evaluate["deps"])
    assert not any(d.endswith("report.py") for d in deps)
    assert set(_paths(train["outs"])) & set(deps), "evaluation depends on the training stage's outputs"
    assert f"{study}_analysis" in evaluate["params"]
    assert evaluate.get("metrics") and evaluate.get("plots"), "headline numbers as DVC metrics, key curves as DVC plots"
    render = STAGES[f"render_{study}"]
    assert "project_lib/report.py" in _paths(render["deps"]) and set(_paths(evaluate["outs"]) + _paths(evaluate["metrics"])) & set(_paths(render["deps"]))


def test_outputs_of_stages_never_overlap():
    outs = [o for s in STAGES.values() for o in _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))]
    for a in outs:
        for b in outs:
            assert a == b or not b.startswith(a.rstrip("/") + "/"), (a, b)
    assert len(outs) == len(set(outs))


def test_dvc_accepts_the_pipeline():
    """DVC itself validates dvc.yaml (e.g. a plot's y must be one column): what `dvc repro` would refuse fails here."""
    import shutil
    import subprocess
    import sys
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    result = subprocess.run([dvc, "stage", "list"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in STAGES)
