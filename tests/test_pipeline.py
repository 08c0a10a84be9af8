"""The MFN stage end to end in the tiny profile: papermill study notebook -> outputs -> HTML report."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from project_lib.mfn.dataset import read_dataset
from project_lib.report import external_references


def _stage_cmd(name):
    return yaml.safe_load(Path("dvc.yaml").read_text())["stages"][name]["cmd"]


def test_dvc_stages_use_the_profile_and_report_dir():
    assert "${profile}" in _stage_cmd("run_mfn") and "${report_dir}/mfn.html" in _stage_cmd("render_mfn")


def test_mfn_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out = tmp_path / "tiny" / "mfn"
    out.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "papermill", "-k", "python3", "--no-progress-bar", "--cwd", ".", "nbs/studies/mfn.ipynb",
                    out / "mfn.ipynb", "-p", "profile", "tiny", "-p", "output_root", str(tmp_path)],
                   check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_simulations"] == {"default": 24, "v41": 24}
    df, meta = read_dataset(out / "datasets" / "mfn_default.parquet")
    assert len(df) == 24 and meta["dynamics"] == ["default"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["profile"] == "tiny" and prov["wall_time_s"] > 0
    assert {p.name for p in (out / "figures").iterdir()} >= {"example-fields.png", "feature-correlation.png"}
    subprocess.run([sys.executable, "-m", "project_lib.report", "render", out / "mfn.ipynb", "--provenance",
                    out / "provenance.json", "--out", tmp_path / "reports" / "mfn.html", "--title", "MFN"], check=True)
    html = (tmp_path / "reports" / "mfn.html").read_text()
    assert external_references(html) == [] and "Profile tiny" in html
    assert html.count("data:image/png;base64") >= 4                 # the figures are embedded
    assert "generate_dataset(" not in html                          # code inputs are hidden
