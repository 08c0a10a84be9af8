"""MFN simulator: analytic properties of the scheme, Turing instability, online features, determinism."""
import dataclasses
import tracemalloc

import numpy as np
import pytest

from project_lib.mfn.dataset import clamp_effect
from project_lib.mfn.features import FEATURE_NAMES, compute_temporal_features
from project_lib.mfn.sim import (DYNAMICS, SimulationConfig, SimulationResult, _initial_state, jacobian, kinetics,
                                 max_growth_rate, reference_step, simulate)


def _pure_diffusion(alpha, steps=200, n=48, seed=0):
    """v41 dynamics with no spikes and no Turing layer is pure diffusion (no leak)."""
    frames = []
    cfg = SimulationConfig(grid_size=n, steps=steps, alpha=alpha, spike_probability=0.0, turing_enabled=False,
                           dynamics="v41", seed=seed)
    initial, _, _ = _initial_state(cfg, np.random.default_rng(seed), DYNAMICS["v41"])
    result = simulate(cfg, on_step=lambda t, v: frames.append(v.copy()))
    return initial, np.array(frames), result


@pytest.mark.parametrize("alpha", [0.05, 0.18, 0.25])
def test_pure_diffusion_conserves_the_field_sum(alpha):
    initial, frames, _ = _pure_diffusion(alpha)
    np.testing.assert_allclose(frames.sum(axis=(1, 2)), initial.sum(), rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 0.25])
def test_no_new_extrema_when_alpha_at_most_quarter(alpha):
    initial, frames, _ = _pure_diffusion(alpha)
    assert frames.max() <= initial.max() and frames.min() >= initial.min()
    assert np.all(np.diff(frames.max(axis=(1, 2))) <= 0) and np.all(np.diff(frames.min(axis=(1, 2))) >= 0)


def test_alpha_above_quarter_is_refused():
    with pytest.raises(ValueError, match="unstable"):
        SimulationConfig(alpha=0.2501)


@pytest.mark.parametrize("kwargs, message", [
    ({"grid_size": 3}, "grid_size"), ({"steps": 0}, "steps"), ({"alpha": -0.1}, "alpha"),
    ({"spike_probability": 1.5}, "spike_probability"), ({"dynamics": "gray-scott"}, "dynamics"),
    ({"seed": -1}, "seed"), ({"grid_size": 32.0}, "grid_size"),
])
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**kwargs)


def test_numpy_scalar_alphas_are_accepted_and_bad_types_refused_clearly():
    assert SimulationConfig(alpha=np.float32(0.1)).alpha == pytest.approx(0.1)
    with pytest.raises(ValueError, match="dynamics must be one of .* \\(a string\\)"):
        SimulationConfig(dynamics=["default"])
    with pytest.raises(TypeError, match="config must be a SimulationConfig, got dict"):
        simulate({"grid_size": 16})
    with pytest.raises(TypeError, match="feature_config must be a FeatureConfig, got dict"):
        simulate(SimulationConfig(grid_size=16, steps=2), {"connectivity": 8})


def test_unknown_simulation_parameter():
    with pytest.raises(TypeError, match="colour"):
        SimulationConfig(colour="red")


def test_default_dynamics_satisfy_the_turing_conditions():
    d = DYNAMICS["default"]
    J = jacobian(d)
    fa, gh, det = J[0, 0], J[1, 1], np.linalg.det(J)
    assert d.d_inhibitor > d.d_activator                      # inhibitor diffuses faster
    assert np.trace(J) < 0 and det > 0                        # stable without diffusion
    assert d.d_inhibitor * fa + d.d_activator * gh > 2 * np.sqrt(d.d_activator * d.d_inhibitor * det)   # Murray's condition
    assert max_growth_rate(d)[1] > 0                          # and a lattice mode really grows


def _finite_difference_jacobian(d, eps=1e-6):
    "Jacobian of the kinetics at the steady state by central differences of `kinetics` itself (not the analytic `jacobian`)."
    args = (True if d.kinetics == "cubic" else None, d.r_activator, d.r_inhibitor, d.inhibitor_gain, d.cubic, d.steady_state)
    s = d.steady_state
    f = lambda a, h: np.array(kinetics(a, h, *args))
    return np.column_stack([(f(s + eps, s) - f(s - eps, s)) / (2 * eps), (f(s, s + eps) - f(s, s - eps)) / (2 * eps)])


def test_turing_instability_and_wavelength_from_finite_differences_and_a_simulation():
    d = DYNAMICS["default"]
    J, D = _finite_difference_jacobian(d), np.diag([d.d_activator, d.d_inhibitor])
    assert np.trace(J) < 0 and np.linalg.det(J) > 0                                   # stable without diffusion
    assert d.d_inhibitor * J[0, 0] + d.d_activator * J[1, 1] > 2 * np.sqrt(d.d_activator * d.d_inhibitor * np.linalg.det(J))
    # linear prediction on the lattice: the wavenumber whose mode grows fastest (1-D lattice Laplacian 2 - 2 cos k)
    k = np.linspace(1e-3, np.pi, 4000)
    rates = np.array([np.linalg.eigvals(J - D * (2 - 2 * np.cos(q))).real.max() for q in k])
    predicted = 2 * np.pi / k[rates.argmax()]
    # the pattern a simulation grows: the peak of the activator's radially averaged power spectrum
    n = 64
    a = simulate(SimulationConfig(grid_size=n, steps=300, alpha=0.1, turing_enabled=True, seed=0)).activator
    power = np.abs(np.fft.fft2(a - a.mean())) ** 2
    m = np.fft.fftfreq(n) * n
    ring = np.rint(np.hypot(m[:, None], m[None, :])).astype(int).ravel()
    radial = np.bincount(ring, power.ravel()) / np.bincount(ring)
    measured = n / (radial[1:].argmax() + 1)
    assert rates.max() > 0 and measured == pytest.approx(predicted, rel=0.15), (measured, predicted)


def test_v41_dynamics_cannot_pattern():
    d = DYNAMICS["v41"]
    J = jacobian(d)
    assert np.linalg.det(J) == 0 and d.d_inhibitor < d.d_activator
    assert max_growth_rate(d)[1] <= 1e-12


def test_kernel_matches_plain_numpy_reference():
    for name, d in DYNAMICS.items():
        cfg = SimulationConfig(grid_size=20, steps=1, alpha=0.2, spike_probability=0.0, dynamics=name, seed=5)
        v, a, h = _initial_state(cfg, np.random.default_rng(5), d)
        want = reference_step(v, a, h, 0.2, d, True)
        got = simulate(cfg)
        np.testing.assert_allclose(got.field, want[0], rtol=0, atol=1e-15)
        np.testing.assert_allclose(got.activator, want[1], rtol=0, atol=1e-15)


def test_online_temporal_features_match_offline():
    frames = []
    cfg = SimulationConfig(grid_size=32, steps=120, alpha=0.15, seed=11)
    result = simulate(cfg, on_step=lambda t, v: frames.append(v.copy()))
    offline = compute_temporal_features(np.array(frames))
    np.testing.assert_allclose(result.temporal, offline, rtol=1e-10)
    mv = np.array(frames) * 1000                                # and against direct numpy
    assert result.temporal[0] == pytest.approx(np.abs(np.diff(mv, axis=0)).mean(), rel=1e-10)


def test_online_features_find_stability_like_offline():
    """No spikes: the field settles and T_stable is found, identically online and offline."""
    frames = []
    cfg = SimulationConfig(grid_size=16, steps=300, alpha=0.2, spike_probability=0.0, turing_enabled=False, dynamics="v41")
    result = simulate(cfg, on_step=lambda t, v: frames.append(v.copy()))
    offline = compute_temporal_features(np.array(frames))
    assert result.temporal[2] == offline[2] < 300


def test_memory_does_not_grow_with_steps():
    def peak(steps):
        tracemalloc.start()
        simulate(SimulationConfig(grid_size=128, steps=steps, seed=1))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top
    short, long = peak(20), peak(400)
    assert long < 1.2 * short + 100_000          # 20x the steps, same memory: no history is kept


def test_same_seed_same_result_and_turing_keeps_the_random_stream():
    a = simulate(SimulationConfig(grid_size=32, steps=80, seed=4))
    b = simulate(SimulationConfig(grid_size=32, steps=80, seed=4))
    off = simulate(SimulationConfig(grid_size=32, steps=80, seed=4, turing_enabled=False))
    np.testing.assert_array_equal(a.field, b.field)
    assert a.features().to_dict() == b.features().to_dict()
    assert a.growth_events == off.growth_events                # same spikes with Turing on and off
    assert not np.array_equal(a.field, off.field)              # but the Turing layer changes the field


def test_v41_turing_mode_changes_nothing():
    on = simulate(SimulationConfig(grid_size=32, steps=150, dynamics="v41", seed=2))
    off = simulate(SimulationConfig(grid_size=32, steps=150, dynamics="v41", seed=2, turing_enabled=False))
    np.testing.assert_array_equal(on.field, off.field)
    assert on.activator.max() < 0.75


def test_clamp_bounds_hold():
    r = simulate(SimulationConfig(grid_size=32, steps=300, alpha=0.05, spike_probability=1.0, seed=3))
    assert -0.095 <= r.field.min() and r.field.max() <= 0.040


def test_clamped_fraction_counts_cells_at_the_schema_clamp():
    field = np.full((4, 4), -0.070)
    field[0, :3] = -0.095                                               # 3 of 16 cells at the clamp
    result = SimulationResult(SimulationConfig(grid_size=4), field, field, field, (0.0, 0.0, 1, 0.0), 0)
    assert result.clamped_fraction == 3 / 16


def test_kernel_matches_reference_with_a_binding_floor():
    low = dataclasses.replace(DYNAMICS["default"], v_floor_v=-0.072)     # just below rest: it binds within a few steps
    cfg = SimulationConfig(grid_size=20, steps=1, alpha=0.2, spike_probability=0.0, seed=5)
    v, a, h = _initial_state(cfg, np.random.default_rng(5), low)
    want = reference_step(v, a, h, 0.2, low, True)[0]
    got = simulate(cfg, dynamics=low).field
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert got.min() == -0.072
    with pytest.raises(TypeError, match="dynamics must be a Dynamics"):
        simulate(cfg, dynamics="default")


def test_clamp_counterfactual_changes_only_what_the_clamp_touched():
    configs = [SimulationConfig(grid_size=32, steps=300, alpha=0.05, seed=2, turing_enabled=t) for t in (True, False)]
    same = clamp_effect(configs, floor_v=-0.095)                        # the schema's own clamp: nothing may change
    for name in FEATURE_NAMES:
        np.testing.assert_array_equal(same[name], same[f"{name} unclamped"])
    runs = clamp_effect(configs).set_index("turing_enabled")
    on, off = runs.loc[True], runs.loc[False]
    assert on.clamped_fraction > 0 and on.V_min == -95.0 and on["V_min unclamped"] < -95.0
    assert off.clamped_fraction == 0 and all(off[n] == off[f"{n} unclamped"] for n in FEATURE_NAMES)
    with pytest.raises(ValueError, match="floor_v"):
        clamp_effect(configs, floor_v=float("nan"))
