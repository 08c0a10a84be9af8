"""Deepfake cascade: images per second (inference and training steps) and GMAC per image of every network of the cpu
and paper profiles' families, on this CPU; and the cascade's throughput against always running the experts, at the
routed fraction the cpu profile's band chose (read from outputs/cpu/cascade/metrics.json when it exists) and at a
few other routed fractions.

Throughput does not depend on the images' content, so inputs are random uint8 images and the networks freshly
initialised. Run: `.venv/bin/python benchmarks/bench_cascade.py [--quick] [--threads N] [--batch N]` (`--threads 1 --batch 32`: as the
cpu profile's detectors train).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from project_lib.cascade.models import build_model, detector_loss
from project_lib.cascade.stack import channels_last_input, gmac_per_image, to_input
from project_lib.cascade.units import CascadeParams
from project_lib.core import load_study_params
from timing import best_of


def images(n, px):
    return np.random.default_rng(0).integers(0, 256, (n, px, px, 3)).astype(np.uint8)


def infer_rate(model, batch, repeats):
    x = to_input(batch)
    model.eval()
    with torch.no_grad():
        model(x)
        return len(batch) / best_of(lambda: model(x), repeats)


def train_rate(model, batch, repeats, channels_last=False):
    """Training images/s; channels_last: the model and its input in channels-last memory, as `stack.train_detector` trains them."""
    if channels_last: model = model.to(memory_format=torch.channels_last)
    x = channels_last_input(batch) if channels_last else to_input(batch)
    y = torch.tensor(np.arange(len(batch)) % 2, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    model.train()
    def step():
        loss = detector_loss(model(x), x, y); opt.zero_grad(); loss.backward(); opt.step()
    step()
    return len(batch) / best_of(step, repeats)


def model_table(profile, repeats, batch_size, with_training):
    p = load_study_params("cascade", CascadeParams, profile)
    batch = images(batch_size, p.px)
    rows = {}
    for role in ("filter", *p.experts):
        torch.manual_seed(0)
        model = build_model(p.model_config(role))
        rows[role] = {"arch": p.models[role]["arch"], "params_M": sum(t.numel() for t in model.parameters()) / 1e6,
                      "gmac": gmac_per_image(model, p.px), "infer": infer_rate(model, batch, repeats),
                      "train": train_rate(model, batch, repeats) if with_training else float("nan"),
                      "train_cl": train_rate(build_model(p.model_config(role)), batch, repeats, True) if with_training else float("nan")}
    print(f"\n## Networks of the `{profile}` profile at {p.px} px (batch {batch_size}, {torch.get_num_threads()} threads, best of {repeats})\n")
    print("| role | timm architecture | parameters (M) | GMAC / image | inference images/s | training images/s | training, channels-last | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for role, r in rows.items():
        print(f"| {role} | {r['arch']} | {r['params_M']:.2f} | {r['gmac']:.4f} | {r['infer']:.0f} | {r['train']:.0f} | {r['train_cl']:.0f} | {r['train_cl'] / r['train']:.2f}x |")
    return p, rows


def cascade_table(rows, fractions, chosen):
    """Images/s of the filter on every image plus the experts on the routed share (the meta-model's time is negligible)."""
    experts = [r for r in rows if r != "filter"]
    filter_s = 1 / rows["filter"]["infer"]
    experts_s = sum(1 / rows[e]["infer"] for e in experts)
    experts_gmac = sum(rows[e]["gmac"] for e in experts)
    print("\n## Cascade throughput against always running the experts (filter on every image, experts on the routed share)\n")
    print("| pipeline | routed fraction | GMAC / image | images/s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| always experts | 1.00 | {experts_gmac:.4f} | {1 / experts_s:.0f} | 1.0x |")
    for f in fractions:
        s = filter_s + f * experts_s
        tag = " (band chosen by the cpu profile)" if chosen is not None and np.isclose(f, round(chosen, 3)) else ""
        print(f"| cascade{tag} | {f:.2f} | {rows['filter']['gmac'] + f * experts_gmac:.4f} | {1 / s:.0f} | {experts_s / s:.1f}x |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no paper-profile networks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="images per step (the cpu profile trains 32 per step on one thread per worker)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 3
    _, cpu_rows = model_table("cpu", repeats, args.batch, with_training=True)
    metrics = Path("outputs/cpu/cascade/metrics.json")
    chosen = json.loads(metrics.read_text())["routed_fraction"] if metrics.exists() else None
    cascade_table(cpu_rows, sorted({0.1, 0.3, 0.5} | ({round(chosen, 3)} if chosen is not None else set())), chosen)
    if not args.quick:
        model_table("paper", 1, 8, with_training=False)
