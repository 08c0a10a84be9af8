"""MFN features against independent oracles: scipy.stats, scipy.ndimage, analytic fractal dimensions."""
import math

import numpy as np
import pytest
import scipy.stats
from scipy import ndimage

from conftest import volts
from project_lib.mfn.features import (FEATURE_NAMES, FeatureConfig, box_sizes, compute_basic_stats, compute_experimental_features,
                                      compute_features, compute_fractal_features, compute_structural_features, compute_temporal_features)


@pytest.mark.parametrize("draw", [
    lambda r: r.normal(-0.070, 0.010, (200, 200)),
    lambda r: r.gamma(1.5, 0.005, (128, 128)) - 0.09,
    lambda r: -r.lognormal(-3, 0.4, (64, 64)),
])
def test_moments_match_scipy(draw):
    field = draw(np.random.default_rng(7))
    mv = field * 1000
    got = compute_basic_stats(field)
    want = (mv.min(), mv.max(), mv.mean(), mv.std(), scipy.stats.skew(mv, axis=None), scipy.stats.kurtosis(mv, axis=None))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_constant_field_has_zero_skew_and_kurtosis():
    assert compute_basic_stats(np.full((32, 32), -0.07))[3:] == (0.0, 0.0, 0.0)


def _flood_fill_sizes(mask, connectivity):
    "Component sizes by breadth-first flood fill: an oracle independent of ndimage.label, which the implementation uses."
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else [])
    seen, sizes = np.zeros_like(mask, bool), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]: continue
        seen[start], queue, size = True, [start], 0
        while queue:
            r, c = queue.pop(); size += 1
            for dr, dc in steps:
                q = (r + dr, c + dc)
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                    seen[q] = True; queue.append(q)
        sizes.append(size)
    return np.array(sizes)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_clusters_match_a_flood_fill_oracle(connectivity):
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 2)
    field = -0.070 + smooth / smooth.std() * 0.012      # a field crossing -60/-50/-40 mV in blobs
    low = _flood_fill_sizes(field * 1000 > -60, connectivity)
    want = (float((field * 1000 > -60).mean()), len(low), len(_flood_fill_sizes(field * 1000 > -50, connectivity)),
            len(_flood_fill_sizes(field * 1000 > -40, connectivity)), low.max(), low.std())
    got = compute_structural_features(field, FeatureConfig(connectivity=connectivity))
    assert got[1:5] == want[1:5] and len(low) > 10
    assert got[0] == pytest.approx(want[0]) and got[5] == pytest.approx(want[5])


def test_cluster_counts_of_a_hand_built_field():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True          # a 2 x 2 block
    mask[5, 5:9] = True            # a bar of 4
    mask[8, 1] = mask[9, 2] = True # two cells touching only at a corner: 2 clusters (4-connected), 1 (8-connected)
    assert compute_structural_features(volts(mask))[1] == 4 and compute_structural_features(volts(mask))[4] == 4
    assert compute_structural_features(volts(mask), FeatureConfig(connectivity=8))[1] == 3


def test_diagonal_cells_are_not_4_connected():
    mask = np.eye(8, dtype=bool)
    assert compute_structural_features(volts(mask))[1] == 8
    assert compute_structural_features(volts(mask), FeatureConfig(connectivity=8))[1] == 1


def _sierpinski(n):
    i, j = np.indices((n, n))
    return (i & j) == j                                  # Pascal's triangle mod 2


@pytest.mark.parametrize("mask, dimension", [
    (np.zeros((1024, 1024), bool) | (np.arange(1024) == 300)[:, None], 1.0),   # a horizontal line
    (np.ones((1024, 1024), bool), 2.0),
    (_sierpinski(1024), math.log(3) / math.log(2)),
])
def test_box_dimension_of_known_sets(mask, dimension):
    d, r2 = compute_fractal_features(volts(mask))
    assert d == pytest.approx(dimension, abs=0.02)
    assert r2 > 0.99


@pytest.mark.parametrize("n", [64, 96, 128, 200, 256])
def test_box_and_information_dimensions_are_unbiased_on_the_study_grid_sizes(n):
    # whole boxes only: a filled square is exactly 2 and a line exactly 1 at every N (known answers), and the
    # Sierpinski triangle log 3 / log 2 exactly where N is a power of two; at 96 and 200 the truncated triangle is not
    # exactly self-similar, so only closeness is asked
    line = np.zeros((n, n), bool); line[n // 3] = True
    sierpinski, exact = _sierpinski(n), n & (n - 1) == 0
    for mask, dimension, tol in ((np.ones((n, n), bool), 2.0, 1e-9), (line, 1.0, 1e-9),
                                 (sierpinski, math.log(3) / math.log(2), 1e-9 if exact else 0.07)):
        assert compute_fractal_features(volts(mask))[0] == pytest.approx(dimension, abs=tol)
        assert compute_experimental_features(volts(mask))["D_information"] == pytest.approx(dimension, abs=tol)


def test_dropping_partial_boxes_biases_the_filled_square_above_two():
    # the upstream tiling, kept as an option: at 128 the sizes 5, 11, 27 do not divide the grid
    d, _ = compute_fractal_features(volts(np.ones((128, 128), bool)), FeatureConfig(box_tiling="drop_partial"))
    assert d == pytest.approx(2.034, abs=0.001)
    with pytest.raises(ValueError, match=r"grid_size 97 gives 0 box size\(s\)"):
        compute_fractal_features(volts(np.ones((97, 97), bool)))
    # 2 x prime and 5: two box sizes (R² is always 1) or none (the argmin of an empty sequence before): a named error
    for n, count in ((194, 2), (202, 2), (254, 2), (5, 0)):
        with pytest.raises(ValueError, match=rf"grid_size {n} gives {count} box size\(s\).*needs at least 3"):
            box_sizes(n)


def test_box_dimension_of_empty_field_is_zero():
    assert compute_fractal_features(volts(np.zeros((64, 64), bool))) == (0.0, 0.0)


def test_box_sizes_schema_vs_upstream():
    assert box_sizes(64).tolist() == [2, 4, 8, 16, 32]
    assert box_sizes(256, FeatureConfig.upstream_v41()).tolist() == [2, 4, 7, 16, 32]   # upstream truncation and cap
    assert box_sizes(256, FeatureConfig(box_tiling="drop_partial")).tolist() == [2, 6, 16, 45, 128]   # the schema's literal rule
    assert box_sizes(256).tolist() == [2, 4, 16, 32, 128]              # the nearest divisors (in log) of 256


def test_temporal_features_against_direct_numpy():
    history = -0.07 + np.cumsum(np.random.default_rng(2).normal(0, 2e-4, (40, 20, 20)), axis=0)
    mv = history * 1000
    diffs = np.abs(np.diff(mv, axis=0))
    dv_mean, dv_max, t_stable, e_trend = compute_temporal_features(history)
    assert dv_mean == pytest.approx(diffs.mean(), rel=1e-12)
    assert dv_max == pytest.approx(diffs.max(), rel=1e-12)
    assert t_stable == 40
    assert e_trend == pytest.approx(np.polyfit(np.arange(40), (mv ** 2).sum(axis=(1, 2)), 1)[0], rel=1e-8)


def test_single_frame_has_zero_temporal_features():
    assert compute_temporal_features(np.full((1, 8, 8), -0.07)) == (0.0, 0.0, 0, 0.0)


def test_feature_vector_order_and_dtypes():
    fv = compute_features(np.full((16, 16), -0.07))
    assert list(fv.to_dict()) == list(FEATURE_NAMES) and len(FEATURE_NAMES) == 18
    assert fv.to_array().dtype == np.float64
    assert isinstance(fv.N_clusters_low, int) and isinstance(fv.T_stable, int)


@pytest.mark.parametrize("bad, message", [
    (np.zeros(16), "ndim=1"),
    (np.zeros((2, 3, 4, 4)), "ndim=4"),
    (np.zeros((8, 9)), "square"),
    (np.where(np.eye(8), np.nan, -0.07), "NaN"),
    (np.full((8, 8), -70.0), "millivolts"),
    (np.array([["a"]]), "real numbers"),
])
def test_bad_inputs_give_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        compute_features(bad)


def test_unknown_feature_config_parameter():
    with pytest.raises(TypeError, match="bogus"):
        FeatureConfig(bogus=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"stability_window": 2.5}, "stability_window must be an integer"),   # accepted before: T_stable became the step count
    ({"num_scales": 2.5}, "num_scales must be an integer"),               # failed deep inside numpy before
    ({"max_box_size": 8.0}, "max_box_size must be an integer or None"),
    ({"threshold_low_mv": float("nan")}, "threshold_low_mv must be a finite number"),
    ({"min_box_size": 0}, "min_box_size must be >= 1"),
])
def test_feature_config_checks_its_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureConfig(**kwargs)


def test_box_size_errors_name_the_field_at_fault_and_configs_must_be_configs():
    with pytest.raises(ValueError, match="min_box_size 80 exceeds the grid size 64"):
        box_sizes(64, FeatureConfig(min_box_size=80))
    with pytest.raises(TypeError, match="config must be a FeatureConfig, got dict"):
        compute_features(np.full((16, 16), -0.07), {"connectivity": 8})


def test_compute_features_validates_its_input_once():
    from unittest import mock
    from project_lib.mfn import features
    field = np.random.default_rng(0).normal(-0.07, 0.01, (3, 16, 16))
    with mock.patch.object(features, "_as_field_array", wraps=features._as_field_array) as spy:
        compute_features(field)
    assert spy.call_count == 1
