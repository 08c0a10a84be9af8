"""The reproduction check: regenerated report numbers against the committed ones, and the kind of machine of each run."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from project_lib.core import cpu_kind, isa_level, machine_label, same_machine_kind, start_provenance
from project_lib.report import answer_values, check_index, fill_answer, index_page, render_index, verdict_words
from project_lib.reproduction import IDENTICAL, OUTSIDE, WITHIN, compare_runs, committed_reports, main, reproduction_table

VERDICT = {"estimate": -0.015, "low": -0.051, "high": 0.021, "margin": 0.02, "mde": 0.0513}
METRICS = {"answer": {"f1_difference": -0.015, "f1_difference_low": -0.051, "f1_difference_high": 0.021, "n_conditions": 5,
                      "beats_template": True},
           "aulc": {"bald": {"difference": -0.006, "difference_low": -0.06, "difference_high": 0.059}},
           "random_aulc": 0.43, "verdict": VERDICT}
TEMPLATE = ("F1 difference {answer/f1_difference:.3f} [{answer/f1_difference_low:.3f}, {answer/f1_difference_high:.3f}] over "
            "{answer/n_conditions} conditions; {answer/beats_template:beats|does not beat} template; best AULC difference "
            "{aulc/bald/difference:.3f}; random {random_aulc:.2f}.")
INTEL, AMD = "GenuineIntel Intel Xeon Platinum, x86-64-v4", "AuthenticAMD AMD EPYC 7B13, x86-64-v3"


def _run(metrics=METRICS, template=TEMPLATE):
    """A run as a report embeds it: the headline derived from the metrics (as write_headline does)."""
    return {"headline": {"verdict": verdict_words(metrics["verdict"]), "answer_template": template, "answer": fill_answer(template, metrics),
                         "values": answer_values(template, metrics), "run": "0123456789abcdef 2026-12-02T19:45:55+00:00",
                         "question": "Does attention help?", "key_figure": "key.png", "thumbnail_png": ""},
            "metrics": metrics}


def _with(path, value, metrics=METRICS):
    """A deep copy of `metrics` with the value at 'a/b/c' set (or removed when `value` is None)."""
    out = json.loads(json.dumps(metrics))
    *groups, leaf = path.split("/")
    node = out
    for g in groups: node = node[g]
    if value is None: del node[leaf]
    else: node[leaf] = value
    return out


def _rows(committed, regenerated):
    return {r["name"]: r for r in compare_runs(committed, regenerated, "demo")}


def test_the_same_run_is_identical_row_by_row():
    rows = _rows(_run(), _run())
    # the bounds are part of their value's row, not rows of their own
    assert list(rows) == ["verdict", "verdict estimate", "answer/beats_template", "answer/f1_difference", "answer/n_conditions",
                          "aulc/bald/difference", "random_aulc"]
    assert {r["status"] for r in rows.values()} == {IDENTICAL}
    assert rows["verdict estimate"]["interval"] == (-0.051, 0.021) and rows["answer/f1_difference"]["interval"] == (-0.051, 0.021)
    assert rows["aulc/bald/difference"]["interval"] == (-0.06, 0.059)        # difference_low/high siblings in a nested group
    assert rows["random_aulc"]["interval"] is None and rows["answer/n_conditions"]["difference"] == 0


def test_a_number_inside_the_committed_interval_is_within():
    regenerated = _run(_with("aulc/bald/difference", 0.05, _with("answer/f1_difference", 0.02)))
    rows = _rows(_run(), regenerated)
    assert rows["answer/f1_difference"]["status"] == WITHIN and rows["aulc/bald/difference"]["status"] == WITHIN
    assert rows["answer/f1_difference"]["difference"] == pytest.approx(0.035)
    assert rows["verdict"]["status"] == IDENTICAL and rows["random_aulc"]["status"] == IDENTICAL


@pytest.mark.parametrize("path, value, note", [
    ("answer/f1_difference", 0.0211, "outside the committed 95 % interval"),      # just past the committed high bound
    ("aulc/bald/difference", -0.0601, "outside the committed 95 % interval"),
    ("answer/n_conditions", 6, "changed, no interval stated"),                    # a count
    ("answer/beats_template", False, "changed, no interval stated"),              # a yes/no answer
    ("random_aulc", 0.4300001, "changed, no interval stated"),                    # a number stated without an interval
])
def test_a_changed_number_is_outside(path, value, note):
    row = _rows(_run(), _run(_with(path, value)))[path]
    assert (row["status"], row["note"]) == (OUTSIDE, note)


def test_a_boolean_is_not_the_number_one():
    committed, regenerated = _run(_with("answer/n_conditions", 1)), _run(_with("answer/n_conditions", 1))
    regenerated["headline"]["values"]["answer/n_conditions"] = True       # True == 1 in Python, but a yes is no count
    assert _rows(committed, regenerated)["answer/n_conditions"]["status"] == OUTSIDE


def test_missing_and_added_numbers_are_outside():
    template = TEMPLATE.replace(" random {random_aulc:.2f}.", ".")
    rows = _rows(_run(), _run(template=template))
    assert (rows["random_aulc"]["status"], rows["random_aulc"]["note"]) == (OUTSIDE, "not in the regenerated run")
    rows = _rows(_run(template=template), _run())
    assert (rows["random_aulc"]["status"], rows["random_aulc"]["note"]) == (OUTSIDE, "not in the committed run")


def test_the_verdict_words_compare_by_category():
    only_mde = _run({**METRICS, "verdict": {**VERDICT, "mde": 0.06}})           # same category, another smallest detectable effect
    row = _rows(_run(), only_mde)["verdict"]
    assert row["committed"] == "No difference detected (smallest detectable effect 0.0513)" and row["status"] == WITHIN
    changed = _run({**METRICS, "verdict": {**VERDICT, "estimate": 0.03, "low": 0.01, "high": 0.05}})
    rows = _rows(_run(), changed)
    assert (rows["verdict"]["regenerated"], rows["verdict"]["status"]) == ("A difference", OUTSIDE)
    assert rows["verdict estimate"]["status"] == OUTSIDE              # 0.03 is past the committed high bound 0.021


def test_compare_runs_refuses_what_is_not_a_run():
    with pytest.raises(ValueError, match="committed must be a report's run"):
        compare_runs({"metrics": {}}, _run())


# ---- reports in a git repository -------------------------------------------------------------------------------------

def _page(run, study="demo", machine=None):
    """A minimal report page: the meta tags and the embedded run that index_page and the reproduction check read."""
    metrics_hash = hashlib.sha256(json.dumps(run["metrics"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    meta = {"study": study, "profile": "cpu", "date": "2026-12-02", "commit": "f" * 40, "dirty": "false", "data": "generated",
            "title": study.title(), "run": run["headline"]["run"], **({"machine": machine} if machine else {}), "metrics": metrics_hash}
    tags = "".join(f'<meta name="compendium-{k}" content="{v}">\n' for k, v in meta.items())
    script = json.dumps(run, sort_keys=True, separators=(",", ":")).replace("</", "<\\/")
    return f'<html><head>{tags}<script type="application/json" id="compendium-run">{script}</script></head><body></body></html>\n'


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """A git repository whose reports/ holds two committed study reports (made on an Intel x86-64-v4 machine) and the front page."""
    reports = tmp_path / "reports"
    reports.mkdir()
    _git(tmp_path, "init", "-q")
    for study in ("alpha", "beta"):
        (reports / f"{study}.html").write_text(_page(_run(), study, INTEL))
    render_index(reports)
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "reports")
    return reports


def test_committed_reports_come_from_git(repo, tmp_path_factory):
    (repo / "alpha.html").write_text(_page(_run(_with("random_aulc", 0.5)), "alpha", INTEL))
    committed = committed_reports(repo)
    assert sorted(committed) == ["alpha", "beta"] and '"random_aulc":0.43' in committed["alpha"]     # index.html is no study report
    with pytest.raises(FileNotFoundError, match="gamma.html is not committed at 'HEAD'"):
        committed_reports(repo, names=["gamma"])
    with pytest.raises(ValueError, match="rev 'v9' names no commit"):
        committed_reports(repo, rev="v9")
    with pytest.raises(ValueError, match="not inside a git repository"):
        committed_reports(tmp_path_factory.mktemp("plain"))


def test_check_passes_when_identical_and_writes_the_page(repo, capsys):
    main(["check", str(repo)])                                     # no SystemExit: nothing outside
    out = capsys.readouterr().out
    assert "alpha: All identical: the verdict and 6 numbers. Both made on the same kind of machine." in out
    page = (repo / "reproduction.html").read_text()
    assert page.count("<table>") == 2 and INTEL in page and "http" not in page.replace('href="index.html"', "")


def test_check_fails_when_a_number_is_outside(repo, capsys):
    (repo / "beta.html").write_text(_page(_run(_with("answer/n_conditions", 4)), "beta", AMD))
    main(["report", str(repo)])                                    # report says it, and exits 0
    out = capsys.readouterr().out
    assert "beta: 1 of 7 outside the stated uncertainty: answer/n_conditions. Made on different kinds of machine" in out
    assert "changed, no interval stated" in out
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(repo)])
    assert exit_.value.code == 1
    table = {r["report"]: r for r in reproduction_table(repo)}
    assert (table["alpha"]["same_kind"], table["beta"]["same_kind"]) == (True, False)
    assert (table["beta"]["committed_machine"], table["beta"]["regenerated_machine"]) == (INTEL, AMD)


def test_check_from_the_command_line(repo):
    """The module runs as `python -m project_lib.reproduction`; within the uncertainty passes, a lost report fails."""
    (repo / "alpha.html").write_text(_page(_run(_with("answer/f1_difference", 0.0)), "alpha", INTEL))
    cmd = [sys.executable, "-m", "project_lib.reproduction", "check", str(repo)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0 and "All within the stated uncertainty: 6 of 7 identical, 1 within" in done.stdout
    (repo / "beta.html").unlink()
    (repo / "gamma.html").write_text(_page(_run(), "gamma", INTEL))      # a new study has nothing to compare with: no failure
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1 and "beta: committed at HEAD but not regenerated" in done.stdout and "gamma: new" in done.stdout


def test_against_another_folder_of_reports(tmp_path, capsys):
    """--against compares with another run's folder (another machine's, or the same stages with other kernels), no git needed."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, value, machine in ((ours, 0.43, INTEL), (theirs, 0.5, AMD)):
        folder.mkdir()
        (folder / "alpha.html").write_text(_page(_run(_with("random_aulc", value)), "alpha", machine))
    main(["report", str(ours), "--against", str(theirs), "--out", str(tmp_path / "variation.html")])
    out = capsys.readouterr().out
    assert "alpha: 1 of 7 outside the stated uncertainty: random_aulc. Made on different kinds of machine" in out
    assert f"reports of {theirs}" in out and (tmp_path / "variation.html").is_file() and not (ours / "reproduction.html").exists()
    page = (tmp_path / "variation.html").read_text()   # the other folder's run is the reference, not a commit
    assert "<th>reference</th>" in page and "committed" not in page
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(ours), "--against", str(theirs), "--out", str(tmp_path / "variation.html")])
    assert exit_.value.code == 1


def test_outside_git_report_says_so_and_check_cannot_pass(tmp_path, capsys):
    (tmp_path / "alpha.html").write_text(_page(_run(), "alpha"))
    main(["report", str(tmp_path)])
    assert "no reproduction check" in capsys.readouterr().out and not (tmp_path / "reproduction.html").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(tmp_path)])
    assert exit_.value.code == 2


def test_front_page_names_the_machine_and_a_change_of_kind(repo):
    index_before = index_page(repo)
    assert f"machine: {INTEL}" in index_before and "Regenerated on" not in index_before and "reproduction.html" not in index_before
    (repo / "beta.html").write_text(_page(_run(), "beta", AMD))           # regenerated on another kind of machine
    render_index(repo)
    main(["report", str(repo)])
    index = (repo / "index.html").read_text()
    assert f'<p class="meta machine-note">Regenerated on {AMD}; the committed report was made on {INTEL}.</p>' in index
    assert index.count("machine-note") == 1 and check_index(repo) == []
    assert 'href="reproduction.html"' in index_page(repo) and check_index(repo) == []    # the link follows the page's existence
    _git(repo.parent, "add", ".")
    _git(repo.parent, "commit", "-qm", "regenerated")                     # once committed, the note goes, and the check still passes
    assert "machine-note" not in index_page(repo) and check_index(repo) == []
    (repo / "index.html").write_text(index.replace("Verdict: No difference", "Verdict: A difference", 1))
    assert check_index(repo)                                              # the rest of the page is still checked


def test_cpu_kind_from_hand_made_flags():
    v2 = "fpu sse2 cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3"
    v3 = v2 + " avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
    assert isa_level(v2.split()[:2]) == "x86-64-v1" and isa_level(v2) == "x86-64-v2" and isa_level(v3) == "x86-64-v3"
    assert isa_level(v3 + " avx512f avx512bw avx512cd avx512dq avx512vl") == "x86-64-v4"
    assert isa_level(v3.replace("movbe", "") + " avx512f avx512bw avx512cd avx512dq avx512vl") == "x86-64-v2"
    kind = cpu_kind(f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon Platinum\nflags\t\t: {v3} avx512f avx512bw avx512cd avx512dq avx512vl\n")
    assert machine_label(kind) == INTEL and kind["cores"] == os.cpu_count()
    assert same_machine_kind(INTEL, "GenuineIntel Intel Core i9, x86-64-v4") and not same_machine_kind(INTEL, AMD)
    assert same_machine_kind(INTEL, None) is None


def test_provenance_records_the_machine(tmp_path):
    prov = start_provenance("demo", "tiny", {}, "generated: test")
    record = json.loads(prov.write(tmp_path / "p.json").read_text())
    assert record["machine"] == cpu_kind() and set(record["machine"]) == {"model", "vendor", "isa_level", "cores"}
    assert record["device"]
