"""cryoem simulator: structures, image formation and noise physics, truth, distractors, realism measurements."""
import dataclasses
import math

import numpy as np
import pytest

from project_lib.cryoem.data import (MicrographConfig, Micrograph, Structure, detector_mtf, difficulty_table, edge_particles,
                                     electron_wavelength_a, intensity_statistics, load_structure, log_spectrum_distance,
                                     particle_mask, particle_snr, power_ratio, project_structure, read_structure,
                                     simulate_micrograph, thon_ring_limit)

FLAT = MicrographConfig(size_px=128, pixel_size_a=8.0, particles_min=0, particles_max=0, ice_thickness_a=0.0,
                        carbon_probability=0.0, aggregates_max=0, broken_max=0, ice_crystals_max=0)
SMALL = MicrographConfig(size_px=128, pixel_size_a=8.0, particles_min=10, particles_max=14)


def test_poisson_noise_variance_equals_the_mean_counts_on_a_flat_object():
    mic = simulate_micrograph(dataclasses.replace(FLAT, dose_e_per_a2=20.0), np.random.default_rng(0))
    mean = 20.0 * 8.0 ** 2 * 0.8                               # dose × pixel area × detected fraction
    assert mic.metadata["counts_mean"] == pytest.approx(mean, rel=0.005)
    assert mic.metadata["counts_std"] ** 2 == pytest.approx(mean, rel=0.05)   # 16k pixels: the variance is known to ~1 %
    assert len(mic.centres) == 0 and not mic.mask.any()


def test_snr_definition_on_a_hand_built_case():
    signal, expected = np.zeros((21, 21)), np.full((21, 21), 50.0)
    signal[10, 10], signal[10, 11] = 10.0, -5.0                 # inside a disk of radius 2 (13 pixels)
    signal[0, 0] = 1e6                                          # outside: must not count
    snr = particle_snr(signal, expected, np.array([[10.0, 10.0]]), np.array([4.0]))
    assert snr == pytest.approx([(100 + 25) / 13 / 50])


@pytest.mark.parametrize("shape, pixel, detector, index, expected", [
    ((16, 16), 1.0, 1.0, (0, 8), (2 / math.pi) ** 2),          # own Nyquist along x: box aperture twice (detector, binning)
    ((16, 16), 1.0, 1.0, (8, 8), (2 / math.pi) ** 4),          # the corner: both axes
    ((16, 16), 2.0, 1.0, (0, 8), 2 / math.pi * math.sin(math.pi / 4) / (math.pi / 4)),   # binned 2×: the detector is at half its Nyquist
    ((16, 16), 1.0, 1.0, (0, 0), 1.0)])
def test_mtf_at_known_frequencies(shape, pixel, detector, index, expected):
    assert detector_mtf(shape, pixel, detector)[index] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_mask_centres_edges_and_per_type_diameters(seed):
    mic = simulate_micrograph(SMALL, np.random.default_rng(seed))
    n = SMALL.size_px
    assert ((mic.centres >= 0) & (mic.centres < n)).all()
    rows, cols = np.mgrid[:n, :n]
    truth = np.zeros((n, n), bool)
    for (x, y), d in zip(mic.centres, mic.diameters_px):
        truth |= np.hypot(cols - x, rows - y) <= d / 2
    assert np.array_equal(mic.mask, truth)
    expected = {t: load_structure(t).diameter_a / SMALL.pixel_size_a for t in SMALL.particle_types}
    assert mic.diameters_px.tolist() == pytest.approx([expected[t] for t in mic.metadata["particle_types"]])
    assert mic.diameter_px == pytest.approx(min(expected.values()))
    cut = [(x - d / 2 < -0.5) or (y - d / 2 < -0.5) or (x + d / 2 > n - 0.5) or (y + d / 2 > n - 0.5)
           for (x, y), d in zip(mic.centres, mic.diameters_px)]
    assert edge_particles(mic).tolist() == cut


def test_some_particles_are_cut_by_the_border():
    mics = [simulate_micrograph(SMALL, np.random.default_rng(s)) for s in range(6)]
    assert sum(edge_particles(m).sum() for m in mics) > 0


def test_both_types_appear_in_their_proportions():
    cfg = dataclasses.replace(SMALL, type_proportions=(3.0, 1.0), aggregates_max=0, broken_max=0, ice_crystals_max=0, carbon_probability=0)
    types = [t for s in range(12) for t in simulate_micrograph(cfg, np.random.default_rng(s)).metadata["particle_types"]]
    share = types.count("apoferritin") / len(types)
    assert 0.6 < share < 0.9                                    # 0.75 requested; large ribosomes fit less often


@pytest.mark.parametrize("seed", range(6))
def test_distractors_are_absent_from_centres_and_mask(seed):
    cfg = dataclasses.replace(SMALL, carbon_probability=1.0, aggregates_max=2, broken_max=3, ice_crystals_max=2, min_separation=1.0)
    mic = simulate_micrograph(cfg, np.random.default_rng(seed))
    assert mic.metadata["n_on_carbon"] + mic.metadata["n_aggregates"] + mic.metadata["n_broken"] + mic.metadata["n_ice_crystals"] > 0
    assert len(mic.metadata["distractors"]) == (mic.metadata["n_on_carbon"] + mic.metadata["n_aggregates"]
                                                + mic.metadata["n_broken"] + mic.metadata["n_ice_crystals"])
    for x, y, kind in mic.metadata["distractors"]:
        assert not mic.mask[y, x], kind                         # no distractor centre inside a picked particle's disk
        assert not any((np.round(mic.centres) == [x, y]).all(axis=1))


def test_only_distractors_give_an_empty_truth_but_a_busy_image():
    cfg = dataclasses.replace(FLAT, carbon_probability=1.0, aggregates_max=3, broken_max=3, ice_crystals_max=2, particles_max=0)
    mic = simulate_micrograph(cfg, np.random.default_rng(1))
    assert len(mic.centres) == 0 and not mic.mask.any() and len(mic.metadata["distractors"]) > 0


def test_touching_allowed_at_min_separation_one_and_kept_apart_otherwise():
    for separation in (1.0, 1.5):
        cfg = dataclasses.replace(SMALL, min_separation=separation, particles_min=30, particles_max=30, clustered_fraction=1.0)
        mic = simulate_micrograph(cfg, np.random.default_rng(0))
        d = np.hypot(*(mic.centres[:, None] - mic.centres[None]).transpose(2, 0, 1))
        mean_diameter = (mic.diameters_px[:, None] + mic.diameters_px[None]) / 2
        ratio = (d / mean_diameter)[~np.eye(len(d), dtype=bool)]
        assert ratio.min() >= separation - 1e-9
        if separation == 1.0: assert ratio.min() < 1.3           # crowded: some neighbours nearly touch


def test_determinism_for_a_fixed_rng_and_variety_across_seeds():
    a, b = (simulate_micrograph(SMALL, np.random.default_rng(5)) for _ in range(2))
    c = simulate_micrograph(SMALL, np.random.default_rng(6))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.centres, b.centres) and a.metadata == b.metadata
    assert not np.array_equal(a.image, c.image)


def test_snr_is_proportional_to_dose_in_the_shot_noise_limit():
    cfg = dataclasses.replace(SMALL, carbon_probability=0.0, ice_crystals_max=0)
    low, high = (simulate_micrograph(dataclasses.replace(cfg, dose_e_per_a2=dose), np.random.default_rng(2)) for dose in (5.0, 40.0))
    assert np.array_equal(low.centres, high.centres)           # the same layout: only the dose differs
    np.testing.assert_allclose(high.metadata["snr_per_particle"], 8 * np.array(low.metadata["snr_per_particle"]), rtol=1e-6)


def test_projection_conserves_the_scattering_and_follows_the_rotation():
    atom = Structure("atom", np.array([[0.0, 0.0, 0.0], [0.0, 6.0, 0.0]]), np.array([1.0, 2.0]), np.array([0, 1]))
    phase = project_structure(atom, __import__("scipy").spatial.transform.Rotation.from_euler("z", -90, degrees=True), 3.0, 7)
    assert phase[3, 3] == pytest.approx(phase[3, 5] / 2) and phase[3, 5] > 0     # (0, 6 Å) rotated by -90° about z: +x
    assert np.count_nonzero(phase) == 2


def test_read_structure_from_mmcif_and_pdb():
    spliceosome = read_structure("data/cryoem/3jb9.cif.gz")
    assert spliceosome.name == "spliceosome" and len(spliceosome.xyz) > 80_000 and len(np.unique(spliceosome.chain)) > 30
    assert abs(np.average(spliceosome.xyz, axis=0, weights=spliceosome.scattering_a)).max() < 1e-6   # centred
    assert read_structure("data/cryoem/6z6u.pdb").name == "apoferritin"


def test_structures_must_cover_the_particle_types():
    with pytest.raises(ValueError, match="lack the particle type"):
        simulate_micrograph(SMALL, np.random.default_rng(0), [load_structure("apoferritin")])


@pytest.mark.parametrize("change, message", [
    (dict(size_px=16), "size_px"), (dict(pixel_size_a=0), "pixel_size_a"), (dict(detector_pixel_a=9.0), "detector_pixel_a"),
    (dict(particle_types=(), type_proportions=()), "at least one type"), (dict(type_proportions=(1.0,)), "type_proportions"),
    (dict(type_proportions=(-1.0, 2.0)), "type_proportions"), (dict(particles_min=5, particles_max=4), "particles_min"),
    (dict(min_separation=0.0), "min_separation"), (dict(dose_e_per_a2=-1.0), "dose_e_per_a2"),
    (dict(ice_thickness_a=-1.0), "ice_thickness_a"), (dict(defocus_um_min=0.0), "defocus_um_min"),
    (dict(astigmatism_um_max=-0.1), "astigmatism_um_max"), (dict(dqe_zero=1.5), "dqe_zero"),
    (dict(carbon_probability=2.0), "carbon_probability"), (dict(broken_max=-1), "broken_max"),
    (dict(amplitude_contrast=1.0), "amplitude_contrast"), (dict(b_factor_a2=-5.0), "b_factor_a2")])
def test_bad_config_values_are_rejected_with_clear_messages(change, message):
    with pytest.raises(ValueError, match=message):
        MicrographConfig(**change)


def test_mask_accepts_scalar_or_per_particle_diameters_and_refuses_a_mismatch():
    centres = np.array([[10.0, 10.0], [30.0, 10.0]])
    assert np.array_equal(particle_mask((40, 40), centres, 6.0), particle_mask((40, 40), centres, np.array([6.0, 6.0])))
    assert particle_mask((40, 40), centres, np.array([6.0, 2.0])).sum() == 29 + 5     # lattice points in radius 3 and 1 disks
    with pytest.raises(ValueError, match="one per centre"):
        particle_mask((40, 40), centres, np.ones(3))
    assert Micrograph(np.zeros((8, 8), np.float32), centres, 6.0, {}).diameters_px.tolist() == [6.0, 6.0]


def test_same_dose_at_a_finer_pixel_gives_the_snr_physics_says():
    def median_snr(pixel, size):
        cfg = dataclasses.replace(SMALL, pixel_size_a=pixel, size_px=size, dose_e_per_a2=20.0)
        return np.median(np.concatenate([simulate_micrograph(cfg, np.random.default_rng(s)).metadata["snr_per_particle"] for s in range(6)]))
    ratio = median_snr(8.0, 128) / median_snr(4.0, 256)
    assert 2.5 < ratio < 4.5          # ∝ pixel area (4) in the shot-noise limit, less what the finer pixel's extra CTF band adds


def test_thon_ring_fit_recovers_the_simulated_defocus():
    cfg = MicrographConfig(size_px=384, pixel_size_a=4.0, particles_min=10, particles_max=20, defocus_um_min=1.2, defocus_um_max=2.8,
                           astigmatism_um_max=0.0, carbon_probability=0.0, ice_crystals_max=0)
    for seed in range(3):
        mic = simulate_micrograph(cfg, np.random.default_rng(seed))
        limit, defocus = thon_ring_limit(mic.image, 4.0)
        assert defocus == pytest.approx(mic.metadata["defocus_u_um"], rel=0.03)
        assert limit > 0.09                                    # rings to near Nyquist (0.125 1/Å), as in the real epu2.9 micrograph


def test_thon_ring_limit_of_hand_made_rings_and_of_noise():
    n, pixel = 512, 4.0
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n, pixel), np.fft.fftfreq(n, pixel)))
    rings = 1 - np.cos(2 * np.pi * electron_wavelength_a(300) * 1.5e4 * k ** 2)
    for stop in (0.06, 0.1):
        image = np.fft.ifft2(np.fft.fft2(np.random.default_rng(0).normal(size=(n, n))) * np.sqrt(np.where(k < stop, rings, 1.0))).real
        limit, defocus = thon_ring_limit(image, pixel)
        assert defocus == pytest.approx(1.5, rel=0.02) and stop - 0.02 < limit < stop + 0.005
    assert thon_ring_limit(np.random.default_rng(2).normal(size=(n, n)), pixel)[0] == 0.0


def test_log_spectrum_distance_of_a_known_spectral_tilt():
    n, pixel, alpha = 512, 4.0, 10.0
    a = np.random.default_rng(0).normal(size=(n, n))
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n, pixel), np.fft.fftfreq(n, pixel)))
    b = np.fft.ifft2(np.fft.fft2(a) * np.exp(alpha * k)).real          # log power tilted by 2 α k
    centres = (np.arange(64) + 0.5) * (0.5 / pixel) / 64
    band = centres[(centres >= 0.01) & (centres <= 0.12)]
    assert log_spectrum_distance(a, b, pixel) == pytest.approx(2 * alpha * band.std(), rel=0.05)
    assert log_spectrum_distance(a, 5 * a + 2, pixel) == pytest.approx(0.0, abs=1e-9)


def test_power_ratio_and_intensity_statistics_on_known_distributions():
    assert power_ratio(np.random.default_rng(0).normal(size=(512, 512)), 4.0) == pytest.approx(1.0, abs=0.1)
    stats = intensity_statistics(np.random.default_rng(1).exponential(size=200_000))
    assert stats["skewness"] == pytest.approx(2.0, abs=0.1) and stats["kurtosis"] == pytest.approx(6.0, abs=0.6)
    assert stats["p50"] == pytest.approx(np.log(2) - 1, abs=0.01)       # median of Exp(1), standardised
    with pytest.raises(ValueError, match="holds no frequency"):
        power_ratio(np.zeros((64, 64)), 8.0)


def test_difficulty_table_pairs_layouts_across_doses():
    table = difficulty_table(dataclasses.replace(SMALL, size_px=64, particles_min=3, particles_max=5), [40.0, 10.0], n_micrographs=3)
    assert table.n_particles.nunique() == 1
    assert table.snr_median.iloc[0] == pytest.approx(4 * table.snr_median.iloc[1], rel=1e-6)
    assert table.d_shot_median.iloc[0] == pytest.approx(2 * table.d_shot_median.iloc[1], rel=1e-6)
    assert table.d_matched.iloc[0] > table.d_matched.iloc[1] > 0


def test_mask_equals_a_brute_force_disk_test_including_disks_cut_by_the_border():
    rng = np.random.default_rng(0)
    for _ in range(100):
        shape = tuple(rng.integers(5, 60, 2))
        centres, diameters = rng.uniform(-10, 70, (rng.integers(0, 6), 2)), rng.uniform(0.5, 30, 6)
        rows, cols = np.indices(shape)
        truth = np.zeros(shape, bool)
        for (x, y), d in zip(centres, diameters): truth |= (cols - x) ** 2 + (rows - y) ** 2 <= (d / 2) ** 2
        assert np.array_equal(particle_mask(shape, centres, diameters[:len(centres)]), truth)
