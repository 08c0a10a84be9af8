"""cryoem baselines: the oracle map and CTF-aware NCC template matching, against independent computations."""
import time

import numpy as np
import pytest

from project_lib.cryoem.baselines import (ctf_filter_templates, disc_window, micrograph_ctf, normalised_cross_correlation,
                                          oracle_probability_map, template_bank, template_match_map)
from project_lib.cryoem.data import (CONTRAST_IN_ICE, POTENTIAL_PER_SCATTERING, CTFParams, Micrograph, MicrographConfig, Structure,
                                     ctf_image, interaction_constant, load_structure, simulate_micrograph)
from project_lib.cryoem.metrics import extract_picks

PIXEL_A = 6.0


def direct_ncc(image, template, window, row, col):
    """Pearson correlation of the template with the window-masked patch centred at (row, col) of the zero-padded,
    mean-subtracted image: the definition, one offset at a time."""
    box, half = template.shape[0], template.shape[0] // 2
    padded = np.pad(image - image.mean(), box)
    patch = padded[box + row - half:box + row - half + box, box + col - half:box + col - half + box]
    return np.corrcoef(patch[window], template[window])[0, 1]


@pytest.fixture(scope="module")
def views():
    return template_bank(load_structure("apoferritin"), PIXEL_A, n_orientations=6, seed=0)[0]


@pytest.mark.parametrize("box", [7, 9, 10])
@pytest.mark.parametrize("square", [False, True])
def test_ncc_matches_the_direct_loop(box, square):
    rng = np.random.default_rng(box)
    image, templates = rng.normal(size=(31, 44)), rng.normal(size=(2, box, box))
    window = np.ones((box, box), bool) if square else disc_window(box)
    ncc = normalised_cross_correlation(image, templates, window if square else None)
    for row, col in [(0, 0), (30, 43), (0, 43), (15, 20), (3, 40), (29, 2)]:        # corners, edges, interior
        for k in range(2):
            assert ncc[k, row, col] == pytest.approx(direct_ncc(image, templates[k], window, row, col), abs=1e-5)


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (3.5, -7.0), (0.01, 100.0)])
def test_ncc_of_a_patch_with_itself_is_one_and_affine_invariant(a, b):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(48, 48))
    templates = np.stack([image[5:16, 30:41], rng.normal(size=(11, 11))])          # patch 0 is centred at (10, 35)
    ncc = normalised_cross_correlation(a * image + b, templates)
    assert ncc[0, 10, 35] == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(ncc[0].argmax(), image.shape) == (10, 35)
    for row, col in [(10, 35), (0, 0), (47, 20)]:
        assert ncc[1, row, col] == pytest.approx(direct_ncc(image, templates[1], disc_window(11), row, col), abs=1e-5)
    assert np.allclose(normalised_cross_correlation(-image, templates), -normalised_cross_correlation(image, templates), atol=1e-5)


@pytest.mark.parametrize("row, col", [(40, 50), (16, 78), (76, 18)])
def test_a_planted_projection_is_found_where_it_was_planted(views, row, col):
    box = views.shape[-1]
    image = np.random.default_rng(row).normal(0, 1, (96, 96))
    image[row - box // 2:row - box // 2 + box, col - box // 2:col - box // 2 + box] += 1.5 * views[2] / views[2].std()
    score = template_match_map(image, [views], None, PIXEL_A)
    assert np.unravel_index(score.argmax(), score.shape) == (row, col)
    assert 0 <= score.min() and score.max() <= 1


@pytest.mark.parametrize("defocus_um", [1.0, 2.5])
def test_ctf_aware_matching_beats_ctf_unaware_on_a_ctf_filtered_particle(views, defocus_um):
    params, n, box = CTFParams(defocus_um, defocus_um * 0.95, 40.0), 96, views.shape[-1]
    canvas = np.zeros((n, n)); canvas[30:30 + box, 40:40 + box] = views[1]
    particle = np.fft.ifft2(np.fft.fft2(canvas) * ctf_image((n, n), PIXEL_A, params)).real   # as the simulator images it
    true_rc = (30 + box // 2, 40 + box // 2)
    filtered = ctf_filter_templates(views[1:2], params, PIXEL_A)[0]
    assert np.corrcoef(filtered.ravel(), particle[30:30 + box, 40:40 + box].ravel())[0, 1] > 0.95
    image = particle / particle.std() + np.random.default_rng(7).normal(0, 2.0, (n, n))
    aware, unaware = template_match_map(image, views, params, PIXEL_A), template_match_map(image, views, None, PIXEL_A)
    assert aware[true_rc] > unaware[true_rc] + 0.1
    assert np.abs(np.subtract(np.unravel_index(aware.argmax(), aware.shape), true_rc)).max() <= 1


def test_the_oracle_map_is_the_true_mask_with_each_particles_own_diameter():
    centres, diameters = np.array([[10.0, 12.0], [40.0, 30.0], [0.0, 47.0]]), np.array([8.0, 20.0, 12.0])   # one cut by the border
    micrograph = Micrograph(np.zeros((48, 64), np.float32), centres, 8.0, {}, diameters)
    rows, cols = np.indices((48, 64))
    inside = (np.hypot(cols[..., None] - centres[:, 0], rows[..., None] - centres[:, 1]) <= diameters / 2).any(axis=-1)
    oracle = oracle_probability_map(micrograph)
    assert oracle.dtype == np.float32 and np.array_equal(oracle, inside.astype(np.float32))
    assert oracle[30, 49] == 1 and oracle[30, 51] == 0                    # radius 10 around (40, 30), not 4


def test_micrograph_ctf_is_the_simulated_one():
    cfg = MicrographConfig(size_px=64, pixel_size_a=8.0, particle_types=("apoferritin",), type_proportions=(1.0,), particles_min=2,
                           particles_max=3, voltage_kv=200.0, cs_mm=2.0, amplitude_contrast=0.1, b_factor_a2=150.0)
    micrograph = simulate_micrograph(cfg, np.random.default_rng(3))
    meta = micrograph.metadata
    assert micrograph_ctf(micrograph, cfg) == CTFParams(meta["defocus_u_um"], meta["defocus_v_um"], meta["astigmatism_angle_deg"],
                                                        200.0, 2.0, 0.1, 150.0)


def test_template_bank_keeps_the_phase_centres_the_particle_and_is_seeded():
    apoferritin, ribosome = load_structure("apoferritin"), load_structure("ribosome")
    bank = template_bank([apoferritin, ribosome], PIXEL_A, n_orientations=3, seed=4)
    assert [s.shape[0] for s in bank] == [3, 3] and all(s.dtype == np.float32 for s in bank)
    assert bank[0].shape[-1] % 2 == 1 and apoferritin.diameter_a / PIXEL_A <= bank[0].shape[-1] < bank[1].shape[-1]
    total = interaction_constant(300.0) * POTENTIAL_PER_SCATTERING * CONTRAST_IN_ICE * apoferritin.scattering_a.sum() / PIXEL_A ** 2
    assert np.allclose(bank[0].sum(axis=(1, 2)), total, rtol=1e-4)
    shell = np.random.default_rng(0).normal(size=(50, 3)); shell *= 40 / np.linalg.norm(shell, axis=1, keepdims=True)
    marked = Structure("marked", np.vstack([np.zeros((1, 3)), shell]), np.r_[1000.0, np.ones(50)], np.zeros(51, int))
    for view in template_bank(marked, PIXEL_A, n_orientations=6)[0]:      # the heavy centre atom on the centre pixel
        assert np.unravel_index(view.argmax(), view.shape) == (view.shape[0] // 2, view.shape[1] // 2)
    assert np.array_equal(bank[0], template_bank(apoferritin, PIXEL_A, n_orientations=3, seed=4)[0])
    assert not np.allclose(bank[0], template_bank(apoferritin, PIXEL_A, n_orientations=3, seed=5)[0])


def test_matching_is_fast_enough_for_the_cpu_profile():
    "The cpu profile template-matches hundreds of 128^2 micrographs: well under 0.2 s each with 2 x 30 templates."
    bank = template_bank([load_structure("apoferritin"), load_structure("ribosome")], PIXEL_A, n_orientations=30, seed=0)
    image = np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32)
    seconds = []
    for _ in range(3):
        start = time.perf_counter(); template_match_map(image, bank, CTFParams(), PIXEL_A)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.5        # measured ~0.05 s on one core; the margin absorbs a busy machine


@pytest.mark.parametrize("call, message", [
    (lambda v: template_match_map(np.zeros((16, 16)), v, None, PIXEL_A), "larger than the image"),
    (lambda v: template_match_map(np.full((64, 64), np.nan), v, None, PIXEL_A), "finite"),
    (lambda v: template_match_map(np.zeros((64, 64)) + 1j, v, None, PIXEL_A), "real 2-D"),
    (lambda v: template_match_map(np.zeros(64), v, None, PIXEL_A), "real 2-D"),
    (lambda v: template_match_map(np.zeros((64, 64)), [], None, PIXEL_A), "empty bank"),
    (lambda v: template_match_map(np.zeros((64, 64)), v[:0], None, PIXEL_A), "empty bank"),
    (lambda v: template_match_map(np.zeros((64, 64)), v, None, -1.0), "pixel_size_a"),
    (lambda v: normalised_cross_correlation(np.zeros((64, 64)), v[:, :, :-1]), "square"),
    (lambda v: normalised_cross_correlation(np.zeros((64, 64)), np.ones((1, 9, 9))), "constant under the window"),
    (lambda v: normalised_cross_correlation(np.zeros((64, 64)), v, np.zeros(v.shape[1:], bool)), "window"),
    (lambda v: template_bank([], PIXEL_A), "structures"),
    (lambda v: template_bank(load_structure("apoferritin"), 0.0), "pixel_size_a"),
    (lambda v: template_bank(load_structure("apoferritin"), PIXEL_A, n_orientations=2.5), "n_orientations"),
    (lambda v: template_bank(load_structure("apoferritin"), PIXEL_A, box_factor=0.5), "box_factor"),
])
def test_bad_inputs_are_refused_with_the_argument_named(views, call, message):
    with pytest.raises(ValueError, match=message):
        call(views)
