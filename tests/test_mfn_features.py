"""MFN features against independent oracles: scipy.stats, scipy.ndimage, analytic fractal dimensions."""
import math

import numpy as np
import pytest
import scipy.stats
from scipy import ndimage

from conftest import volts
from project_lib.mfn.features import (FEATURE_NAMES, FeatureConfig, box_sizes, compute_basic_stats, compute_features,
                                      compute_fractal_features, compute_structural_features, compute_temporal_features)


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


@pytest.mark.parametrize("connectivity", [4, 8])
def test_clusters_match_ndimage_label(connectivity):
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.normal(size=(256, 256)), 2)
    field = -0.070 + smooth / smooth.std() * 0.012      # a field crossing -60/-50/-40 mV in blobs
    cfg = FeatureConfig(connectivity=connectivity)
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n_low = ndimage.label(field * 1000 > -60, structure)
    sizes = np.array([(labels == k).sum() for k in range(1, n_low + 1)])
    want = (float((field * 1000 > -60).mean()), n_low, ndimage.label(field * 1000 > -50, structure)[1],
            ndimage.label(field * 1000 > -40, structure)[1], sizes.max(), sizes.std())
    got = compute_structural_features(field, cfg)
    assert got[1:5] == want[1:5] and n_low > 10
    assert got[0] == pytest.approx(want[0]) and got[5] == pytest.approx(want[5])


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


def test_box_dimension_of_empty_field_is_zero():
    assert compute_fractal_features(volts(np.zeros((64, 64), bool))) == (0.0, 0.0)


def test_box_sizes_schema_vs_upstream():
    assert box_sizes(64).tolist() == [2, 4, 8, 16, 32]
    assert box_sizes(256, FeatureConfig.upstream_v41()).tolist() == [2, 4, 7, 16, 32]   # upstream truncation and cap
    assert box_sizes(256).tolist() == [2, 6, 16, 45, 128]


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
