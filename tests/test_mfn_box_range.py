"""Box counting at a physical scale: with a fixed box range in cells (`FeatureConfig(max_box_size=32)`: boxes of 2-32
cells), D_box of the same kind of pattern is the same at N = 64, 128 and 256, where the schema's N/2 rule moves with the
grid; a grid size that leaves fewer than three box sizes is an error naming the option."""
import numpy as np
import pytest
from scipy import ndimage

from project_lib.mfn.features import FeatureConfig, box_sizes, compute_fractal_features
from project_lib.mfn.sim import SimulationConfig, simulate

FIXED = FeatureConfig(max_box_size=32)
SIZES = (64, 128, 256)


def thresholded_grf(n, seed, correlation_cells=2.0, level_sd=1.0):
    """A periodic Gaussian random field of a fixed correlation length in cells, active (0 mV) above `level_sd`, else -70 mV (volts)."""
    z = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((n, n)), correlation_cells, mode="wrap")
    return np.where(z / z.std() > level_sd, 0.0, -0.07)


def test_a_gaussian_random_field_has_one_dimension_at_every_grid_size():
    # the same area at every N (8 fields of 256², 32 of 128², 128 of 64²), so that sampling noise is alike
    means = [np.mean([compute_fractal_features(thresholded_grf(n, 1000 * n + s), FIXED)[0] for s in range(8 * (256 // n) ** 2)]) for n in SIZES]
    assert np.ptp(means) < 0.01, means          # measured 1.450, 1.453, 1.447


def test_a_turing_pattern_has_one_dimension_at_every_grid_size_with_a_fixed_box_range():
    fields = [simulate(SimulationConfig(grid_size=n, steps=600, alpha=0.1, seed=0)).field for n in SIZES]
    fixed = [compute_fractal_features(f, FIXED)[0] for f in fields]
    half_grid = [compute_fractal_features(f)[0] for f in fields]
    assert np.ptp(fixed) < 0.01, fixed           # measured 1.771, 1.772, 1.769
    assert np.ptp(half_grid) > 3 * np.ptp(fixed), (half_grid, fixed)


@pytest.mark.parametrize("n", [5, 194, 202, 254])   # no divisor at all; 2 x a prime: boxes 2 and N/2 only
def test_too_few_box_sizes_is_an_error_naming_the_option(n):
    with pytest.raises(ValueError, match="needs at least 3.*max_box_size"):
        box_sizes(n)


def test_the_fixed_range_spans_the_same_cells_at_every_grid_size():
    assert {tuple(box_sizes(n, FIXED).tolist()) for n in SIZES} == {(2, 4, 8, 16, 32)}
