"""cryoem building blocks: CTF physics, masks, models, metrics, determinism (simulator: test_cryoem_sim.py; loaders: test_cryoem_io.py;
picker: test_cryoem_picker.py; engine: test_cryoem_train.py; baselines: test_cryoem_baselines.py)."""
import math

import numpy as np
import pandas as pd
import pytest

from project_lib.cryoem.data import CTFParams, MicrographConfig, ctf, electron_wavelength_a, particle_mask
from project_lib.cryoem.metrics import match_picks, pixel_metrics
from project_lib.cryoem.models import AttentionUNet, UNet, count_parameters

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


def test_roc_auc_is_the_probability_that_a_positive_outscores_a_negative():
    # hand-counted: positives 0.9, 0.4; negatives 0.5, 0.1, 0.4 -> pairs won 3 + 1 + 0.5 (tie) of 6 = 4.5 / 6
    truth = np.array([1, 1, 0, 0, 0], bool)
    prob = np.array([0.9, 0.4, 0.5, 0.1, 0.4])
    assert pixel_metrics(prob, truth)["roc_auc"] == pytest.approx(4.5 / 6, abs=1e-12)
    # thresholding first (the original study's "AUC") gives the single-point number (TPR + TNR) / 2 = (0.5 + 2/3) / 2
    assert pixel_metrics((prob >= 0.45).astype(float), truth)["roc_auc"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-12)


def test_particle_matching_hand_cases():
    truth = np.array([[20.0, 20.0], [60.0, 20.0]])
    assert match_picks([[20, 20], [22, 21], [60, 25]], truth, 5) == (2, 1, 0)     # duplicate -> one FP
    assert match_picks([[25, 20]], truth, 5) == (1, 0, 1)                         # on the boundary
    assert match_picks([[25.5, 20]], truth, 5) == (0, 1, 2)                       # near miss
    # optimal assignment: greedy nearest-first would leave one true particle unmatched here
    assert match_picks([[14, 10], [7, 10]], np.array([[10.0, 10.0], [18.0, 10.0]]), 5) == (2, 0, 0)


# --- training engine (guard, resume, checkpoints, DDP: test_cryoem_train.py) -------------------------------------------
from project_lib.cryoem.train import TrainConfig, budget_hash, make_split, simulate_dataset, train, write_manifest


def test_same_seed_same_metrics_on_cpu(tmp_path):
    mics = simulate_dataset(MicrographConfig(size_px=64, pixel_size_a=8.0, particles_min=3, particles_max=6), 10, 0)
    cfg = TrainConfig(epochs=2, batch_size=4, width=0.0625, seed=3)
    a = train(cfg, mics[:6], mics[6:], tmp_path / "a", device="cpu", progress=False)
    b = train(cfg, mics[:6], mics[6:], tmp_path / "b", device="cpu", progress=False)
    pd.testing.assert_frame_equal(a.history, b.history)
    assert (tmp_path / "a" / "best.pt").is_file() and (tmp_path / "a" / "last.pt").is_file()


def test_split_is_frozen_and_hashed(tmp_path):
    split = make_split(20, seed=0)
    assert set(split["train"]).isdisjoint(split["test"]) and set(split["val"]).isdisjoint(split["test"])
    h = write_manifest(tmp_path / "split.json", split, "data")
    assert write_manifest(tmp_path / "split.json", split, "data") == h
    with pytest.raises(ValueError, match="frozen"):
        write_manifest(tmp_path / "split.json", make_split(20, seed=1), "data")
    assert budget_hash(TrainConfig(model="unet")) == budget_hash(TrainConfig(model="attention_unet"))
