"""Cryo-EM active learning: time and peak memory of one acquisition step per strategy against the pool size, on one CPU
thread, and both extrapolated to the seed's 5,172-micrograph pool; k-center greedy (running minimum, O(N) extra memory)
against scikit-activeml's implementation and against the full N x N distance matrix of the DeepAL reference; and one
forward pass at the paper's scale (768² px, full width) to carry the per-micrograph cost over.

Acquisition time does not depend on the images' content, so the pools are noise images and the network is freshly
initialised (the cpu profile's architecture). Run: `.venv/bin/python benchmarks/bench_cryoem_al.py [--quick]`.
"""
import argparse
import time

import numpy as np
import torch
from scipy.spatial.distance import cdist
from skactiveml.pool._core_set import k_greedy_center

from project_lib.core import load_study_params
from project_lib.cryoem.active import STRATEGIES, acquire, k_center_greedy, measure
from project_lib.cryoem.al import ALStudyParams
from project_lib.cryoem.data import Micrograph
from project_lib.cryoem.train import TrainConfig, build_model

PAPER_POOL = 5172


def noise_pool(n, size):
    rng = np.random.default_rng(0)
    return [Micrograph(rng.normal(size=(size, size)).astype(np.float32), np.zeros((0, 2)), 10.0, {}) for _ in range(n)]


def acquisition_table(p, sizes):
    torch.manual_seed(0)
    model = build_model(p.train_config(0)).eval()
    rows = []
    for n in sizes:
        pool = noise_pool(n, p.micrograph["size_px"])
        labelled, q = list(range(max(1, n // 10))), max(1, n // 10)
        for strategy in STRATEGIES:
            _, seconds, mb = measure(acquire, strategy, model, pool, labelled, q, np.random.default_rng(0), p.settings())
            rows.append((strategy, n, seconds, mb))
    print(f"\n## Acquisition step per strategy (query 10 % of the pool, {p.micrograph['size_px']}² px, width {p.training['width']}, 1 thread)\n")
    print("| strategy | " + " | ".join(f"N={n}: s / MB" for n in sizes) + f" | s at N={PAPER_POOL} (linear fit) |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for strategy in STRATEGIES:
        r = [x for x in rows if x[0] == strategy]
        slope, intercept = np.polyfit([x[1] for x in r], [x[2] for x in r], 1)
        print(f"| {strategy} | " + " | ".join(f"{s:.3f} / {mb:.0f}" for _, _, s, mb in r) + f" | {max(0.0, intercept + slope * PAPER_POOL):.1f} |")


def k_center_table(sizes, dim=1024):
    print(f"\n## k-center greedy on {dim}-D embeddings (10 % labelled, query 10 %)\n")
    print("| N | ours: s / MB | scikit-activeml: s / MB | full N x N matrix (DeepAL): s / MB | same picks | covering radius, ours / scikit-activeml |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        x = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
        labelled, k = np.arange(n // 10), n // 10
        candidates = np.arange(n // 10, n)
        ours, s1, m1 = measure(k_center_greedy, x, labelled, candidates, k)
        y = np.full(n, np.nan); y[labelled] = 0
        ref, s2, m2 = measure(lambda: k_greedy_center(x, y, batch_size=k)[0].tolist())

        def full_matrix():
            d = cdist(x, x)
            nearest, chosen = d[:, labelled].min(axis=1), []
            for _ in range(k):
                j = int(np.argmax(nearest)); chosen.append(j); nearest = np.minimum(nearest, d[:, j])
            return chosen
        _, s3, m3 = measure(full_matrix)
        radius = lambda picks: float(cdist(x[candidates].astype(np.float64), x[np.r_[labelled, picks]].astype(np.float64)).min(axis=1).max())
        print(f"| {n} | {s1:.3f} / {m1:.0f} | {s2:.3f} / {m2:.0f} | {s3:.3f} / {m3:.0f} | {ours == ref} | {radius(ours) / radius(ref):.6f} |")


def paper_forward(repeats):
    config = TrainConfig(model="attention_unet", width=1.0, dropout=0.2)
    model = build_model(config).eval()
    x = torch.randn(1, 1, 768, 768).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        for _ in range(repeats): model(x)
    per = (time.perf_counter() - t0) / repeats
    print(f"\n## Paper scale: one 768² micrograph through the full-width Attention U-Net on {torch.get_num_threads()} CPU thread(s)\n")
    print(f"{per:.2f} s per micrograph: a pool scan of {PAPER_POOL} micrographs ≈ {per * PAPER_POOL / 60:.0f} min; BALD with 10 MC passes ≈ "
          f"{10 * per * PAPER_POOL / 3600:.1f} h on this CPU (the paper profile runs on a GPU).")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small pools and no paper-scale pass: a smoke check")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_study_params("cryoem_al", ALStudyParams, "cpu")
    acquisition_table(p, [20, 40] if args.quick else [40, 80, 160, 320])
    k_center_table([200, 400] if args.quick else [500, 1000, 2000, PAPER_POOL])
    if not args.quick: paper_forward(2)
