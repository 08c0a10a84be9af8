"""core and report: parameters, provenance, metrics, offline and byte-stable rendering, the index."""
import html as html_lib
import json
import re
from pathlib import Path

import nbformat
import pytest

from project_lib.core import (PROFILES, load_study_params, output_dir, params_hash, read_params, select_device,
                              start_provenance, validate_section)
from project_lib.mfn.analysis import MFNStudyParams
from project_lib.report import (_CHECK_PAGES, answer_values, check_index, external_references, fill_answer, index_page, render_index, render_report, save_figure,
                                verdict_words, write_headline,
                                write_metrics)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_of_params_yaml_validates(profile):
    p = load_study_params("mfn", MFNStudyParams, profile)
    assert all(0 < a <= 0.25 for a in p.alphas)


def test_unknown_and_ill_typed_parameters(tmp_path):
    section = {**read_params()["mfn"]["tiny"], **read_params()["mfn_analysis"]["tiny"]}
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
    for key in ("git_commit", "git_dirty", "profile", "params", "params_hash", "inputs", "packages", "device", "machine",
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


VERDICT = {"estimate": 0.03, "low": 0.01, "high": 0.05, "margin": 0.02, "mde": 0.03}


def _study_run(tmp_path, metrics, template, params=None):
    """A finished evaluation run (notebook, provenance, metrics, key figure, headline) and its rendered report."""
    run = tmp_path / "out" / "tiny" / "demo"
    run.mkdir(parents=True, exist_ok=True)
    _executed_notebook(run / "demo.ipynb")
    prov = start_provenance("demo", "tiny", params or {}, "generated: fixture").finish()
    prov.write(run / "provenance.json")
    write_metrics(metrics, run)
    _key_figure(run)
    write_headline(run, "Does stacking help?", template, "Key", prov)
    return render_report(run / "demo.ipynb", run / "provenance.json", tmp_path / "r" / "demo.html", "Demo")


def test_render_is_offline_stable_and_indexed(tmp_path):
    page = _study_run(tmp_path, {"auc": {"stack": 0.7217}, "helps": False, "verdict": VERDICT},
                      "Stacking {helps:helps|does not help}: AUC {auc/stack:.3f}.")
    first = page.read_bytes()
    render_report(tmp_path / "out/tiny/demo/demo.ipynb", tmp_path / "out/tiny/demo/provenance.json", page, "Demo")
    assert page.read_bytes() == first
    html = first.decode()
    assert external_references(html) == [] and "cdnjs" not in html
    assert 'class="jp-CodeMirrorEditor' not in html and "42" in html           # code hidden, its result shown
    assert "generated: fixture" in html and "Profile tiny" in html
    index = render_index(tmp_path / "r")
    html = index.read_text()
    assert 'href="demo.html"' in html and "Does stacking help?" in html and "Stacking does not help: AUC 0.722." in html
    assert "Verdict: A difference." in html
    assert html.count("data:image/png;base64,") == 1 and external_references(html) == []
    first = index.read_bytes()
    assert render_index(tmp_path / "r").read_bytes() == first     # byte-stable
    assert check_index(tmp_path / "r") == []


def test_a_report_without_its_run_is_not_indexed(tmp_path):
    _executed_notebook(tmp_path / "run.ipynb")
    start_provenance("demo", "tiny", {}, "generated: fixture").finish().write(tmp_path / "prov.json")
    render_report(tmp_path / "run.ipynb", tmp_path / "prov.json", tmp_path / "r" / "demo.html", "Demo")
    with pytest.raises(ValueError, match="carries no headline"):
        render_index(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="headline.json does not exist"):
        render_report(tmp_path / "run.ipynb", tmp_path / "prov.json", tmp_path / "r" / "demo.html", "Demo", metrics=tmp_path / "metrics.json")


@pytest.mark.parametrize("edit", ["number", "verdict", "word"])
def test_front_page_tampering_is_caught(tmp_path, edit):
    """Changing a number, the verdict or a word of an answer on the front page fails the check, and so does the same
    edit made to a report's embedded headline too: answers and verdicts are re-derived from the metrics."""
    _study_run(tmp_path, {"auc": {"stack": 0.7217}, "helps": True, "verdict": VERDICT}, "Stacking {helps:helps|does not help}: AUC {auc/stack:.3f}.")
    index = render_index(tmp_path / "r")
    old, new = {"number": ("0.722", "0.782"), "verdict": ("A difference", "Equivalent within the declared margin (±0.02)"),
                "word": ("Stacking helps", "Stacking clearly helps")}[edit]
    index.write_text(index.read_text().replace(old, new))
    assert check_index(tmp_path / "r")
    report = tmp_path / "r" / "demo.html"
    report.write_text(report.read_text().replace(old, new))        # the same edit in the report's visible text and its JSON
    with pytest.raises(ValueError, match="is not what its metrics say|do not match"):
        index_page(tmp_path / "r")


def test_verdicts_follow_the_numbers():
    assert verdict_words(VERDICT) == "A difference"
    assert verdict_words({**VERDICT, "low": -0.01}) == "No difference detected (smallest detectable effect 0.03)"
    assert verdict_words({**VERDICT, "estimate": 0.0, "low": -0.01, "high": 0.015}) == "Equivalent within the declared margin (±0.02)"
    assert verdict_words({**VERDICT, "simpler_does_as_well": True}).endswith("but a simpler method does as well")
    assert verdict_words({**VERDICT, "testable": False}) == "Not testable at this scale"
    with pytest.raises(ValueError, match="lacks"):
        verdict_words({"estimate": 0.1})


def _key_figure(run: Path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([0, 1, 2], [2, 0, 1])
    save_figure(fig, "Key", run)
    plt.close(fig)


def test_answer_template_is_filled_from_metrics_with_clear_errors():
    metrics = {"auc": {"null (shuffled)": 0.48549, "stack": 0.72}, "shows_difference": True, "n_sets": 18}
    assert fill_answer("null {auc/null (shuffled):.2f}, {n_sets} sets, {shows_difference:a difference|none}", metrics) == \
        "null 0.49, 18 sets, a difference"
    assert fill_answer("{shows_difference:yes|no}", {"shows_difference": False}) == "no"
    with pytest.raises(ValueError, match="'auc/stak'"):
        fill_answer("{auc/stak:.3f}", metrics)
    with pytest.raises(ValueError, match="a group"):
        fill_answer("{auc}", metrics)
    with pytest.raises(ValueError, match="is a bool"):
        fill_answer("{shows_difference:.3f}", metrics)
    with pytest.raises(ValueError, match="not a bool"):
        fill_answer("{n_sets:yes|no}", metrics)


def test_headline_checks_its_inputs_and_belongs_to_one_run(tmp_path):
    import base64, io
    from PIL import Image
    prov = start_provenance("demo", "tiny", {}, "generated: fixture").finish()
    run = tmp_path / "out" / "tiny" / "demo"
    with pytest.raises(FileNotFoundError, match="call write_metrics before"):
        write_headline(run, "Q?", "A.", "Key", prov)
    write_metrics({"x": 1.0}, run)
    _key_figure(run)
    with pytest.raises(ValueError, match="no 'verdict' group"):
        write_headline(run, "Q?", "A.", "Key", prov)
    write_metrics({"x": 1.0, "verdict": VERDICT}, run)
    (run / "figures" / "key.png").unlink()
    with pytest.raises(FileNotFoundError, match="key_figure 'Key'"):
        write_headline(run, "Q?", "A.", "Key", prov)
    _key_figure(run)
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        write_headline(run, " ", "A.", "Key", prov)
    record = json.loads(write_headline(run, "Q?", "x = {x:.2f}", "Key", prov).read_text())
    assert record["answer"] == "x = 1.00" and record["answer_template"] == "x = {x:.2f}" and record["verdict"] == "A difference"
    thumb = Image.open(io.BytesIO(base64.b64decode(record["thumbnail_png"])))
    full = Image.open(run / "figures" / "key.png")
    assert thumb.width == 320 and abs(thumb.height - full.height * 320 / full.width) <= 1
    # a report from another run (another parameters hash) must not be paired with this headline
    _executed_notebook(tmp_path / "run.ipynb")
    other = start_provenance("demo", "tiny", {"changed": 1}, "generated: fixture").finish()
    other.write(run / "provenance.json")
    render_report(tmp_path / "run.ipynb", run / "provenance.json", tmp_path / "r" / "demo.html", "Demo")
    with pytest.raises(ValueError, match="re-run `dvc repro`"):
        render_index(tmp_path / "r")


def test_render_refuses_a_corrupt_notebook(tmp_path):
    (tmp_path / "bad.ipynb").write_text("{not json")
    start_provenance("demo", "tiny", {}, "x").write(tmp_path / "prov.json")
    with pytest.raises(ValueError, match="not a valid .ipynb"):
        render_report(tmp_path / "bad.ipynb", tmp_path / "prov.json", tmp_path / "x.html", "x")
    assert not (tmp_path / "x.html").exists()


NOT_STUDY_REPORTS = ("index.html", *_CHECK_PAGES)      # the front page and the reproduction checks' pages (make repro)


def test_committed_reports_are_offline_and_indexed():
    index = Path("reports/index.html").read_text()
    for page in Path("reports").rglob("*.html"):
        html = page.read_text()
        assert external_references(html) == [], page
        if page.name not in NOT_STUDY_REPORTS:
            assert 'name="compendium-profile"' in html and f'href="{page.relative_to("reports").as_posix()}"' in index
            assert 'class="jp-CodeMirrorEditor' not in html and "data:image/png;base64" in html


def test_committed_front_page_is_what_the_reports_say():
    """The committed front page is exactly the page its committed reports give: every verdict and answer re-derived from
    the metrics each report carries (a hand edit of a number, verdict or word fails here)."""
    assert check_index("reports") == []
    studies = [p for p in Path("reports").glob("*.html") if p.name not in NOT_STUDY_REPORTS]
    assert Path("reports/index.html").read_text().count("Verdict: ") == len(studies)
