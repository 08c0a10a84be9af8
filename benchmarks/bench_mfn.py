"""MFN performance on this machine, in one run: simulator step, 18 features, 1000-step run with online features.

Each variant is compared with the obvious plain-numpy implementation of the same computation (the simulator's
`reference_step`, and the feature reference below, written the way the upstream v4.1 code does it).
Timings are best-of-N wall clock. Run: `.venv/bin/python benchmarks/bench_mfn.py [--quick]`.
"""
import argparse
import json
import subprocess
import sys
import time

import numba
import numpy as np
from scipy import ndimage

from timing import best_of
from project_lib.mfn.features import FeatureConfig, box_sizes, compute_features
from project_lib.mfn.sim import DYNAMICS, SimulationConfig, _initial_state, _pack, _step_kernel, _switch, reference_step, simulate


# --- the plain reference of the 18 static features (numpy, and the upstream pure-Python union-find) --------------
def reference_box_dimension(field, config):
    mask = field > config.threshold_low_mv / 1000
    n = mask.shape[0]
    sizes = box_sizes(n, config)
    counts = np.array([mask[:n // s * s, :n // s * s].reshape(n // s, s, n // s, s).any(axis=(1, 3)).sum() for s in sizes])
    keep = counts > 0
    x, y = np.log(1.0 / sizes[keep]), np.log(counts[keep])
    slope, intercept = np.polyfit(x, y, 1)
    return slope, 1 - ((y - slope * x - intercept) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def reference_stats(field):
    mv = field * 1000.0
    mean, std = mv.mean(), mv.std()
    return mv.min(), mv.max(), mean, std, ((mv - mean) ** 3).mean() / std ** 3, ((mv - mean) ** 4).mean() / std ** 4 - 3


def union_find_clusters(mask):
    """4-connected components with a pure-Python union-find (the upstream approach)."""
    parent = {}
    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    rows, cols = np.nonzero(mask)
    for cell in zip(rows.tolist(), cols.tolist()):
        parent[cell] = cell
    for r, c in list(parent):
        for nb in ((r + 1, c), (r, c + 1)):
            if nb in parent:
                a, b = find((r, c)), find(nb)
                if a != b: parent[a] = b
    roots = [find(x) for x in parent]
    return np.unique(roots, axis=0, return_counts=True)[1] if roots else np.zeros(0, int)


def reference_structural(field, config, labeller):
    low = field > config.threshold_low_mv / 1000
    sizes = labeller(low)
    counts = [len(sizes)] + [len(labeller(field > t / 1000)) for t in (config.threshold_med_mv, config.threshold_high_mv)]
    return low.mean(), *counts, sizes.max() if len(sizes) else 0, sizes.std() if len(sizes) > 1 else 0.0


def ndimage_sizes(mask):
    labels, n = ndimage.label(mask)
    return np.bincount(labels.ravel())[1:] if n else np.zeros(0, int)


def reference_features(field, config, labeller):
    return (*reference_box_dimension(field, config), *reference_stats(field), *reference_structural(field, config, labeller))


# --- sections ------------------------------------------------------------------------------------------------------
def bench_step(n, repeats, steps=20):
    rows = []
    rng = np.random.default_rng(0)
    for label, dynamics, turing in (("full step (default dynamics, Turing on)", "default", True),
                                    ("diffusion only (v41, Turing off)", "v41", False)):
        d = DYNAMICS[dynamics]
        cfg = SimulationConfig(grid_size=n, dynamics=dynamics, turing_enabled=turing)
        v, a, h = _initial_state(cfg, rng, d)
        t_ref = best_of(lambda: reference_step(v, a, h, 0.18, d, turing), repeats)
        out = [np.empty_like(v), a.copy(), h.copy()]
        stats = np.empty((n, 4))
        switches = (_switch(turing), _switch(d.kinetics == "cubic"), _switch(d.coupling == "threshold"))
        kernel = lambda: [_step_kernel(v, a, h, *out, _pack(0.18, d), stats, *switches) for _ in range(steps)]
        kernel()
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            t = best_of(kernel, repeats) / steps
            rows.append((label, f"{n}²", "numpy reference", 1, t_ref, n * n / t_ref / 1e6))
            rows.append((label, f"{n}²", "numba kernel + online stats", threads, t, n * n / t / 1e6))
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    print(f"\n### Simulation step, {n}² (best of {repeats})\n")
    print("| step | grid | implementation | threads | ms/step | M cell-updates/s |\n|---|---|---|---|---|---|")
    for label, grid, impl, threads, t, rate in dict.fromkeys(rows):
        print(f"| {label} | {grid} | {impl} | {threads} | {t * 1e3:.2f} | {rate:.0f} |")


def bench_features(n, repeats, with_union_find):
    field = simulate(SimulationConfig(grid_size=n, steps=300, alpha=0.1, seed=0)).field   # a patterned field
    cfg = FeatureConfig()
    ours = compute_features(field, cfg).to_dict()
    ref = reference_features(field, cfg, ndimage_sizes)
    static = [k for k in ours if k not in ("dV_mean", "dV_max", "T_stable", "E_trend")]
    np.testing.assert_allclose([ours[k] for k in static], ref, rtol=1e-9)          # same values, checked
    print(f"\n### All 18 features of one {n}² field (best of {repeats}; values checked equal)\n")
    print("| implementation | ms |\n|---|---|")
    if with_union_find:
        print(f"| numpy + pure-Python union-find (upstream style) | {best_of(lambda: reference_features(field, cfg, union_find_clusters), 1) * 1e3:.0f} |")
    print(f"| numpy + scipy.ndimage.label | {best_of(lambda: reference_features(field, cfg, ndimage_sizes), repeats) * 1e3:.1f} |")
    print(f"| project_lib (numba box count and moments + scipy.ndimage.label) | {best_of(lambda: compute_features(field, cfg), repeats) * 1e3:.1f} |")


_LONG_RUN = """
import json, time, tracemalloc
from pathlib import Path
def peak_rss_kb():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])
Path("/proc/self/clear_refs").write_text("5")                     # the high-water mark inherited through fork
from project_lib.mfn.sim import SimulationConfig, simulate
simulate(SimulationConfig(grid_size=64, steps=2))                  # compile (cached) outside the timing
rss0 = peak_rss_kb()
tracemalloc.start()
t0 = time.perf_counter()
r = simulate(SimulationConfig(grid_size={n}, steps={steps}, seed=0))
f = r.features()
wall = time.perf_counter() - t0
peak_traced = tracemalloc.get_traced_memory()[1]
print(json.dumps(dict(wall=wall, rss0=rss0, rss=peak_rss_kb(), traced=peak_traced)))
"""


def bench_long_run(n, steps):
    result = subprocess.run([sys.executable, "-c", _LONG_RUN.format(n=n, steps=steps)], capture_output=True, text=True, check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    history_gb = n * n * steps * 8 / 1e9
    print(f"\n### {n}² × {steps} steps with online temporal features, then all 18 features\n")
    print("| quantity | value |\n|---|---|")
    print(f"| wall time | {m['wall']:.2f} s ({n * n * steps / m['wall'] / 1e6:.0f} M cell-updates/s) |")
    print(f"| peak RSS of the process (python, numpy, numba included) | {m['rss'] / 1024:.0f} MB |")
    print(f"| peak RSS before the run (imports, JIT) | {m['rss0'] / 1024:.0f} MB |")
    print(f"| peak memory allocated by the run (tracemalloc) | {m['traced'] / 1e6:.0f} MB |")
    print(f"| history that an offline computation would hold | {history_gb:.1f} GB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    n, repeats = (256, 3) if args.quick else (1024, 5)
    print(f"numba threads: {numba.config.NUMBA_NUM_THREADS}, numpy {np.__version__}, numba {numba.__version__}")
    bench_step(n, repeats)
    if not args.quick: bench_step(2048, 3)
    bench_features(n, repeats * 2, with_union_find=True)
    bench_long_run(n, 100 if args.quick else 1000)
