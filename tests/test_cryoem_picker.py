"""The picker gives one pick per particle whatever the sharpness of the map (independent oracles: the true mask,
hand-built maps, and monotone rescaling of logits, which must not change what a re-selected threshold achieves)."""
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from project_lib.cryoem.data import MicrographConfig, edge_particles, simulate_micrograph
from project_lib.cryoem.metrics import extract_picks, particle_metrics


@pytest.fixture(scope="module")
def micrographs():
    cfg = MicrographConfig(size_px=128, pixel_size_a=8.0, particles_min=8, particles_max=16, clustered_fraction=0.5, min_separation=1.0)
    return [simulate_micrograph(cfg, np.random.default_rng(100 + i)) for i in range(24)]


def _truth(mics):
    return pd.concat([pd.DataFrame(m.centres, columns=["x", "y"]).assign(image=i, radius=m.diameters_px / 2) for i, m in enumerate(mics)])


def _picks(maps, mics):
    return pd.concat([extract_picks(p, m.diameter_px).assign(image=i) for i, (p, m) in enumerate(zip(maps, mics))])


def test_true_mask_as_probabilities_scores_f1_at_least_099_edge_particles_included(micrographs):
    maps = [m.mask.astype(float) for m in micrographs]
    truth = _truth(micrographs)
    assert sum(edge_particles(m).sum() for m in micrographs) >= 5                  # the set really has particles cut by the border
    assert particle_metrics(_picks(maps, micrographs), truth, 0.0, 0.5)["f1"] >= 0.99
    edge_truth = pd.concat([pd.DataFrame(m.centres[edge_particles(m)], columns=["x", "y"]).assign(image=i, radius=m.diameters_px[edge_particles(m)] / 2)
                            for i, m in enumerate(micrographs)])
    assert particle_metrics(_picks(maps, micrographs), edge_truth, 0.0, 0.5)["recall"] == 1.0


def _centre_peaks(m, width):
    "A map with a Gaussian peak of sigma = diameter x `width` at each true centre (1.0 at the centre)."
    rows, cols = np.indices(m.mask.shape)
    return np.max([np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * (d * width) ** 2)) for (x, y), d in zip(m.centres, m.diameters_px)]
                  + [np.zeros(m.mask.shape)], axis=0)


@pytest.mark.parametrize("name, make", [("true mask blurred, sigma 2 px", lambda m: ndimage.gaussian_filter(m.mask.astype(float), 2)),
                                        ("Gaussian peaks at the true centres, sigma d/4", lambda m: _centre_peaks(m, 1 / 4)),
                                        ("Gaussian peaks at the true centres, sigma d/8", lambda m: _centre_peaks(m, 1 / 8))])
def test_soft_oracle_maps_score_f1_at_least_098(micrographs, name, make):
    """Maps that locate every particle exactly but are not masks: the picker must not lose particles to localisation or to pruning
    by weak blobs (the second-round picker: 0.96 on both kinds)."""
    maps, truth = [make(m) for m in micrographs], _truth(micrographs)
    picks = _picks(maps, micrographs)
    assert particle_metrics(picks, truth, 0.0, _best_threshold(picks, truth), with_auprc=False)["f1"] >= 0.98, name


def _network_like_logits(m, rng):
    """A map a trained network could give: soft particle blobs and smooth false-positive texture, logits within ±3.4 so that x10
    stays below logit 34.5, what float64 probabilities resolve (beyond it the map itself, not the picker, loses information)."""
    soft = ndimage.gaussian_filter(m.mask.astype(float), 1.5)
    clutter = ndimage.gaussian_filter(rng.normal(size=m.image.shape), 2.5)
    return np.clip(2.4 * (soft - 0.5) + 6 * clutter, -3.4, 3.4)


def _best_threshold(picks, truth):
    "Threshold maximising F1, searched over the quantiles of the scores the picks actually take."
    scores = np.sort(picks.score.to_numpy())
    candidates = np.unique(scores[np.linspace(0, len(scores) - 1, 60).astype(int)])
    f1 = [particle_metrics(picks, truth, 0.0, t, with_auprc=False)["f1"] for t in candidates]
    return candidates[int(np.argmax(f1))]


def test_f1_after_reselecting_the_threshold_does_not_depend_on_logit_scale(micrographs):
    rng = np.random.default_rng(0)
    logits = [_network_like_logits(m, rng) for m in micrographs]
    val, test = slice(0, 12), slice(12, 24)
    f1 = {}
    for scale in (1, 3, 10):
        maps = [1 / (1 + np.exp(-scale * z)) for z in logits]       # float64: saturates only beyond logit 36
        vm, tm = micrographs[val], micrographs[test]
        threshold = _best_threshold(_picks(maps[val], vm), _truth(vm))
        f1[scale] = particle_metrics(_picks(maps[test], tm), _truth(tm), 0.0, threshold, with_auprc=False)["f1"]
    assert 0.5 < f1[1] < 0.99                                            # a map that is neither useless nor perfect
    assert abs(f1[3] - f1[1]) < 0.01 and abs(f1[10] - f1[1]) < 0.01, f1


def test_a_plateau_gives_one_pick_and_touching_particles_two():
    flat = np.zeros((80, 80)); flat[30:45, 20:41] = 1.0                 # a 15 x 21 saturated plateau
    picks = extract_picks(flat, 16)
    assert len(picks) == 1 and picks.x[0] == pytest.approx(30.0) and picks.y[0] == pytest.approx(37.0)
    rows, cols = np.indices((80, 80))
    touching = ((cols - 32) ** 2 + (rows - 40) ** 2 <= 64) | ((cols - 48) ** 2 + (rows - 40) ** 2 <= 64)
    assert np.allclose(sorted(extract_picks(touching.astype(float), 16).x), [32.0, 48.0], atol=1.5)
