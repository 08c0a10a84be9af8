"""Cryo-EM performance on this machine, in one run: simulator, training throughput, inference, peak memory,
and the measured effect of the training-speed changes (pre-stacked batches vs a DataLoader; channels_last).

Run: `.venv/bin/python benchmarks/bench_cryoem.py [--quick]`. Sizes follow the cpu profile of params.yaml.
"""
import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from project_lib.core import load_study_params
from project_lib.cryoem.compare import CryoEMStudyParams
from project_lib.cryoem.data import MicrographConfig, read_pdb_atoms, simulate_micrograph
from project_lib.cryoem.train import _stack, build_model, focal_dice_loss, predict, select_threshold, simulate_dataset


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)


class _MicrographDataset(Dataset):
    """The per-item route: one micrograph -> (image, mask) tensors, collated by a DataLoader."""
    def __init__(self, mics): self.mics = mics
    def __len__(self): return len(self.mics)
    def __getitem__(self, i):
        m = self.mics[i]
        return torch.from_numpy(m.image)[None], torch.from_numpy(m.mask.astype(np.float32))[None]


def train_epoch(model, batches, tc, opt):
    model.train()
    for xb, yb in batches:
        loss = focal_dice_loss(model(xb), yb, tc)
        opt.zero_grad(); loss.backward(); opt.step()


def bench_training(p, mics, repeats):
    print("\n### Training throughput (one epoch, cpu-profile size; best of %d)\n" % repeats)
    print("| model | batches | memory format | images/s |\n|---|---|---|---|")
    x, y = _stack(mics)
    n, bs = len(mics), p.batch_size
    stacked = lambda: [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    loader = lambda: DataLoader(_MicrographDataset(mics), batch_size=bs, shuffle=False)
    for model_name in ("unet", "attention_unet"):
        tc = p.train_config(model_name, 0)
        for batches, label in ((loader, "DataLoader, per-item (before)"), (stacked, "pre-stacked tensors (engine)")):
            for channels_last in (False, True):
                torch.manual_seed(0)
                model = build_model(tc)
                if channels_last: model = model.to(memory_format=torch.channels_last)
                opt = torch.optim.Adam(model.parameters(), tc.lr)
                fmt = (lambda b: [(xb.contiguous(memory_format=torch.channels_last), yb) for xb, yb in b]) if channels_last else (lambda b: b)
                t = best_of(lambda: train_epoch(model, fmt(list(batches())), tc, opt), repeats)
                print(f"| {model_name} | {label} | {'channels_last' if channels_last else 'contiguous'} | {n / t:.1f} |")


def bench_inference_and_eval(p, mics, repeats):
    print("\n### Inference and validation scoring (cpu-profile size)\n")
    print("| model | inference ms / micrograph | peak memory of one training step (tracemalloc, MB) |\n|---|---|---|")
    for model_name in ("unet", "attention_unet"):
        tc = p.train_config(model_name, 0)
        model = build_model(tc)
        t = best_of(lambda: predict(model, mics, "cpu"), repeats)
        x, y = _stack(mics[:tc.batch_size])
        tracemalloc.start()
        model.train(); focal_dice_loss(model(x), y, tc).backward()
        peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
        print(f"| {model_name} | {t / len(mics) * 1e3:.1f} | {peak / 1e6:.0f} |")
    probs = predict(build_model(p.train_config("unet", 0)), mics, "cpu")
    t = best_of(lambda: select_threshold(probs, mics), repeats)
    print(f"\nValidation threshold sweep (17 thresholds, particle F1) over {len(mics)} micrographs: {t:.2f} s")


def bench_simulator(structure, size, count):
    cfg = MicrographConfig(size_px=size, pixel_size_a=2.0, particles_min=20, particles_max=120)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(count): simulate_micrograph(cfg, rng, structure)
    dt = time.perf_counter() - t0
    print(f"\n### Simulator\n\n{size}² micrographs (2 Å/px, 20-120 apoferritin particles): {count / dt:.2f} micrographs/s "
          f"({dt / count * 1e3:.0f} ms each)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    p = load_study_params("cryoem", CryoEMStudyParams, "tiny" if args.quick else "cpu")
    structure = read_pdb_atoms(Path("data/cryoem/6z6u.pdb"))
    mics = simulate_dataset(p.micrograph_config(), 16 if args.quick else 48, 0, structure)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_simulator(structure, 256 if args.quick else 768, 2 if args.quick else 10)
    bench_training(p, mics, 1 if args.quick else 3)
    bench_inference_and_eval(p, mics, 1 if args.quick else 3)
