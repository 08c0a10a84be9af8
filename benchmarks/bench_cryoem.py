"""Cryo-EM performance on this machine, in one run: simulator, training throughput, inference, peak memory,
and the measured effect of the training-speed changes (pre-stacked batches vs a DataLoader; channels_last); the engine
uses both.

Run: `.venv/bin/python benchmarks/bench_cryoem.py [--quick]`. Sizes follow the cpu profile of params.yaml.
"""
import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timing import best_of
from project_lib.core import load_study_params
from project_lib.cryoem.compare import CryoEMStudyParams
from project_lib.cryoem.data import MicrographConfig, read_pdb_atoms, simulate_micrograph
from project_lib.cryoem.train import _stack, build_model, focal_dice_loss, predict, select_threshold, simulate_dataset


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
        for batches, label in ((loader, "DataLoader, per-item (before)"), (stacked, "pre-stacked tensors")):
            for channels_last in (False, True):
                torch.manual_seed(0)
                model = build_model(tc).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                opt = torch.optim.Adam(model.parameters(), tc.lr)
                fmt = (lambda b: [(xb.contiguous(memory_format=torch.channels_last), yb) for xb, yb in b]) if channels_last else (lambda b: b)
                t = best_of(lambda: train_epoch(model, fmt(list(batches())), tc, opt), repeats)
                print(f"| {model_name} | {label} | {'channels_last' if channels_last else 'contiguous'} | {n / t:.1f} |")


def peak_rss_of_training_step(model_name, profile):
    """Run in a child process: one training step of the cpu-profile batch; print peak RSS before and after it (MB)."""
    p = load_study_params("cryoem", CryoEMStudyParams, profile)
    tc = p.train_config(model_name, 0)
    mics = simulate_dataset(p.micrograph_config(), tc.batch_size, 0, read_pdb_atoms(Path("data/cryoem/6z6u.pdb")))
    model = build_model(tc)
    x, y = _stack(mics)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.train(); focal_dice_loss(model(x.contiguous(memory_format=torch.channels_last)), y, tc).backward()
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench_inference_and_eval(p, mics, repeats, profile):
    print("\n### Inference and memory (cpu-profile size)\n")
    print("| model | inference ms / micrograph | peak RSS before / after one training step (MB) |\n|---|---|---|")
    for model_name in ("unet", "attention_unet"):
        model = build_model(p.train_config(model_name, 0))
        t = best_of(lambda: predict(model, mics, "cpu"), repeats)
        out = subprocess.run([sys.executable, __file__, "--child", model_name, profile], capture_output=True, text=True, check=True)
        before, after = map(float, out.stdout.split())
        print(f"| {model_name} | {t / len(mics) * 1e3:.1f} | {before:.0f} / {after:.0f} |")
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
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_rss_of_training_step(*args.child)
        sys.exit()
    profile = "tiny" if args.quick else "cpu"
    p = load_study_params("cryoem", CryoEMStudyParams, profile)
    structure = read_pdb_atoms(Path("data/cryoem/6z6u.pdb"))
    mics = simulate_dataset(p.micrograph_config(), 16 if args.quick else 48, 0, structure)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_simulator(structure, 256 if args.quick else 768, 2 if args.quick else 10)
    bench_training(p, mics, 1 if args.quick else 3)
    bench_inference_and_eval(p, mics, 1 if args.quick else 3, profile)
