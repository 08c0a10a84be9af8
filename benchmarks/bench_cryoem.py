"""Cryo-EM performance on this machine, in one run: simulator, training throughput, inference, peak memory,
the measured effect of the training-speed changes (batch routes; channels_last), the peak memory of training streamed
from the on-disk cache vs stacked in memory (extrapolated to the paper's scale) and the training's achieved GFLOP/s.

Run: `.venv/bin/python benchmarks/bench_cryoem.py [--quick] [--sections ...]`. Sizes follow the cpu profile of params.yaml.
"""
import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from timing import best_of
from project_lib.core import load_study_params
from project_lib.cryoem.compare import CryoEMStudyParams
from project_lib.cryoem.data import Micrograph, MicrographConfig, read_pdb_atoms, simulate_micrograph
from project_lib.cryoem.train import (TrainConfig, _read_rows, _train_step, build_model, cache_micrographs, focal_dice_loss, predict,
                                      select_threshold, simulate_dataset, train)

PAPER_TRAIN, PAPER_VAL, PAPER_PX = 5172, 534, 768


def stack(mics):
    """The whole set as image and float-mask tensors in memory (the engine's route before the on-disk cache)."""
    return (torch.from_numpy(np.stack([m.image for m in mics]))[:, None],
            torch.from_numpy(np.stack([m.mask for m in mics]).astype(np.float32))[:, None])


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    x, y = stack(mics)
    n, bs = len(mics), p.batch_size
    folder, _ = cache_micrographs(mics, tempfile.mkdtemp())
    stacked = lambda: [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    streamed = lambda: [(torch.from_numpy(_read_rows(folder / "images.npy", range(i, min(i + bs, n)))),
                         torch.from_numpy(_read_rows(folder / "masks.npy", range(i, min(i + bs, n))).astype(np.float32))) for i in range(0, n, bs)]
    loader = lambda: DataLoader(_MicrographDataset(mics), batch_size=bs, shuffle=False)
    for model_name in ("unet", "attention_unet"):
        tc = p.train_config(model_name, 0)
        for batches, label in ((loader, "DataLoader, per-item (before)"), (stacked, "pre-stacked tensors"),
                               (streamed, "streamed from the on-disk cache (engine)")):
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
    x, y = stack(mics)
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
    print(f"\nValidation threshold sweep (particle F1 at up to 50 quantiles of the pick scores) over {len(mics)} micrographs: {t:.2f} s")


def peak_rss_of_short_training(mode, n_train):
    """Run in a child process: one epoch at the cpu-profile size on `n_train` synthetic micrographs (validation: n_train / 10),
    `streamed` by the engine from its on-disk cache or `stacked` in memory as the engine did before (train and validation
    sets as image and mask tensors, the same training steps); print the peak RSS before and after (MB)."""
    torch.set_num_threads(1)
    tc, rng = TrainConfig(width=0.125, batch_size=8, epochs=1), np.random.default_rng(0)
    mics = [Micrograph(rng.standard_normal((128, 128), dtype=np.float32), rng.uniform(0, 128, (10, 2)), 20.0, {})
            for _ in range(n_train + n_train // 10)]
    train_set, val_set = mics[:n_train], mics[n_train:]
    before = peak_rss_mb()
    with tempfile.TemporaryDirectory() as out:
        if mode == "streamed":
            train(tc, train_set, val_set, out, device="cpu", progress=False)
        else:
            (x, y), held_val = stack(train_set), stack(val_set)
            model = build_model(tc)
            opt, scaler = torch.optim.Adam(model.parameters(), tc.lr), torch.amp.GradScaler("cuda", enabled=False)
            for i in range(0, n_train, tc.batch_size): _train_step(model, opt, scaler, x[i:i + tc.batch_size], y[i:i + tc.batch_size], tc, "cpu")
            select_threshold(predict(model, val_set), val_set)
    print(before, peak_rss_mb())


def bench_memory(sizes):
    print("\n### Peak memory of training: streamed from the on-disk cache vs stacked in memory (child processes, 1 thread)\n")
    print(f"One epoch of the unet at the cpu-profile size (128² px) on synthetic micrographs, validation = train / 10; the extra peak RSS "
          f"above the process holding the micrograph list, at two training-set sizes; the slope per micrograph extrapolated linearly "
          f"to the paper's {PAPER_TRAIN:,} + {PAPER_VAL} micrographs of {PAPER_PX}² px ({(PAPER_PX / 128) ** 2:.0f}x the pixels).\n")
    print(f"| route | extra peak RSS, {sizes[0]} train (MB) | extra peak RSS, {sizes[1]} train (MB) | MB per train micrograph (128²) "
          f"| paper scale, extrapolated (GB) |\n|---|---|---|---|---|")
    for mode in ("stacked", "streamed"):
        extra = []
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--child-rss", mode, str(n)], capture_output=True, text=True, check=True)
            before, after = map(float, out.stdout.split()[-2:])
            extra.append(after - before)
        slope = (extra[1] - extra[0]) / (sizes[1] - sizes[0])
        paper = extra[0] + slope * (PAPER_TRAIN * (PAPER_PX / 128) ** 2 - sizes[0])   # validation follows at 1/10, as 534 / 5,172
        print(f"| {mode} | {extra[0]:.0f} | {extra[1]:.0f} | {slope:.3f} | {paper / 1024:.1f} |")


def bench_flops(repeats):
    threads = torch.get_num_threads()
    print(f"\n### Training achieved GFLOP/s (128² px, width 0.125, batch 8, {threads} thread(s); best of {repeats})\n")
    print("FLOPs of one batch's forward + backward counted by `torch.utils.flop_counter.FlopCounterMode`, divided by the time of "
          "the engine's training step (forward, backward, Adam).\n")
    print("| model | GFLOP per batch (fwd + bwd) | ms per training step | achieved GFLOP/s |\n|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 128, 128, generator=gen), (torch.rand(8, 1, 128, 128, generator=gen) > 0.9).float()
    for model_name in ("unet", "attention_unet"):
        tc = TrainConfig(model=model_name, width=0.125, batch_size=8)
        torch.manual_seed(0)
        model = build_model(tc)
        opt, scaler = torch.optim.Adam(model.parameters(), tc.lr), torch.amp.GradScaler("cuda", enabled=False)
        with FlopCounterMode(display=False) as counter:
            focal_dice_loss(model(x.contiguous(memory_format=torch.channels_last)), y, tc).backward()
        flops = counter.get_total_flops()
        t = best_of(lambda: _train_step(model, opt, scaler, x, y, tc, "cpu"), repeats)
        print(f"| {model_name} | {flops / 1e9:.2f} | {t * 1e3:.0f} | {flops / t / 1e9:.1f} |")


def bench_simulator(structure, size, count):
    cfg = MicrographConfig(size_px=size, pixel_size_a=2.0, particles_min=20, particles_max=120)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(count): simulate_micrograph(cfg, rng, structure)
    dt = time.perf_counter() - t0
    print(f"\n### Simulator\n\n{size}² micrographs (2 Å/px, 20-120 apoferritin particles): {count / dt:.2f} micrographs/s "
          f"({dt / count * 1e3:.0f} ms each)")


SECTIONS = ["simulator", "training", "inference", "memory", "flops"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-rss", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.child_rss:
        peak_rss_of_training_step(*args.child) if args.child else peak_rss_of_short_training(args.child_rss[0], int(args.child_rss[1]))
        sys.exit()
    profile, repeats = ("tiny", 1) if args.quick else ("cpu", 3)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if {"simulator", "training", "inference"} & set(args.sections):
        p = load_study_params("cryoem", CryoEMStudyParams, profile)
        structure = read_pdb_atoms(Path("data/cryoem/6z6u.pdb"))
        mics = simulate_dataset(p.micrograph_config(), 16 if args.quick else 48, 0, structure)
    if "simulator" in args.sections: bench_simulator(structure, 256 if args.quick else 768, 2 if args.quick else 10)
    if "training" in args.sections: bench_training(p, mics, repeats)
    if "inference" in args.sections: bench_inference_and_eval(p, mics, repeats, profile)
    if "memory" in args.sections: bench_memory((24, 120) if args.quick else (96, 960))
    if "flops" in args.sections: bench_flops(repeats)
