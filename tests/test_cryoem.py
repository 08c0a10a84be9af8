"""cryoem building blocks: CTF physics, simulator truth, loaders and conventions, models, metrics."""
import math

import mrcfile
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from project_lib.cryoem.data import (CTFParams, MicrographConfig, ctf, electron_wavelength_a, particle_mask,
                                     read_coordinates, read_micrograph, read_pdb_atoms, simulate_micrograph, write_mrc,
                                     write_picks)
from project_lib.cryoem.metrics import extract_picks, match_picks, particle_metrics, pixel_metrics
from project_lib.cryoem.models import AttentionUNet, UNet, count_parameters

STRUCTURE = read_pdb_atoms("data/cryoem/6z6u.pdb")


@pytest.mark.parametrize("voltage_kv, defocus_um, cs_mm, amplitude", [(300, 1.5, 2.7, 0.07), (200, 0.8, 2.0, 0.1), (300, 3.0, 0.0, 0.0)])
def test_ctf_zeros_at_analytic_positions(voltage_kv, defocus_um, cs_mm, amplitude):
    p = CTFParams(defocus_um, defocus_um, 0.0, voltage_kv, cs_mm, amplitude, b_factor_a2=0.0)
    lam, df, cs = electron_wavelength_a(voltage_kv), defocus_um * 1e4, cs_mm * 1e7
    phi = math.asin(amplitude)
    for n in (1, 2, 3):
        # chi(k) + phi = n pi, chi = pi lam df k^2 - pi/2 cs lam^3 k^4: the smaller root in u = k^2
        if cs:
            a, b, c = 0.5 * math.pi * cs * lam ** 3, -math.pi * lam * df, n * math.pi - phi
            u = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a)
        else:
            u = (n * math.pi - phi) / (math.pi * lam * df)
        k = math.sqrt(u)
        assert abs(ctf(np.array(k), 0.0, p)) < 1e-9
        assert ctf(np.array(k * 0.99), 0.0, p) * ctf(np.array(k * 1.01), 0.0, p) < 0     # a sign change


def test_first_zero_matches_the_rule_of_thumb():
    p = CTFParams(1.5, 1.5, cs_mm=0.0, amplitude_contrast=0.0, b_factor_a2=0.0)
    k = np.linspace(1e-4, 0.1, 200001)
    first = k[np.argmax(np.abs(np.diff(np.sign(ctf(k, 0.0, p)))) > 0)]
    assert 1 / first == pytest.approx(math.sqrt(electron_wavelength_a(300) * 1.5e4), rel=1e-3)   # 17.2 Å


def test_astigmatism_puts_defocus_u_along_the_angle():
    p = CTFParams(2.0, 1.0, 30.0, cs_mm=0.0, amplitude_contrast=0.0, b_factor_a2=0.0)
    ref_u, ref_v = CTFParams(2.0, 2.0, cs_mm=0.0, amplitude_contrast=0.0, b_factor_a2=0.0), CTFParams(1.0, 1.0, cs_mm=0.0, amplitude_contrast=0.0, b_factor_a2=0.0)
    k = np.linspace(0.01, 0.1, 50)
    np.testing.assert_allclose(ctf(k, math.radians(30), p), ctf(k, 0.0, ref_u), atol=1e-12)
    np.testing.assert_allclose(ctf(k, math.radians(120), p), ctf(k, 0.0, ref_v), atol=1e-12)


def test_mask_radius_is_half_the_diameter():
    mask = particle_mask((101, 101), np.array([[50.0, 50.0]]), 20.0)
    assert mask[50, 40] and mask[50, 60] and not mask[50, 39] and not mask[50, 61]
    assert mask.sum() == pytest.approx(math.pi * 10 ** 2, rel=0.03)


def test_simulator_truth_and_determinism():
    cfg = MicrographConfig(size_px=128, particles_min=5, particles_max=8, carbon_probability=1.0)
    a = simulate_micrograph(cfg, np.random.default_rng(3), STRUCTURE)
    b = simulate_micrograph(cfg, np.random.default_rng(3), STRUCTURE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.centres, b.centres)
    assert a.image.dtype == np.float32 and abs(float(a.image.mean())) < 1e-5
    assert a.diameter_px == pytest.approx(30.0) and a.metadata["carbon"]
    assert 0 < len(a.centres) <= 8 and a.mask.shape == (128, 128)


def test_micrograph_orientation_x_is_column_y_is_row(tmp_path):
    img = np.zeros((30, 50), np.uint8)
    img[5, 40] = 255
    Image.fromarray(img).save(tmp_path / "m.png")
    pd.DataFrame({"X-Coordinate": [40], "Y-Coordinate": [5], "Diameter": [4]}).to_csv(tmp_path / "m.csv", index=False)
    data, pixel = read_micrograph(tmp_path / "m.png")
    coords = read_coordinates(tmp_path / "m.csv", data.shape)
    assert pixel is None and data[int(coords.y[0]), int(coords.x[0])] == 255


@pytest.mark.parametrize("writer, message", [
    (lambda p: mrcfile.new(p, np.zeros((2, 4, 4), np.float32)).close(), "must be 2-D"),
    (lambda p: p.write_bytes(b"MRC?" * 10), "not a valid MRC"),
])
def test_bad_micrographs(tmp_path, writer, message):
    path = tmp_path / "bad.mrc"
    writer(path)
    with pytest.raises(ValueError, match=message):
        read_micrograph(path)


def test_bad_coordinates(tmp_path):
    pd.DataFrame({"X-Coordinate": [10, 70], "Y-Coordinate": [5, 5], "Diameter": [4, 4]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="1 particle"):
        read_coordinates(tmp_path / "c.csv", (30, 50))
    pd.DataFrame({"X-Coordinate": [10], "Y-Coordinate": [5]}).to_csv(tmp_path / "nod.csv", index=False)
    with pytest.raises(ValueError, match="Diameter"):
        read_coordinates(tmp_path / "nod.csv")
    write_picks(pd.DataFrame({"x": [1.0], "y": [2.0], "score": [0.5]}), tmp_path / "p.star")
    with pytest.raises(ValueError, match="diameter_px"):
        read_coordinates(tmp_path / "p.star")


def test_mrc_round_trip_keeps_pixel_size(tmp_path):
    write_mrc(tmp_path / "a.mrc", np.arange(12, dtype=np.float32).reshape(3, 4), 4.25)
    data, pixel = read_micrograph(tmp_path / "a.mrc")
    assert pixel == pytest.approx(4.25) and data[2, 3] == 11


def test_exact_parameter_counts():
    assert count_parameters(UNet()) == 31_042_369
    assert count_parameters(AttentionUNet()) == 31_393_901


def test_models_differ_only_by_the_gates():
    plain, gated = UNet(width=0.25), AttentionUNet(width=0.25)
    plain_names = {n for n, _ in plain.named_parameters()}
    extra = {n for n, _ in gated.named_parameters()} - plain_names
    assert plain_names <= {n for n, _ in gated.named_parameters()} and all(n.startswith("gates.") for n in extra)


def test_attention_maps_are_spatial_and_bounded():
    import torch
    model = AttentionUNet(width=0.125).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 48))
    maps = model.attention_maps()
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 6), (8, 12), (16, 24), (32, 48)]
    assert all(m.shape[1] == 1 and 0 <= float(m.min()) and float(m.max()) <= 1 for m in maps)


def test_roc_auc_matches_scikit_learn_on_the_same_scores():
    rng = np.random.default_rng(0)
    truth = rng.random((64, 64)) < 0.2
    prob = np.clip(truth * 0.3 + rng.random((64, 64)) * 0.7, 0, 1)
    assert pixel_metrics(prob, truth)["roc_auc"] == roc_auc_score(truth.ravel(), prob.ravel())
    # thresholding first (the original study's "AUC") gives a different, single-point number
    assert roc_auc_score(truth.ravel(), prob.ravel() >= 0.5) != pixel_metrics(prob, truth)["roc_auc"]


def test_particle_matching_hand_cases():
    truth = np.array([[20.0, 20.0], [60.0, 20.0]])
    assert match_picks([[20, 20], [22, 21], [60, 25]], truth, 5) == (2, 1, 0)     # duplicate -> one FP
    assert match_picks([[25, 20]], truth, 5) == (1, 0, 1)                         # on the boundary
    assert match_picks([[25.5, 20]], truth, 5) == (0, 1, 2)                       # near miss
    # optimal assignment: greedy nearest-first would leave one true particle unmatched here
    assert match_picks([[14, 10], [7, 10]], np.array([[10.0, 10.0], [18.0, 10.0]]), 5) == (2, 0, 0)


def test_picks_from_a_simulated_truth_map_are_perfect():
    cfg = MicrographConfig(size_px=128, particles_min=6, particles_max=6, carbon_probability=0.0)
    mic = simulate_micrograph(cfg, np.random.default_rng(1), STRUCTURE)
    picks = extract_picks(mic.mask.astype(float), mic.diameter_px, min_score=0.5)
    m = particle_metrics(picks.assign(image=0), pd.DataFrame(mic.centres, columns=["x", "y"]).assign(image=0),
                         mic.diameter_px / 2, 0.5)
    assert m["recall"] >= 0.8 and m["precision"] >= 0.8


# --- training engine ---------------------------------------------------------------------------------------------
import dataclasses

from project_lib.cryoem.train import (TrainConfig, budget_hash, check_comparable, data_hash, make_split, simulate_dataset,
                                      train, write_manifest)

SMALL = MicrographConfig(size_px=64, pixel_size_a=8.0, particles_min=3, particles_max=6)


def test_same_seed_same_metrics_on_cpu(tmp_path):
    mics = simulate_dataset(SMALL, 10, 0, STRUCTURE)
    cfg = TrainConfig(epochs=2, batch_size=4, width=0.0625, seed=3)
    a = train(cfg, mics[:6], mics[6:], tmp_path / "a", "s", data_hash(mics), "cpu", progress=False)
    b = train(cfg, mics[:6], mics[6:], tmp_path / "b", "s", data_hash(mics), "cpu", progress=False)
    pd.testing.assert_frame_equal(a.history, b.history)
    assert (tmp_path / "a" / "best.pt").is_file() and (tmp_path / "a" / "last.pt").is_file()


def test_resume_continues_exactly(tmp_path):
    mics = simulate_dataset(SMALL, 10, 1, STRUCTURE)
    cfg = TrainConfig(epochs=3, batch_size=4, width=0.0625)
    straight = train(cfg, mics[:6], mics[6:], tmp_path / "straight", "s", "d", "cpu", progress=False)
    train(dataclasses.replace(cfg, epochs=1), mics[:6], mics[6:], tmp_path / "resumed", "s", "d", "cpu", progress=False)
    resumed = train(cfg, mics[:6], mics[6:], tmp_path / "resumed", "s", "d", "cpu", progress=False)
    np.testing.assert_array_equal(resumed.history.train_loss, straight.history.train_loss)


def test_comparison_refuses_mismatched_runs(tmp_path):
    mics = simulate_dataset(SMALL, 8, 2, STRUCTURE)
    base = train(TrainConfig(epochs=1, batch_size=4, width=0.0625), mics[:5], mics[5:], tmp_path / "u", "s", "d", "cpu", progress=False)
    att = dataclasses.replace(base, config=dataclasses.replace(base.config, model="attention_unet"))
    check_comparable([base], [att])
    for change, message in ((dict(split_hash="x"), "split_hash"), (dict(data_hash="x"), "data_hash"), (dict(budget_hash="x"), "budget_hash")):
        with pytest.raises(ValueError, match=message):
            check_comparable([base], [dataclasses.replace(att, **change)])
    with pytest.raises(ValueError, match="seeds differ"):
        check_comparable([base], [dataclasses.replace(att, config=dataclasses.replace(att.config, seed=9))])


def test_split_is_frozen_and_hashed(tmp_path):
    split = make_split(20, seed=0)
    assert set(split["train"]).isdisjoint(split["test"]) and set(split["val"]).isdisjoint(split["test"])
    h = write_manifest(tmp_path / "split.json", split, "data")
    assert write_manifest(tmp_path / "split.json", split, "data") == h
    with pytest.raises(ValueError, match="frozen"):
        write_manifest(tmp_path / "split.json", make_split(20, seed=1), "data")
    assert budget_hash(TrainConfig(model="unet")) == budget_hash(TrainConfig(model="attention_unet"))


def test_training_runs_under_torchrun_ddp(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "tests/ddp_smoke.py", tmp_path],
                         capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "rank0.txt").read_text() == "2 2" and (tmp_path / "rank1.txt").read_text() == "2 2"
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
