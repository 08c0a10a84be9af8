"""The cryo-EM comparison's training stage (`project_lib.cryoem.stage`) on a reduced tiny profile: evaluation refuses
missing trainings, finished units are reused and changed ones retrained, a stage killed (SIGKILL) in the middle of
its third unit resumes it exactly, and one unit trains under `torchrun` (two processes, gloo) through the stage's
own entry point; a condition's lazy micrographs are its list's, scoring streams them, bad validation settings are refused."""
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from project_lib.core import load_study_params
from project_lib.engine import Executor, file_hash, load_units
from project_lib.cryoem.baselines import micrograph_ctf, oracle_probability_map, simulation_internals, template_bank, template_match_map
from project_lib.cryoem.data import load_structure
from project_lib.cryoem.stage import CryoEMStudyParams, condition_units, simulate_condition, study_units, train_one, train_study
from project_lib.cryoem.study import evaluate_study
from project_lib.cryoem.train import SimulatedMicrographs, data_hash, load_best, make_split, predict, score_picker, simulate_dataset

# two conditions (the reference and the crowded one), one seed, few micrographs: four units of two epochs;
# the third is crowded/unet-s0
REDUCED = {"conditions": {"dose 40": {}, "crowded": {"min_separation": 1.0, "particles_min": 6, "particles_max": 12}}, "reference_condition": "dose 40",
           "seeds": [0], "n_train": 4, "n_val": 2, "n_test": 2, "n_alt_val": 1, "epochs": 2}
THIRD = "crowded/unet-s0"


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    "A copy of params.yaml with the tiny cryoem profile reduced to `REDUCED`."
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["cryoem"]["tiny"].update(REDUCED)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))   # the conditions keep their order
    return path


@pytest.fixture(scope="module")
def p(params_file):
    return load_study_params("cryoem", CryoEMStudyParams, "tiny", params_file)


def _units(p):
    return [u for _, units in study_units(p).values() for u in units]


def _stamps(root, keys):
    return {k: ((root / k / "unit.json").stat().st_mtime_ns, (root / k / "unit.json").read_bytes()) for k in keys}


def _stage(params_file, root, **popen):
    return subprocess.Popen([sys.executable, "-m", "project_lib.cryoem.stage", "--profile", "tiny", "--params", params_file,
                             "--output-root", root], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def _without_timing(records):
    return {k: {f: v for f, v in r.items() if f != "train_time_s"} for k, r in records.items()}


def test_evaluation_refuses_missing_trainings(p, tmp_path):
    with pytest.raises(FileNotFoundError, match="not trained with this configuration.*run the training stage"):
        evaluate_study(p, tmp_path / "runs", [], "cpu")
    assert not (tmp_path / "runs").exists()                                              # and writes nothing


def test_finished_units_are_reused_and_a_changed_identity_retrained(p, tmp_path):
    p = dataclasses.replace(p, epochs=1)
    first = train_study(p, tmp_path, Executor(n_workers=1))
    stamps = _stamps(tmp_path, first)
    assert train_study(p, tmp_path, Executor(n_workers=1)) == first and _stamps(tmp_path, first) == stamps   # nothing retrained
    other = dataclasses.replace(p, data_seed=1)                                          # other micrographs: other identities
    with pytest.raises(FileNotFoundError, match="not trained"):
        load_units(_units(other), tmp_path)
    retrained = train_study(other, tmp_path, Executor(n_workers=1))
    assert all(retrained[k]["train_hash"] != first[k]["train_hash"] for k in first)
    assert all(_stamps(tmp_path, [k])[k] != stamps[k] for k in first)
    with pytest.raises(FileNotFoundError, match="not trained"):                          # the old identity is gone, not mixed in
        load_units(_units(p), tmp_path)


def test_a_killed_stage_keeps_finished_units_and_resumes_the_interrupted_one(params_file, p, tmp_path):
    root = tmp_path / "killed" / "tiny" / "cryoem" / "runs"
    stage = _stage(params_file, tmp_path / "killed")
    last = root / THIRD / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():                                                             # the third unit's first epoch is done
        assert stage.poll() is None and time.monotonic() < deadline, stage.communicate()[1][-2000:]
        time.sleep(0.02)
    stage.send_signal(signal.SIGKILL); stage.wait()
    keys = [u.key for u in _units(p)]
    assert not (root / THIRD / "unit.json").exists() and all((root / k / "unit.json").is_file() for k in keys[:2])
    state = torch.load(last, weights_only=True)
    assert 1 <= state["epoch"] < p.epochs
    state["train_time_s"] += 1e6                       # a mark: a run that resumes from this last.pt carries it into its record
    torch.save(state, last)
    finished = _stamps(root, keys[:2])

    resumed = _stage(params_file, tmp_path / "killed")
    assert resumed.wait(timeout=120) == 0, resumed.communicate()[1][-2000:]
    assert _stamps(root, keys[:2]) == finished                                           # finished units were not retrained
    records = load_units(_units(p), root)
    assert records[THIRD]["train_time_s"] > 1e6 and len(records[THIRD]["history"]["epoch"]) == p.epochs   # resumed, to the end

    plain = _stage(params_file, tmp_path / "plain")
    assert plain.wait(timeout=120) == 0, plain.communicate()[1][-2000:]
    uninterrupted = tmp_path / "plain" / "tiny" / "cryoem" / "runs"
    assert _without_timing(records) == _without_timing(load_units(_units(p), uninterrupted))
    for k in keys:                                                                       # the checkpoints, byte for byte
        assert file_hash(root / k / "best.pt") == file_hash(uninterrupted / k / "best.pt"), k


def test_one_unit_trains_under_torchrun_through_the_stage_entry_point(params_file, p, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "project_lib.cryoem.stage", "--profile", "tiny",
                          "--params", params_file, "--unit", "dose-40/attention_unet-s0", "--output-root", tmp_path],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "tiny" / "cryoem" / "runs"
    unit = next(u for u in _units(p) if u.key == "dose-40/attention_unet-s0")
    record = load_units([unit], root)[unit.key]                                          # the stage's own record of that unit
    assert len(record["history"]["epoch"]) == p.epochs and (root / unit.key / record["best_checkpoint"]).is_file()
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {unit.key: {"best_epoch": record["best_epoch"], "threshold": record["threshold"]}}
    assert sorted(f.name for f in (root / "dose-40").iterdir()) == ["attention_unet-s0", "split.json"]   # one unit, nothing else trained
    cache = tmp_path / "tiny" / "cryoem" / "cache" / "dose-40" / "s0"                    # the seed's training cache (outside the DVC output)
    assert len(list(cache.glob("*.recipe"))) == 1 and len(list(cache.glob("*/images.npy"))) == 1   # is kept for the seed's other arm,
    other = train_one(p, "dose-40/unet-s0", root)                                        # which reads it (found by its recipe)
    assert other["train_hash"] == record["train_hash"] and not cache.exists()            # and deletes it once both arms are trained


def _same(a, b):
    return all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) and np.array_equal(x.centres, y.centres)
               and np.array_equal(x.diameters_px, y.diameters_px) and x.metadata == y.metadata for x, y in zip(a, b, strict=True))


def test_a_condition_is_lazy_and_the_same_as_its_list(p):
    """`simulate_condition` against the list it replaced: `simulate_dataset` split by `make_split` (and the replay's sets)."""
    name, cfg = next(iter(p.micrograph_configs().items()))
    d = simulate_condition(name, cfg, p, replay=True)
    n = p.n_train + p.n_val + p.n_test
    listed = simulate_dataset(cfg, n, p.data_seed)
    split = make_split(n, (p.n_train / n, p.n_val / n, p.n_test / n), p.split_seed)
    assert d.split == split and d.data_hash == data_hash([listed[i] for i in sorted(split["val"] + split["test"])])   # the evaluated sets
    for k in ("train", "val", "test"):
        assert isinstance(d.sets[k], SimulatedMicrographs)
        assert data_hash(d.sets[k]) == data_hash([listed[i] for i in split[k]]) and _same(d.sets[k], [listed[i] for i in split[k]])
    alt = simulate_dataset(cfg, p.n_alt_val * p.n_alt_sets, p.data_seed + 1)
    for k, v in d.alt_sets.items():
        j = int(k[3:])
        assert data_hash(v) == data_hash(alt[j * p.n_alt_val:(j + 1) * p.n_alt_val]) and _same(v, alt[j * p.n_alt_val:(j + 1) * p.n_alt_val])
    # seed 0 trains on the split's training set, seed s > 0 on the next n_train micrographs of the same stream after the split's
    longer = simulate_dataset(cfg, n + 2 * p.n_train, p.data_seed)
    assert _same(longer[:n], listed)
    assert _same(d.training_set(0), [listed[i] for i in split["train"]]) and _same(d.training_set(2), longer[n + p.n_train:])
    assert len({d.training_set(s).recipe_hash() for s in range(3)}) == 3
    assert d.training_set(1).recipe_hash() == SimulatedMicrographs(cfg, p.data_seed, range(n, n + p.n_train)).recipe_hash()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            d.training_set(bad)
    unit = condition_units(d, p)[0]
    images = sum(m.image.nbytes for m in listed)
    assert len(pickle.dumps(unit)) < images / 4                                          # a unit ships the recipe, not the images


def test_scoring_a_condition_streams_and_equals_the_whole_set_scoring(p, tmp_path):
    """`evaluate_study` (maps one batch at a time, each dropped once scored; conditions in parallel processes) against every picker
    scored on lists with stacked maps (`predict`, `score_picker`) in this process, as the study did before."""
    p = dataclasses.replace(p, epochs=1)
    train_study(p, tmp_path, Executor(n_workers=1))
    templates = template_bank([load_structure(t) for t in p.particle_types], p.pixel_size_a, 4, seed=p.data_seed)
    scored = evaluate_study(p, tmp_path, templates, "cpu", n_jobs=2)                    # two conditions in two processes, one thread each
    assert list(scored) == list(p.conditions)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                                             # the reference on one thread too: the same maps
    try: _compare_with_whole_set_scoring(p, scored, templates)
    finally: torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="n_jobs must be an integer >= 1"):
        evaluate_study(p, tmp_path, templates, "cpu", n_jobs=0)


def _compare_with_whole_set_scoring(p, scored, templates):
    for (d, units), run in zip(study_units(p).values(), scored.values()):
        val, test, rows = list(d.sets["val"]), list(d.sets["test"]), []
        stacked = {k: (predict(load_best(r), val), predict(load_best(r), test)) for k, r in run.runs.items()}
        holes = {k: [clear for *_, clear in simulation_internals(d.sets[k])] for k in ("val", "test")}   # the carbon masked out
        tm = lambda mics, allowed: np.stack([template_match_map(m.image, templates, micrograph_ctf(m, d.config), d.config.pixel_size_a,
                                                                d.config.detector_pixel_a, a) for m, a in zip(mics, allowed, strict=True)])
        stacked[("template_matching", 0)] = (tm(val, holes["val"]), tm(test, holes["test"]))
        stacked[("oracle", 0)] = tuple(np.stack([oracle_probability_map(m) for m in s]) for s in (val, test))
        for (model, seed), (v, t) in stacked.items():
            table, threshold = score_picker(v, t, val, test)
            rows.append(table.assign(condition=d.name, model=model, seed=seed))
            assert run.thresholds[(model, seed)] == threshold
            assert run.test_mean_probability[(model, seed)] == pytest.approx(float(t.mean()), rel=1e-6)
        pd.testing.assert_frame_equal(run.per_micrograph, pd.concat(rows, ignore_index=True), check_exact=True)
        assert not any(isinstance(v, np.ndarray) and v.ndim == 3 for v in vars(run).values())   # no stack of maps is kept


@pytest.mark.parametrize("change, message", [({"val_every": 0}, "val_every must be >= 1"), ({"val_subset": -1}, "val_subset must be >= 0"),
                                             ({"val_every": 1.5}, "val_every = 1.5 is not a valid int"),
                                             ({"val_subset": 3}, r"val_subset \(3\) must not exceed n_val \(2\)")])
def test_bad_validation_settings_are_refused_when_the_parameters_are_read(params_file, tmp_path, change, message):
    params = yaml.safe_load(Path(params_file).read_text())
    params["cryoem"]["tiny"].update(change)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))   # the conditions keep their order
    with pytest.raises(ValueError, match=message):
        load_study_params("cryoem", CryoEMStudyParams, "tiny", path)


def test_a_units_identity_covers_every_module_its_training_imports():
    "A change to any module the training runs (the picker that validation uses included) retrains; analysis and reports never do."
    from project_imports import project_imports
    from project_lib.cryoem.stage import TRAINING_CODE
    imported = project_imports("cryoem.train") - {"core"}
    assert imported == {m.__name__.removeprefix("project_lib.") for m in TRAINING_CODE}
    deps = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["train_cryoem"]["deps"]
    assert {f"project_lib/{m.replace('.', '/')}.py" for m in imported} <= set(deps)
