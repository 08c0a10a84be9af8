"""`data: manifests`, the path a user with real face crops takes: manifests refused when empty, duplicated or without groups
(the file named); an optional test manifest is the test split; a recipe's initial weights (a timm backbone-only state dict)
identify the units that start from them; and a fixture of images this test writes, trained and evaluated end to end by the
stages' notebooks (papermill, tiny profile, another params file) and rendered."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image

from project_lib.cascade.data import read_manifest
from project_lib.cascade.units import CascadeParams, detector_units, load_data
from project_lib.core import load_study_params
from project_lib.report import external_references

PX = 32


def _write_images(folder: Path, name: str, groups: list[str], per_group: int, seed: int) -> Path:
    """Images this test makes: reals are noise with a smooth gradient, fakes the same blurred 3 x 3 (a residual cue the
    networks can learn); half of each group's images fake. Written as PNGs with a manifest (path, label, group)."""
    rng, rows = np.random.default_rng(seed), []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 120, PX)[None, :, None]
    for g in groups:
        for k in range(per_group):
            real = np.clip(ramp + rng.normal(100, 40, (PX, PX, 3)), 0, 255)
            fake = k % 2 == 1
            if fake: real = sum(np.roll(np.roll(real, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
            path = folder / "images" / f"{name}-{g}-{k}.png"
            Image.fromarray(real.astype(np.uint8)).save(path)
            rows.append({"path": f"images/{path.name}", "label": "fake" if fake else "real", "group": g})
    pd.DataFrame(rows).to_csv(folder / f"{name}_manifest.csv", index=False)
    return folder / f"{name}_manifest.csv"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    _write_images(folder, "train", [f"t{i}" for i in range(10)], 4, 0)
    _write_images(folder, "val", [f"v{i}" for i in range(12)], 4, 1)
    _write_images(folder, "test", [f"x{i}" for i in range(6)], 4, 2)
    return folder


def _params(tmp_path: Path, folder: Path, **models) -> tuple[Path, CascadeParams]:
    params = yaml.safe_load(Path("params.yaml").read_text())
    tiny = params["cascade"]["tiny"]
    tiny.update({"data": "manifests", "manifest_dir": str(folder)})
    for role, changes in models.items(): tiny["models"][role].update(changes)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path, load_study_params("cascade", CascadeParams, "tiny", path)


def test_an_optional_test_manifest_is_the_test_split(folder, tmp_path):
    _, p = _params(tmp_path, folder)
    splits, bench = load_data(p, tmp_path / "runs")
    assert sorted(set(splits["test"].group)) == [f"x{i}" for i in range(6)]                 # the test manifest's groups, none else
    assert set(splits["val"].group) | set(splits["blend"].group) <= {f"v{i}" for i in range(12)}
    assert all(set(splits[k].label) == {0, 1} for k in splits)
    assert pd.Series(splits["test"].group).value_counts().max() <= p.eval_crops_per_source   # capped like the others
    assert len(bench.label) == 40 + 48 + 24
    lonely = tmp_path / "no_test"
    lonely.mkdir()
    for name in ("train", "val"): (lonely / f"{name}_manifest.csv").write_text((folder / f"{name}_manifest.csv").read_text().replace("images/", f"{folder}/images/"))
    _, q = _params(tmp_path, lonely)
    without = load_data(q, tmp_path / "runs")[0]
    assert set(without["test"].group) <= {f"v{i}" for i in range(12)}                        # without it: validation, blend and test from val


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.iloc[:0], "has no rows"),
    (lambda d: pd.concat([d, d.iloc[[2]]], ignore_index=True), r"rows \[4, 42\] name the same image images/train-t0-2.png"),
    (lambda d: d.assign(group=["NaN"] + list(d.group[1:])), r"row 2: every row needs a group .*got 'NaN' for images/train-t0-0.png"),
    (lambda d: d.assign(group=list(d.group[:3]) + [""] + list(d.group[4:])), "row 5: every row needs a group"),
])
def test_empty_duplicated_and_groupless_manifests_are_refused_naming_the_file(folder, tmp_path, edit, message):
    rows = pd.read_csv(folder / "train_manifest.csv", dtype=str, keep_default_na=False)
    bad = folder / "bad_manifest.csv"
    edit(rows).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=f"bad_manifest.csv.*{message}"):
        read_manifest(bad)


def test_initial_weights_are_part_of_a_units_identity(folder, tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("mobilenetv4_conv_small", pretrained=False).state_dict(), tmp_path / "mnv4.pth")
    _, p = _params(tmp_path, folder, filter={"weights": str(tmp_path / "mnv4.pth"), "normalize": "imagenet"})
    splits = load_data(p, tmp_path / "runs")[0]
    first = {u.key: u.hash for u in detector_units(p, splits)}
    torch.manual_seed(1)
    torch.save(timm.create_model("mobilenetv4_conv_small", pretrained=False).state_dict(), tmp_path / "mnv4.pth")   # other weights, same path
    again = {u.key: u.hash for u in detector_units(p, splits)}
    assert first["detectors/filter/seed0"] != again["detectors/filter/seed0"] and first["detectors/effnet/seed0"] == again["detectors/effnet/seed0"]
    assert first["detectors/null/seed0"] != again["detectors/null/seed0"]                   # the null is the filter's recipe


def test_the_stages_run_a_manifest_folder_end_to_end(folder, tmp_path):
    """Both notebooks on the manifests, the filter started from a timm backbone-only state dict with ImageNet normalisation."""
    torch.manual_seed(0)
    torch.save(timm.create_model("mobilenetv4_conv_small", pretrained=False).state_dict(), tmp_path / "mnv4.pth")
    params, p = _params(tmp_path, folder, filter={"weights": str(tmp_path / "mnv4.pth"), "normalize": "imagenet"})
    out = tmp_path / "tiny" / "cascade"
    (out / "train").mkdir(parents=True)
    papermill = [Path(sys.executable).parent / "papermill", "-k", "python3", "--no-progress-bar", "--cwd", "."]
    for notebook, target in (("cascade_train", out / "train" / "cascade_train.ipynb"), ("cascade", out / "cascade.ipynb")):
        run = subprocess.run([*papermill, f"nbs/studies/{notebook}.ipynb", target, "-p", "profile", "tiny", "-p", "output_root", str(tmp_path),
                              "-p", "params_file", str(params)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "project_lib.report", "render", out / "cascade.ipynb", "--provenance", out / "provenance.json",
                    "--out", tmp_path / "cascade.html", "--title", "cascade"], check=True)
    assert len(list((out / "runs" / "detectors").glob("*/seed*/unit.json"))) == 5 * len(p.seeds)
    assert not (out / "runs" / "forgers").exists()                                           # real fakes: no forgers
    assert "face crops listed in" in json.dumps(json.loads((out / "provenance.json").read_text()))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and external_references((tmp_path / "cascade.html").read_text()) == []
