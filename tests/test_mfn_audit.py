"""MFN descriptor audit (issue 23): the cluster features' normalisation is grid-invariant on fields whose pattern does not
depend on the grid (fixed spots), where dividing the largest cluster by N² is not; the study's units and its audit on the
tiny profile's simulations."""
import numpy as np
import pandas as pd
import pytest

import project_lib  # noqa: F401  (portable numerics first)
from project_lib.core import load_study_params
from project_lib.mfn.analysis import EXTENSIVE_FEATURES, per_cell
from project_lib.mfn.features import compute_structural_features
from project_lib.mfn.sim import SimulationConfig, simulate
from project_lib.mfn.stage import MFNStudyParams

STRUCTURAL = ("f_active", "N_clusters_low", "N_clusters_med", "N_clusters_high", "max_cluster_size", "cluster_size_std")


def spots(n: int, spacing: int = 16) -> np.ndarray:
    """A -70 mV field (volts) with discs at 0 mV on a lattice of `spacing` cells, radii 3 and 4 alternating like a
    chessboard: the same pattern, and the same share of each disc, at every grid size that is a multiple of 2 x spacing."""
    v = np.full((n, n), -0.070)
    yy, xx = np.mgrid[0:n, 0:n]
    for i in range(n // spacing):
        for j in range(n // spacing):
            r = 3 if (i + j) % 2 else 4
            v[(yy - spacing * i - spacing // 2) ** 2 + (xx - spacing * j - spacing // 2) ** 2 <= r * r] = 0.0
    return v


def test_cluster_features_per_cell_are_grid_invariant_on_a_fixed_pattern():
    rows = [{"grid_size": n, "E_trend": 0.0, **dict(zip(STRUCTURAL, compute_structural_features(spots(n))))} for n in (64, 128, 256)]
    raw = pd.DataFrame(rows)
    norm = per_cell(raw)
    for f in STRUCTURAL:
        assert np.ptp(norm[f].to_numpy(float)) < 1e-12, (f, norm[f].tolist())
    # a disc of radius 4 holds 49 cells, radius 3 holds 29: the largest cluster and the spread stay in cells
    assert norm.max_cluster_size.tolist() == [49, 49, 49]
    assert np.allclose(norm.cluster_size_std, 10.0)
    # the old normalisation (the largest cluster per cell) moved 16x from 64² to 256² on the very same pattern
    assert (raw.max_cluster_size / raw.grid_size ** 2).iloc[0] / (raw.max_cluster_size / raw.grid_size ** 2).iloc[-1] == pytest.approx(16)
    assert "max_cluster_size" not in EXTENSIVE_FEATURES and "cluster_size_std" not in EXTENSIVE_FEATURES


def test_the_diffusion_ratio_changes_the_pattern_and_only_the_turing_layer():
    """Below the Turing threshold (D_h / D_a about 2.5 for `default`) the activator stays flat; above it a pattern forms,
    with a longer wavelength for a larger ratio (linear stability: wavelength grows as (D_a D_h)^(1/4))."""
    runs = {r: simulate(SimulationConfig(grid_size=64, steps=600, seed=3, diffusion_ratio=r)) for r in (2.0, 6.0)}
    assert runs[2.0].activator.std() < 0.02 < runs[6.0].activator.std()
    off = {r: simulate(SimulationConfig(grid_size=32, steps=50, seed=3, diffusion_ratio=r, turing_enabled=False)).field for r in (2.0, 6.0)}
    assert np.array_equal(off[2.0], off[6.0])      # with the Turing layer off the ratio changes nothing


def test_study_parameters_refuse_a_growth_sweep_without_t_and_2t():
    p = load_study_params("mfn", MFNStudyParams, "cpu")
    assert p.steps_t == 300 and {300, 600} <= set(p.growth_steps)
    with pytest.raises(ValueError, match="growth_steps must include T = 300"):
        MFNStudyParams(**{**p.__dict__, "growth_steps": [150, 300]})
