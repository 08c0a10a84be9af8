"""Every study's paper profile is meant for a GPU box and must not crash after hours of GPU time: its parameters
validate here (fast), and one step of each stage at paper sizes runs when RUN_SLOW=1 (slow on a CPU:
`RUN_SLOW=1 .venv/bin/python -m pytest -q tests/test_paper_profiles.py`)."""
import os

import numpy as np
import pytest
import torch

from project_lib.cascade.models import build_model as build_detector, detector_loss
from project_lib.cascade.units import CascadeParams
from project_lib.core import load_study_params
from project_lib.cryoem.al import ALStudyParams
from project_lib.cryoem.study import ARMS, CryoEMStudyParams
from project_lib.cryoem.train import build_model as build_picker, focal_dice_loss
from project_lib.mfn.analysis import MFNStudyParams
from project_lib.mfn.sim import SimulationConfig, simulate
from project_lib.synapse.data import SyntheticSynapses
from project_lib.synapse.model import VGG3D
from project_lib.synapse.study import SynapseStudyParams, prepared_inputs
from project_lib.synapse.train import ContrastiveConfig, ContrastiveVGG, contrastive_loss

SCHEMAS = {"mfn": MFNStudyParams, "cryoem": CryoEMStudyParams, "cryoem_al": ALStudyParams, "cascade": CascadeParams,
           "synapse": SynapseStudyParams}
slow = pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="paper-size smoke step: set RUN_SLOW=1 (minutes on a CPU)")


@pytest.mark.parametrize("study", sorted(SCHEMAS))
def test_every_paper_profile_validates(study):
    assert load_study_params(study, SCHEMAS[study], "paper") is not None


@slow
def test_mfn_paper_step_at_1024():
    p = load_study_params("mfn", MFNStudyParams, "paper")
    n = max(p.grid_sizes)
    features = simulate(SimulationConfig(grid_size=n, steps=5, alpha=max(p.alphas), seed=0)).features()
    assert np.isfinite(features.to_array()).all()


@slow
@pytest.mark.parametrize("arm", ARMS)
def test_cryoem_paper_training_step_on_one_full_micrograph(arm):
    p = load_study_params("cryoem", CryoEMStudyParams, "paper")
    config = p.train_config(arm, 0)
    model = build_picker(config)
    x, y = torch.randn(1, 1, p.size_px, p.size_px), (torch.rand(1, 1, p.size_px, p.size_px) > 0.99).float()
    loss = focal_dice_loss(model(x), y, config)
    loss.backward()
    assert torch.isfinite(loss)


@slow
@pytest.mark.parametrize("role", ["filter", "effnet", "genconvit_ed", "genconvit_vae"])
def test_cascade_paper_training_step_on_one_batch(role):
    p = load_study_params("cascade", CascadeParams, "paper")
    config = p.model_config(role)
    model = build_detector(config).train()
    x, y = torch.rand(config.batch_size, 3, config.px, config.px), torch.randint(0, 2, (config.batch_size,))
    loss = detector_loss(model(x), x, y)
    loss.backward()
    assert torch.isfinite(loss)


@slow
def test_synapse_paper_extraction_and_contrastive_step_at_80():
    p = load_study_params("synapse", SynapseStudyParams, "paper")
    x = prepared_inputs([SyntheticSynapses(p.generator_config(), 0)[0]] * 2, p.seg_types[0], p.alpha)
    model = VGG3D(**p.network_kwargs())
    with torch.no_grad(): assert model(x).shape == (2, 7)
    net = ContrastiveVGG(model, ContrastiveConfig().proj_dim)
    loss = contrastive_loss(net, x, torch.Generator().manual_seed(0), p.contrastive_config(0))
    loss.backward()
    assert torch.isfinite(loss)


@slow
def test_cryoem_paper_plan_holds_for_measured_steps_and_validation(tmp_path):
    """Two training steps and one validation pass of the real training code at paper sizes stay within a factor 1.5
    of the unit costs `make plan` predicts; the checkpoints on disk and the peak RSS stay within its figures."""
    import dataclasses
    import time
    from project_lib.cryoem.train import simulate_dataset, train
    from project_lib.plan import _checkpoint_gb, peak_host_gb, plan_cryoem
    p = load_study_params("cryoem", CryoEMStudyParams, "paper")
    planned = plan_cryoem("paper", "cpu")[0]
    mics = simulate_dataset(p.micrograph_config(), 3, 0, None)
    config = dataclasses.replace(p.train_config(ARMS[1], 0), epochs=1, batch_size=1, lr_schedule="constant")
    t0 = time.perf_counter()
    run = train(config, mics[:2], mics[2:], tmp_path / "run", device="cpu", progress=False)
    validation_s = time.perf_counter() - t0 - run.train_time_s
    step_s, planned_step_s = run.train_time_s / 2, planned.step_s / p.batch_size
    assert planned_step_s / 1.5 <= step_s <= planned_step_s * 1.5, (step_s, planned_step_s)
    planned_validation_s = planned.validation_s / (p.val_subset or p.n_val)   # a validation pass covers val_subset micrographs
    assert validation_s <= planned_validation_s * 1.5 + 5, (validation_s, planned_validation_s)   # + cache writing and set-up
    checkpoints_gb = sum(f.stat().st_size for f in (tmp_path / "run").glob("*.pt")) / 1e9
    n_params = sum(t.numel() for t in build_picker(config).parameters())
    assert checkpoints_gb <= _checkpoint_gb(n_params) and peak_host_gb() <= planned.host_gb


@slow
def test_cascade_paper_plan_holds_for_measured_steps_and_validation(tmp_path, monkeypatch):
    """Three training steps of the paper's filter (256 px, batch 64) and its validation pass over 128 images, run by the
    real training code on images the streaming manifest loader reads from its cache, stay within a factor 1.5 of the
    per-step and per-image validation costs `make plan` predicts (its filter row: the other roles' calibration is left
    out to keep this test within about a minute); the checkpoints and the peak RSS stay within its figures."""
    import dataclasses
    import time
    import pandas as pd
    from project_lib.cascade import stack, units
    from project_lib.cascade.data import Benchmark, _sample_plan, load_manifest, real_photographs, write_manifest
    from project_lib.plan import peak_host_gb, plan_cascade
    steps, n_val = 3, 128
    p = load_study_params("cascade", CascadeParams, "paper")
    monkeypatch.setattr(units.CascadeParams, "detectors", property(lambda self: ("filter",)))
    planned = next(c for c in plan_cascade("paper", "cpu") if c.stage == "train_cascade: filter")   # sets the worker's torch threads
    photos = real_photographs(p.n_faces)
    groups = np.array([photos[s["photo"]]["name"] for s in _sample_plan(photos, p.crops_per_photo, p.crops_per_face, 0.5, p.data_seed)], dtype=object)
    planned_per_image = planned.validation_s / len(units.split_indices(p, groups)["val"])
    config = dataclasses.replace(p.model_config("filter"), epochs=1)
    rng = np.random.default_rng(0)

    def manifest(name, n):
        bench = Benchmark(rng.integers(0, 256, (n, p.px, p.px, 3), dtype=np.uint8), np.arange(n) % 2,
                          np.array([f"{name}{i // 8}" for i in range(n)], dtype=object), pd.DataFrame(index=range(n)))
        return load_manifest(write_manifest(bench, tmp_path / name), p.px, tmp_path / "cache")
    train, val = manifest("train", steps * config.batch_size), manifest("val", n_val)
    validation_s, predict = [], stack.predict

    def timed_predict(*args, **kwargs):   # the validation pass inside the training
        t0 = time.perf_counter()
        out = predict(*args, **kwargs)
        validation_s.append(time.perf_counter() - t0)
        return out
    monkeypatch.setattr(stack, "predict", timed_predict)
    trained = stack.train_detector(config, train, val, tmp_path / "run", seed=0, device="cpu")
    step_s, checkpoints_gb = trained.train_time_s / steps, sum(f.stat().st_size for f in (tmp_path / "run").glob("*.pt")) / 1e9
    print(f"step {step_s:.2f} s (planned {planned.step_s:.2f}), validation {validation_s[0]:.2f} s (planned {planned_per_image * n_val:.2f}), "
          f"checkpoints {checkpoints_gb:.4f} GB (planned {planned.disk_gb / planned.trainings:.4f}), peak RSS {peak_host_gb():.2f} GB (planned {planned.host_gb:.2f})")
    assert planned.step_s / 1.5 <= step_s <= planned.step_s * 1.5, (step_s, planned.step_s)
    assert len(validation_s) == 1 and validation_s[0] <= planned_per_image * n_val * 1.5, (validation_s, planned_per_image * n_val)
    assert checkpoints_gb <= planned.disk_gb / planned.trainings and peak_host_gb() <= planned.host_gb


@slow
def test_synapse_paper_plan_holds_for_measured_steps_and_validation(tmp_path, monkeypatch):
    """Two contrastive training steps (batch 2) and one validation pass (2 cubes, 4 views) of the real training code on 80³
    cubes read from the on-disk cache: the step within a factor 1.5 of the unit cost `make plan` multiplied (scaled to
    batch 2), the validation per cube at most 1.5 times the plan's; the peak RSS within the plan's host memory, the
    checkpoints and the cache within its disk figures."""
    import dataclasses
    import time
    from project_lib.plan import peak_host_gb, plan_synapse, synapse_unit_costs
    from project_lib.synapse import train as synapse_train
    from project_lib.synapse.train import PretrainingSet, train_contrastive
    p = load_study_params("synapse", SynapseStudyParams, "paper")
    costs = synapse_unit_costs(p, "cpu")                    # one worker's threads, as the stage's units train
    planned = plan_synapse("paper", "cpu", costs)[0]
    # 3 bounding boxes of 2 axons x 1 synapse at the paper's 80³ / 8 nm: 4 training cubes (2 steps of 2), the last box validates (2 cubes)
    data = PretrainingSet(dataclasses.replace(p.generator_config(pretraining=True), n_bboxes=3, axons_per_bbox=2, synapses_per_axon=1),
                          p.pretrain_seed, p.seg_types[0], p.alpha, 1).load(tmp_path / "cache")
    batch, validations = 2, []
    validation = synapse_train.contrastive_validation
    def timed_validation(*args, **kwargs):
        t0 = time.perf_counter(); out = validation(*args, **kwargs); validations.append(time.perf_counter() - t0)
        return out
    monkeypatch.setattr(synapse_train, "contrastive_validation", timed_validation)
    config = ContrastiveConfig(epochs=1, batch_size=batch, lr=p.ssl_lr, temperature=p.ssl_temperature)
    torch.manual_seed(0)
    run = train_contrastive(VGG3D(**p.network_kwargs()), data["train_x"], data["val_x"], config, tmp_path / "run", progress=False)
    step_s, planned_step_s = run.train_time_s / 2, costs.ssl_step_s * batch / p.ssl_batch_size
    validation_s, planned_validation_s = validations[0] / len(data["val_x"]), planned.validation_s / (p.val_bboxes * p.axons_per_bbox * p.synapses_per_axon)
    print(f"contrastive step at batch {batch}: {step_s:.1f} s (planned {planned_step_s:.1f} s); validation per cube: {validation_s:.2f} s "
          f"(planned {planned_validation_s:.2f} s); peak RSS {peak_host_gb():.2f} GB (planned {planned.host_gb:.2f} GB)")
    assert planned_step_s / 1.5 <= step_s <= planned_step_s * 1.5, (step_s, planned_step_s)
    assert validation_s <= planned_validation_s * 1.5, (validation_s, planned_validation_s)
    assert peak_host_gb() <= planned.host_gb, (peak_host_gb(), planned.host_gb)
    assert sum(f.stat().st_size for f in (tmp_path / "run").glob("*.pt")) / 1e9 <= costs.checkpoint_gb
    cache = next((tmp_path / "cache").glob("pretraining-*.npy")).stat().st_size
    assert cache <= 6 * p.cube_size ** 3 * 4 + 4096                                  # the declared size: cubes x 80³ x 4 bytes (+ the header)


def _timed(fn, seconds: list):
    """`fn`, appending the seconds each call takes to `seconds`."""
    import time

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try: return fn(*args, **kwargs)
        finally: seconds.append(time.perf_counter() - t0)
    return timed


@slow
def test_cryoem_al_paper_plan_holds_for_measured_round_and_acquisition(tmp_path, monkeypatch):
    """One round of the active-learning study at paper sizes, by the library's own functions on micrographs of the paper's stream (3 of the
    pool, the first validation and test micrographs), simulated once into a store as the stage keeps them and read back from it on every
    pass (nothing kept in memory: at paper sizes, 6192 micrographs, none still is): `train_round` trains 2 steps (batch 1) on 2 labelled
    micrographs, validates on 1, then scores validation, test and the unlabelled rest of the pool (1 each); `acquire` (entropy) then scans
    the 3-micrograph pool. The step lies within a factor 1.5 of the plan's (scaled to batch 1); validation, scoring and scanning per
    micrograph at most 1.5 times the plan's prediction and picking cost per micrograph (its validation pass over val_subset micrographs:
    the plan prices scoring with it plus a read from the store, milliseconds, and scanning with the prediction alone, a little less);
    the peak RSS within its host memory; the checkpoints within its per-training figure, the store within its disk per micrograph."""
    import dataclasses
    import time
    from project_lib.cryoem import al, train as cryoem_train
    from project_lib.cryoem.active import acquire, measure
    from project_lib.cryoem.data import MicrographConfig
    from project_lib.cryoem.train import SimulatedMicrographs, load_checkpoint
    from project_lib.plan import _checkpoint_gb, al_checkpoints_gb, peak_host_gb, plan_cryoem_al
    steps, labelled = 2, [0, 1]
    p = load_study_params("cryoem_al", ALStudyParams, "paper")
    planned = plan_cryoem_al("paper", "cpu")[0]                  # sets the worker's torch threads
    paper_config = p.train_config(p.seeds[0])
    planned_per_micrograph = planned.validation_s / (paper_config.val_subset or p.n_val)
    mics = SimulatedMicrographs(MicrographConfig(**p.micrograph), p.data_seed, [0, 1, 2, p.pool_size, p.pool_size + p.n_val],
                                cache=0, store=tmp_path / "micrographs")
    sets = {"pool": mics[:3], "val": mics[3:4], "test": mics[4:]}
    mics.data_hash(*sets.values())                               # as `simulate_sets`: every micrograph simulated once, into the store
    trainings, validations, fit = [], [], cryoem_train.fit
    monkeypatch.setattr(cryoem_train, "fit", lambda *args, evaluate, **kwargs: fit(*args, evaluate=_timed(evaluate, validations), **kwargs))
    monkeypatch.setattr(al, "train", _timed(al.train, trainings))
    config = dataclasses.replace(paper_config, epochs=1, batch_size=1, samples_per_epoch=steps)
    t0 = time.perf_counter()
    summary, _, checkpoint = al.train_round(config, sets, labelled, tmp_path / "runs" / "round", device="cpu")
    scored = len(sets["val"]) + len(sets["test"]) + len(sets["pool"]) - len(labelled)
    scoring_s = (time.perf_counter() - t0 - trainings[0]) / scored
    net = load_checkpoint(config, checkpoint)
    _, scan_s, scan_mb = measure(acquire, "entropy", net, sets["pool"], labelled, 1, np.random.default_rng(0), p.settings())
    step_s, planned_step_s = summary["train_time_s"] / steps, planned.step_s / paper_config.batch_size
    validation_s, scan_s = validations[0] / len(sets["val"]), scan_s / len(sets["pool"])
    checkpoints_gb = sum(f.stat().st_size for f in checkpoint.parent.glob("*.pt")) / 1e9
    planned_checkpoints_gb = _checkpoint_gb(sum(t.numel() for t in net.parameters()))
    stored = [f.stat().st_size for f in (tmp_path / "micrographs").rglob("*.pkl")]
    planned_stored = ((planned.disk_gb - al_checkpoints_gb(p, sum(t.numel() for t in net.parameters()), planned.workers)) * 1e9
                      / (p.pool_size + p.n_val + p.n_test))
    print(f"step at batch 1: {step_s:.1f} s (planned {planned_step_s:.1f}); per micrograph: validation {validation_s:.1f} s, scoring "
          f"{scoring_s:.1f} s, entropy scan {scan_s:.1f} s (planned {planned_per_micrograph:.1f}, prediction and picking); checkpoints "
          f"{checkpoints_gb:.3f} GB (planned {planned_checkpoints_gb:.3f}); stored micrograph {np.mean(stored) / 1e6:.2f} MB (planned "
          f"{planned_stored / 1e6:.2f}); peak RSS {peak_host_gb():.2f} GB (planned {planned.host_gb:.2f}; the scan's rise {scan_mb / 1e3:.2f})")
    assert len(validations) == 1 and len(stored) == len(mics)
    assert planned_step_s / 1.5 <= step_s <= planned_step_s * 1.5, (step_s, planned_step_s)
    for name, seconds in (("validation", validation_s), ("scoring", scoring_s), ("scan", scan_s)):
        assert seconds <= planned_per_micrograph * 1.5, (name, seconds, planned_per_micrograph)
    assert checkpoints_gb <= planned_checkpoints_gb and np.mean(stored) <= planned_stored * 1.01, (checkpoints_gb, stored, planned_stored)
    assert peak_host_gb() <= planned.host_gb, (peak_host_gb(), planned.host_gb)


@slow
def test_mfn_paper_plan_holds_for_measured_simulations(tmp_path, monkeypatch):
    """The paper's sweep for one alpha and one seed (every grid size x step count x Turing on/off x dynamics: 60 runs, the sweep's mix),
    simulated and written by the stage's own unit function as one of its workers (its numba threads, in this process): the mean time per
    simulation within a factor 1.5 of the plan's unit cost (seconds per step at each grid size) times the runs' steps, the peak RSS within
    its host memory, the Parquet bytes per row within its disk per row of the profile's datasets."""
    import time
    from project_lib.mfn import dataset
    from project_lib.mfn.dataset import sweep
    from project_lib.mfn.features import FeatureConfig
    from project_lib.mfn.stage import simulate_dataset, study_units
    from project_lib.plan import mfn_unit_costs, peak_host_gb, plan_mfn
    p = load_study_params("mfn", MFNStudyParams, "paper")
    costs = mfn_unit_costs(p)
    planned = plan_mfn("paper", costs=costs)[0]
    configs = [c for d in p.dynamics for c in sweep(p.grid_sizes, p.alphas[:1], p.seeds[:1], p.steps, dynamics=d, spike_probability=p.spike_probability)]
    monkeypatch.setattr(dataset, "thread_budget", lambda n_jobs: (1, costs.threads))   # one of the stage's workers, here
    t0 = time.perf_counter()
    record = simulate_dataset(tmp_path, "cpu", configs, FeatureConfig(), p.n_jobs)
    per_simulation_s = (time.perf_counter() - t0) / len(configs)
    planned_per_simulation_s = sum(costs.step_s[c.grid_size] * c.steps for c in configs) / len(configs)
    rows = sum(len(u.kwargs["configs"]) for u in study_units(p) if u.key.startswith("dataset-"))
    bytes_per_row, planned_bytes_per_row = (tmp_path / record["file"]).stat().st_size / record["n_simulations"], planned.disk_gb * 1e9 / rows
    print(f"{len(configs)} simulations, {costs.threads} numba thread(s): {per_simulation_s:.3f} s each (planned {planned_per_simulation_s:.3f}); "
          f"{bytes_per_row:.0f} Parquet bytes per row (planned {planned_bytes_per_row:.0f}); peak RSS {peak_host_gb():.2f} GB (planned {planned.host_gb:.2f})")
    assert record["n_simulations"] == len(configs) == 60
    assert planned_per_simulation_s / 1.5 <= per_simulation_s <= planned_per_simulation_s * 1.5, (per_simulation_s, planned_per_simulation_s)
    assert bytes_per_row <= planned_bytes_per_row, (bytes_per_row, planned_bytes_per_row)
    assert peak_host_gb() <= planned.host_gb, (peak_host_gb(), planned.host_gb)
