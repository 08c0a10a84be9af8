"""core and report: parameters, provenance, metrics, offline and byte-stable rendering, the index."""
import json
from pathlib import Path

import nbformat
import pytest

from project_lib.core import (PROFILES, load_study_params, output_dir, params_hash, read_params, select_device,
                              start_provenance, validate_section)
from project_lib.mfn.analysis import MFNStudyParams
from project_lib.report import external_references, render_index, render_report, write_metrics


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_of_params_yaml_validates(profile):
    p = load_study_params("mfn", MFNStudyParams, profile)
    assert all(0 < a <= 0.25 for a in p.alphas)


def test_unknown_and_ill_typed_parameters(tmp_path):
    section = dict(read_params()["mfn"]["tiny"])
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['gird_sizes'\]"):
        validate_section({**section, "gird_sizes": [8]}, MFNStudyParams, "mfn.tiny")
    with pytest.raises(ValueError, match="mfn.tiny.steps"):
        validate_section({**section, "steps": "many"}, MFNStudyParams, "mfn.tiny")
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: tiny\nmfn: {tiny: {grid_sizes: [8]}}\n")
    with pytest.raises(ValueError, match="missing parameter"):
        load_study_params("mfn", MFNStudyParams, path=bad)


def test_profiles_write_to_separate_folders(tmp_path):
    assert output_dir("mfn", "cpu", tmp_path) != output_dir("mfn", "paper", tmp_path)


def test_device_is_cpu_without_cuda():
    torch = pytest.importorskip("torch")
    assert select_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_provenance_record(tmp_path):
    data = tmp_path / "input.bin"
    data.write_bytes(b"\x00\x01")
    prov = start_provenance("mfn", "tiny", {"a": 1}, "generated: test", inputs=[data]).finish()
    record = json.loads(prov.write(tmp_path / "p.json").read_text())
    for key in ("git_commit", "git_dirty", "profile", "params", "params_hash", "inputs", "packages", "device",
                "start_time", "wall_time_s", "data_source"):
        assert key in record
    assert record["params_hash"] == params_hash({"a": 1}) and record["packages"]["numpy"]


def test_metrics_refuse_non_finite(tmp_path):
    with pytest.raises(ValueError, match="'a.b'"):
        write_metrics({"a": {"b": float("inf")}}, tmp_path)


def _executed_notebook(path: Path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("## Result"),
                                         nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
                                             "execute_result", data={"text/plain": "42"}, execution_count=1)])])
    nb.metadata["papermill"] = {"start_time": "2026-01-01T00:00:00"}
    nbformat.write(nb, path)


def test_render_is_offline_stable_and_indexed(tmp_path):
    _executed_notebook(tmp_path / "run.ipynb")
    start_provenance("demo", "tiny", {}, "generated: fixture").finish().write(tmp_path / "prov.json")
    page = render_report(tmp_path / "run.ipynb", tmp_path / "prov.json", tmp_path / "r" / "demo.html", "Demo")
    first = page.read_bytes()
    render_report(tmp_path / "run.ipynb", tmp_path / "prov.json", page, "Demo")
    assert page.read_bytes() == first
    html = first.decode()
    assert external_references(html) == [] and "cdnjs" not in html
    assert 'class="jp-CodeMirrorEditor' not in html and "42" in html           # code hidden, its result shown
    assert "generated: fixture" in html and "Profile tiny" in html
    index = render_index(tmp_path / "r").read_text()
    assert 'href="demo.html"' in index


def test_render_refuses_a_corrupt_notebook(tmp_path):
    (tmp_path / "bad.ipynb").write_text("{not json")
    start_provenance("demo", "tiny", {}, "x").write(tmp_path / "prov.json")
    with pytest.raises(ValueError, match="not a valid .ipynb"):
        render_report(tmp_path / "bad.ipynb", tmp_path / "prov.json", tmp_path / "x.html", "x")
    assert not (tmp_path / "x.html").exists()


def test_committed_reports_are_offline_and_indexed():
    index = Path("reports/index.html").read_text()
    for page in Path("reports").rglob("*.html"):
        html = page.read_text()
        assert external_references(html) == [], page
        if page.name != "index.html":
            assert 'name="compendium-profile"' in html and f'href="{page.relative_to("reports").as_posix()}"' in index
            assert 'class="jp-CodeMirrorEditor' not in html and "data:image/png;base64" in html
