"""The MFN stage end to end in the tiny profile: papermill study notebook -> outputs -> HTML report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
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
    html = (tmp_path / "reports" / f"{study}.html").read_text()
    assert "PosixPath(" not in html, f"the {study} report prints a machine path"   # a cell ending in a call that returns a path
    return out, html


def test_cryoem_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("cryoem", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["conditions"]) == {"dose 40", "dose 20", "crowded"}
    assert all(c["f1_oracle"] == 1.0 for c in metrics["conditions"].values())          # the ceiling is a ceiling
    split = json.loads((out / "runs" / "dose-40" / "split.json").read_text())
    assert len(split["split"]["test"]) == 4 and split["data_hash"]
    runs = out / "runs" / "crowded"
    assert (runs / "unet-s0" / "best.pt").is_file() and (runs / "attention_unet-s1" / "last.pt").is_file()
    assert (runs / "unet-s0" / "unit.json").is_file() and not (out / "conditions").exists()
    assert not (runs / "cache").exists() and list((out / "cache").iterdir()) == []   # training caches: outside the runs, deleted once used
    assert "model" not in torch.load(runs / "unet-s0" / "last.pt", weights_only=True)   # a finished run's last.pt is its record, no weights
    assert len(list((out / "runs").glob("*/*/unit.json"))) == 3 * 2 * 2 and (out / "train" / "provenance.json").is_file()
    verdict = metrics["verdict"]
    assert verdict["low"] <= verdict["estimate"] <= verdict["high"] and abs(verdict["mde"] - 2.8 * (verdict["high"] - verdict["low"]) / (2 * 1.959964)) < 1e-9
    assert verdict["low"] <= verdict["low90"] <= verdict["high90"] <= verdict["high"]                 # pooled over the conditions, with TOST's interval
    assert set(metrics["pooled"]) >= {"tau2", "i2", "k"} and metrics["pooled"]["k"] == 3
    assert all(0 <= c["edge_share"] <= 1 and c["particles_per_um2"] > 0 for c in metrics["conditions"].values())
    assert all(0 < c["f1_ideal_observer"] <= 1 and c["power_se"] > 0 for c in metrics["conditions"].values())   # the ceiling and the power design
    assert metrics["convergence"]["cap"] == 2 and 0 <= metrics["convergence"]["stopped_share"] <= 1
    assert (out / "plots" / "difficulty.csv").read_text().startswith("condition,unet,attention_unet,template_matching,oracle,difference")
    assert (out / "plots" / "learning-curves.csv").read_text().startswith("epoch,unet,attention_unet")
    assert len(list((out / "real_picks").glob("*.star"))) == 4
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 8
    assert "What the original protocol does to the same data" in html and "Where the arms part" in html
    assert not re.search(r"micrographs:\s*\d+%", html)                               # no progress bars in the report


def test_cryoem_al_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("cryoem_al", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["aulc"]) == set(metrics["aulc_particles"]) == {"least_confidence", "entropy", "diversity", "hybrid", "bald", "particle_entropy"}
    assert metrics["jaccard_lc_margin_per_pixel"] == 1.0 and metrics["image_mean_jaccard_min"] == 1.0   # the theorem and the original's collapse
    assert {"mde", "room", "power_at_room", "undetectable_by_design"} <= set(metrics["design"]) and 0 <= metrics["convergence"]["best_below_cap"] <= 1
    runs = out / "runs"
    assert len(list(runs.glob("s0/round-0/s0-n2-*/best.pt"))) == 1 and len(list(runs.glob("s1/full-pool/s1-n10-*/best.pt"))) == 1
    assert len(list(runs.glob("s1/bald/s1-n4-*/best.pt"))) == 1 and (runs / "s0" / "entropy" / "unit.json").is_file()   # one chain per strategy and seed
    assert (runs / "s0/replay-asrecorded/replay-asrecorded-s0-r1/last.pt").is_file() and (runs / "s0/replay-control/replay-control-s0-r1/last.pt").is_file()
    assert len(list(runs.glob("s0/full-pool-double-cap/s0-n10-*/best.pt"))) == 1
    units = (out / "train" / "units.csv").read_text().splitlines()
    assert len(units) == 1 + 2 * (2 + 7) + 1 + 2 and (out / "train" / "provenance.json").is_file() and (out / "train" / "cryoem_al_train.ipynb").is_file()
    assert set(metrics["verdict"]) >= {"estimate", "low", "high", "margin", "mde", "testable"} and metrics["verdict"]["margin"] == 0.02
    assert all((out / "plots" / f).is_file() for f in ("learning_curves.csv", "replay.csv", "pool_bias.csv"))
    assert {f.name for f in (out / "tables").iterdir()} >= {"rounds.csv", "learning-curves.csv", "aulc-against-random.csv", "aulc-against-random-particle-axis.csv", "room-and-power.csv",
                                                          "convergence.csv", "bald-stability.csv", "acquisition-cost.csv"}
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 3
    assert "## Answer" not in html and "Answer" in html and "Better than random?" in html and "micrographs:" not in html


def test_mfn_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("mfn", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_simulations"] == {"default": 24, "v41": 24, "targets": 12, "growth": 9}   # 2 alphas x 2 ratios x 3 seeds; 1 alpha x 3 seeds x 3 step counts
    assert metrics["audit"]["trusted"] == sum(v for k, v in metrics["audit"].items() if k.startswith("trusted_"))   # the count is the per-feature flags' sum
    df, meta = read_dataset(out / "runs" / "dataset-default" / "dataset.parquet")   # written by simulate_mfn
    assert len(df) == 24 and meta["dynamics"] == ["default"]
    assert (out / "runs" / "clamp-default" / "clamp.parquet").is_file() and (out / "train" / "units.csv").is_file()
    assert {"estimate", "low", "high", "margin", "mde", "testable"} <= set(metrics["verdict"])
    assert metrics["verdict"]["low"] <= metrics["verdict"]["estimate"] <= metrics["verdict"]["high"]
    assert {p.name for p in (out / "plots").iterdir()} == {"feature-effects.csv", "predictability.csv"}
    for stage in ("train", "."):
        prov = json.loads((out / stage / "provenance.json").read_text())
        assert prov["profile"] == "tiny" and prov["wall_time_s"] > 0
    assert {p.name for p in (out / "figures").iterdir()} >= {"example-fields.png", "feature-correlation.png", "feature-growth-against-steps.png"}
    assert {p.name for p in (out / "tables").iterdir()} >= {"descriptor-audit.csv", "what-the-features-tell-apart.csv"}
    assert external_references(html) == [] and "Profile tiny" in html
    assert html.count("data:image/png;base64") >= 4                 # the figures are embedded
    assert "load_study_data(" not in html                           # code inputs are hidden


def test_synapse_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("synapse", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["ari_class"]) >= {"contrastive · standard", "contrastive · layer 20", "hand-crafted", "trait oracle"}
    assert metrics["ari_class"]["trait oracle"] == 1.0                  # the ceiling is a ceiling
    assert metrics["chosen_layer"] in (0, 13, 20, 27) and 0 < metrics["permutation_p"]["hand-crafted"] <= 1
    for unit in ("contrastive-s0", "contrastive-s1", "proxy"):
        assert {"best.pt", "last.pt", "vgg3d.pt", "unit.json"} <= {f.name for f in (out / "runs" / unit).iterdir()}
    assert (out / "train" / "provenance.json").is_file() and len((out / "train" / "units.csv").read_text().splitlines()) == 4
    assert {f.name for f in (out / "plots").iterdir()} == {"separation_sweep.csv", "contrastive_training.csv", "layer_curve.csv"}
    # two networks of two epochs have not converged: the headline says so whatever its interval
    assert set(metrics["verdict"]) >= {"estimate", "low", "high", "low90", "high90", "margin", "mde"} and metrics["verdict"]["testable"] is False
    assert metrics["networks"] == 2 and metrics["converged_networks"] < 2 and set(metrics["network_level"]) == {
        "contrastive, ARI", "contrastive, probe accuracy", "random init (BN re-estimated), ARI"}
    assert {f.name for f in (out / "tables").iterdir()} >= {"paired-comparisons.csv", "difficulty-sweep.csv", "proxy-held-out-r2-per-trait.csv",
                                                            "layer-choice-against-the-centre-prior.csv", "axon-level-permutation-test-of-the-mean-ari.csv",
                                                            "network-level-comparison.csv", "layer-curve.csv", "cue-controls.csv",
                                                            "contrastive-training-convergence.csv", "raw-and-per-bbox-normalised-features-side-by-side.csv"}
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 6
    assert "What the original pipeline" in html and "Profile tiny" in html and "Answer" in html


def test_cascade_study_runs_end_to_end_in_tiny_profile(tmp_path):
    out, html = _run_study("cascade", tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["auc"]) >= {"filter", "effnet", "genconvit_ed", "genconvit_vae", "LightGBM stack", "cascade", "null (shuffled labels)"}
    assert 0 <= metrics["routed_fraction"] <= 1
    filter_gmac = metrics["gmac_cascade"] - metrics["routed_fraction"] * metrics["gmac_always"]   # the cascade's cost: filter + routed x experts
    assert 0 < filter_gmac < metrics["gmac_always"]                                            # the filter is cheaper than the experts
    runs = out / "runs"
    assert (runs / "detectors" / "genconvit_vae" / "seed0" / "best.pt").is_file() and (runs / "forgers" / "transposed" / "last.pt").is_file()
    assert (runs / "detectors" / "null" / "seed0" / "unit.json").is_file() and (out / "train" / "units.csv").is_file()
    assert {f.name for f in (out / "plots").iterdir()} >= {"risk-coverage.csv", "learning-curves.csv", "family-accuracy.csv"}
    assert set(metrics["verdict"]) >= {"estimate", "low", "high", "margin", "mde", "simpler_does_as_well"}
    assert {f.name for f in (out / "tables").iterdir()} >= {"test-metrics.csv", "routing-per-seed.csv", "paired-auc-differences.csv", "success-criteria.csv"}
    assert external_references(html) == [] and html.count("data:image/png;base64") >= 5
    assert "Answer" in html and "Data card" in html and "micrographs:" not in html
