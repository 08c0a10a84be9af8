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
    assert "${profile}" in _stage_cmd("simulate_mfn") and "${report_dir}/mfn.html" in _stage_cmd("render_mfn")


TRAINING_NOTEBOOK = {"mfn": "mfn_simulate"}   # the others: <study>_train


def _papermill(notebook, out_nb, tmp_path):
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "papermill", "-k", "python3", "--no-progress-bar", "--cwd", ".", f"nbs/studies/{notebook}.ipynb",
                    out_nb, "-p", "profile", "tiny", "-p", "output_root", str(tmp_path)], check=True, capture_output=True)


def _run_study(study, tmp_path):
    """The study's stages in the tiny profile: training notebook, evaluation notebook, render."""
    out = tmp_path / "tiny" / study
    (out / "train").mkdir(parents=True)
    training = TRAINING_NOTEBOOK.get(study, f"{study}_train")
    _papermill(training, out / "train" / f"{training}.ipynb", tmp_path)
    _papermill(study, out / f"{study}.ipynb", tmp_path)
    subprocess.run([sys.executable, "-m", "project_lib.report", "render", out / f"{study}.ipynb", "--provenance",
                    out / "provenance.json", "--out", tmp_path / "reports" / f"{study}.html", "--title", study], check=True)
    return out, (tmp_path / "reports" / f"{study}.html").read_text()


def test_cryoem_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("cryoem", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["conditions"]) == {"dose 20", "dose 0.3", "crowded, dose 0.3"}
    assert all(c["f1_oracle"] == 1.0 for c in metrics["conditions"].values())          # the ceiling is a ceiling
    split = json.loads((out / "conditions" / "dose-20" / "split.json").read_text())
    assert len(split["split"]["test"]) == 4 and split["data_hash"]
    runs = out / "conditions" / "crowded-dose-0.3" / "runs"
    assert (runs / "unet-s0" / "best.pt").is_file() and (runs / "attention_unet-s1" / "last.pt").is_file()
    assert len(list((out / "real_picks").glob("*.star"))) == 4
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 8
    assert "What the original protocol does to the same data" in html and "Where the arms part" in html
    assert "micrographs:" not in html                                                 # no progress bars in the report


def test_cryoem_al_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("cryoem_al", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["aulc"]) == {"least_confidence", "entropy", "margin", "diversity", "hybrid", "bald"}
    assert metrics["jaccard_lc_margin_round1"] == 1.0 and metrics["image_mean_jaccard_min"] == 1.0   # the theorem and the original's collapse
    assert len(list((out / "runs").glob("s0-n2-*/best.pt"))) == 1 and len(list((out / "runs").glob("s1-n10-*/best.pt"))) == 1   # round 0, full pool
    assert (out / "runs" / "replay-warmstart-s0-r1" / "last.pt").is_file() and (out / "runs" / "replay-control-s1-r1" / "last.pt").is_file()
    assert {f.name for f in (out / "tables").iterdir()} >= {"rounds.csv", "learning-curves.csv", "aulc-against-random.csv", "acquisition-cost.csv"}
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 3
    assert "## Answer" not in html and "Answer" in html and "Better than random?" in html and "micrographs:" not in html


def test_mfn_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("mfn", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_simulations"] == {"default": 24, "v41": 24}
    df, meta = read_dataset(out / "datasets" / "mfn_default.parquet")
    assert len(df) == 24 and meta["dynamics"] == ["default"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["profile"] == "tiny" and prov["wall_time_s"] > 0
    assert {p.name for p in (out / "figures").iterdir()} >= {"example-fields.png", "feature-correlation.png"}
    assert external_references(html) == [] and "Profile tiny" in html
    assert html.count("data:image/png;base64") >= 4                 # the figures are embedded
    assert "generate_dataset(" not in html                          # code inputs are hidden


def test_synapse_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("synapse", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ari_class"]) >= {"contrastive · standard", "contrastive · layer 20", "hand-crafted", "trait oracle"}
    assert metrics["ari_class"]["trait oracle"] == 1.0                  # the ceiling is a ceiling
    assert metrics["chosen_layer"] in (0, 13, 20, 27) and 0 < metrics["permutation_p"]["hand-crafted"] <= 1
    for seed in (0, 1): assert (out / "networks" / f"contrastive_seed{seed}" / "best.pt").is_file()
    assert (out / "networks" / "vgg3d_proxy.pt").is_file()
    assert {f.name for f in (out / "tables").iterdir()} >= {"paired-comparisons.csv", "difficulty-sweep.csv", "proxy-held-out-r2-per-trait.csv",
                                                            "layer-choice-against-the-centre-prior.csv", "axon-level-permutation-test-of-the-mean-ari.csv"}
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 6
    assert "What the original pipeline" in html and "Profile tiny" in html and "Answer" in html


def test_cascade_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("cascade", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["auc"]) >= {"filter", "effnet", "genconvit_ed", "genconvit_vae", "LightGBM stack", "cascade", "null (shuffled labels)"}
    assert 0 <= metrics["routed_fraction"] <= 1 and metrics["gmac_always"] > metrics["gmac_cascade"] > 0
    assert (out / "runs" / "genconvit_vae" / "seed0" / "best.pt").is_file() and (out / "forgers" / "transposed" / "last.pt").is_file()
    assert {f.name for f in (out / "tables").iterdir()} >= {"test-metrics.csv", "routing-per-seed.csv", "paired-auc-differences.csv", "success-criteria.csv"}
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 5
    assert "Answer" in html and "Data card" in html and "micrographs:" not in html
