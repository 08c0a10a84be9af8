"""Cryo-EM performance on this machine, in one run: the simulator, training throughput (batch routes, channels_last, and two
runs in one process with all threads vs in two processes with one thread each, as `train_arms` runs them), inference, picking,
template matching and the validation threshold sweep, the peak memory of training streamed from the on-disk cache vs stacked
in memory (extrapolated to the paper's scale) and the training's achieved GFLOP/s.

Run: `.venv/bin/python benchmarks/bench_cryoem.py [--quick] [--sections ...]`. Sizes follow the cpu profile of params.yaml
(`--quick`: the tiny profile, 1 thread, one repeat: a smoke check).
"""
import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from timing import best_of, peak_rss_mb, reset_peak_rss
from project_lib.core import load_study_params
from project_lib.cryoem.baselines import micrograph_ctf, oracle_probability_map, template_bank, template_match_map
from project_lib.cryoem.data import Micrograph, load_structure, simulate_micrograph
from project_lib.cryoem.metrics import extract_picks
from project_lib.cryoem.study import ARMS, CryoEMStudyParams, train_arms
from project_lib.engine import train_step
from project_lib.cryoem.train import (TrainConfig, _read_rows, build_model, cache_micrographs, focal_dice_loss, predict,
                                      select_threshold, simulate_dataset, train)

PAPER_TRAIN, PAPER_VAL, PAPER_PX = 5172, 534, 768



def _lowest_dose(p):
    "The simulator's configuration of the condition with the lowest dose."
    return min(p.micrograph_configs().values(), key=lambda c: c.dose_e_per_a2)

def _train_step(model, opt, scaler, x, y, tc):
    """One optimiser step of the cryo-EM training loss, through the shared engine (as `cryoem.train.train` does)."""
    return train_step(model, opt, scaler, lambda n: focal_dice_loss(n(x.contiguous(memory_format=torch.channels_last)), y, tc), "cpu")

def stack(mics):
    """The whole set as image and float-mask tensors in memory (the engine's route before the on-disk cache)."""
    return (torch.from_numpy(np.stack([m.image for m in mics]))[:, None],
            torch.from_numpy(np.stack([m.mask for m in mics]).astype(np.float32))[:, None])


def timed(fn):
    t0 = time.perf_counter(); out = fn()
    return out, time.perf_counter() - t0


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
    print(f"\n### Training throughput (one epoch of {len(mics)} micrographs, {p.size_px}² px, width {p.width}, batch {p.batch_size}, "
          f"{torch.get_num_threads()} thread(s); best of {repeats})\n")
    print("| model | batches | memory format | images/s |\n|---|---|---|---|")
    x, y = stack(mics)
    n, bs = len(mics), p.batch_size
    folder, _ = cache_micrographs(mics, tempfile.mkdtemp())
    stacked = lambda: [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    streamed = lambda: [(torch.from_numpy(_read_rows(folder / "images.npy", range(i, min(i + bs, n)))),
                         torch.from_numpy(_read_rows(folder / "masks.npy", range(i, min(i + bs, n))).astype(np.float32))) for i in range(0, n, bs)]
    loader = lambda: DataLoader(_MicrographDataset(mics), batch_size=bs, shuffle=False)
    for model_name in ARMS:
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


def bench_parallel(p, train_set, val_set, epochs, repeats):
    threads = torch.get_num_threads()
    print(f"\n### Two training runs (seeds 0, 1): one process with {threads} thread(s), one run after the other, vs two processes "
          f"with 1 thread each at the same time (`train_arms`, n_jobs 1 vs 2; {epochs} epoch(s) of {len(train_set)} micrographs each; best of {repeats})\n")
    print(f"Wall: the whole `train_arms` call (cache, per-epoch validation on {len(val_set)} micrographs, checkpoints; the loky workers are "
          f"reused after the first repeat). Training steps: the images of both runs over their `train_time_s` (summed when one after "
          f"the other, rates added when at the same time).\n")
    print("| model | runs | wall (s) | images/s, wall | images/s, training steps |\n|---|---|---|---|---|")
    images = 2 * epochs * len(train_set)
    for model_name in ARMS:
        configs = [dataclasses.replace(p.train_config(model_name, seed), epochs=epochs) for seed in (0, 1)]
        for n_jobs, label in ((1, f"1 process x {threads} thread(s), in turn"), (2, "2 processes x 1 thread, at once")):
            step_rates = []
            def run():
                with tempfile.TemporaryDirectory() as out:
                    times = [r.train_time_s for r in train_arms(configs, train_set, val_set, out, "cpu", None, n_jobs).values()]
                step_rates.append(images / sum(times) if n_jobs == 1 else sum(images / 2 / t for t in times))
            t = best_of(run, repeats)
            print(f"| {model_name} | {label} | {t:.1f} | {images / t:.1f} | {max(step_rates):.1f} |")


def peak_rss_of_training_step(model_name, profile):
    """Run in a child process: one training step of the profile's batch; print the RSS before and the peak RSS after it (MB)."""
    p = load_study_params("cryoem", CryoEMStudyParams, profile)
    tc = p.train_config(model_name, 0)
    mics = simulate_dataset(p.micrograph_config(), tc.batch_size, 0)
    model = build_model(tc)
    x, y = stack(mics)
    before = reset_peak_rss()
    model.train(); focal_dice_loss(model(x.contiguous(memory_format=torch.channels_last)), y, tc).backward()
    print(before, peak_rss_mb())


def bench_inference(p, train_set, val_set, repeats, profile):
    print(f"\n### Inference and memory ({p.size_px}² px, width {p.width}; best of {repeats})\n")
    print("| model | inference ms / micrograph | RSS before / peak RSS during one training step (MB) |\n|---|---|---|")
    for model_name in ARMS:
        model = build_model(p.train_config(model_name, 0))
        t = best_of(lambda: predict(model, train_set, "cpu"), repeats)
        out = subprocess.run([sys.executable, __file__, "--child", model_name, profile], capture_output=True, text=True, check=True)
        before, after = map(float, out.stdout.split()[-2:])
        print(f"| {model_name} | {t / len(train_set) * 1e3:.1f} | {before:.0f} / {after:.0f} |")

    cfg, n = _lowest_dose(p), len(val_set)
    bank, t_bank = timed(lambda: template_bank([load_structure(t) for t in p.particle_types], p.pixel_size_a, p.template_orientations))
    tm = lambda: np.stack([template_match_map(m.image, bank, micrograph_ctf(m, cfg), p.pixel_size_a) for m in val_set])
    maps = {"template matching": tm(), "oracle": np.stack([oracle_probability_map(m) for m in val_set])}
    print(f"\n### Template matching, picking and the threshold sweep ({n} validation micrographs at the lowest dose, "
          f"{cfg.dose_e_per_a2:g} e-/Å²; best of {repeats})\n")
    print("| step | ms / micrograph | note |\n|---|---|---|")
    print(f"| template bank (`template_bank`, {len(bank)} types x {p.template_orientations} orientations, boxes "
          f"{'/'.join(str(b.shape[-1]) for b in bank)} px) | | {t_bank:.2f} s once |")
    print(f"| template matching (`template_match_map`, CTF-filtered bank) | {best_of(tm, repeats) / n * 1e3:.1f} | |")
    for name, score_maps in maps.items():
        picks = lambda: [extract_picks(s, m.diameter_px) for s, m in zip(score_maps, val_set)]
        t = best_of(picks, repeats)
        print(f"| picking (`extract_picks`) on {name} maps | {t / n * 1e3:.1f} | {np.mean([len(q) for q in picks()]):.1f} picks / micrograph |")
        t = best_of(lambda: select_threshold(score_maps, val_set), repeats)
        print(f"| `select_threshold` on {name} maps (picking + particle F1 at up to 50 thresholds) | {t / n * 1e3:.1f} | {t:.2f} s for {n} |")


def peak_rss_of_short_training(mode, n_train, profile):
    """Run in a child process: one epoch at the profile's size on `n_train` synthetic micrographs (validation: n_train / 10),
    `streamed` by the engine from its on-disk cache or `stacked` in memory as the engine did before (train and validation
    sets as image and mask tensors, the same training steps); print the RSS before and the peak RSS after (MB)."""
    torch.set_num_threads(1)
    p = load_study_params("cryoem", CryoEMStudyParams, profile)
    tc, rng, size = TrainConfig(width=p.width, batch_size=p.batch_size, epochs=1), np.random.default_rng(0), p.size_px
    mics = [Micrograph(rng.standard_normal((size, size), dtype=np.float32), rng.uniform(0, size, (10, 2)), size / 8, {})
            for _ in range(n_train + n_train // 10)]
    train_set, val_set = mics[:n_train], mics[n_train:]
    before = reset_peak_rss()
    with tempfile.TemporaryDirectory() as out:
        if mode == "streamed":
            train(tc, train_set, val_set, out, device="cpu", progress=False)
        else:
            (x, y), held_val = stack(train_set), stack(val_set)
            model = build_model(tc)
            opt, scaler = torch.optim.Adam(model.parameters(), tc.lr), torch.amp.GradScaler("cuda", enabled=False)
            for i in range(0, n_train, tc.batch_size): _train_step(model, opt, scaler, x[i:i + tc.batch_size], y[i:i + tc.batch_size], tc)
            select_threshold(predict(model, val_set), val_set)
    print(before, peak_rss_mb())


def bench_memory(p, sizes, profile):
    px, scale = p.size_px, (PAPER_PX / p.size_px) ** 2
    print("\n### Peak memory of training: streamed from the on-disk cache vs stacked in memory (child processes, 1 thread)\n")
    print(f"One epoch of the unet ({px}² px, width {p.width}, batch {p.batch_size}) on synthetic micrographs, validation = train / 10; "
          f"the extra peak RSS above the process holding the micrograph list, at two training-set sizes; the slope per micrograph "
          f"extrapolated linearly to the paper's {PAPER_TRAIN:,} + {PAPER_VAL} micrographs of {PAPER_PX}² px ({scale:.0f}x the pixels).\n")
    print(f"| route | extra peak RSS, {sizes[0]} train (MB) | extra peak RSS, {sizes[1]} train (MB) | MB per train micrograph ({px}²) "
          f"| paper scale, extrapolated (GB) |\n|---|---|---|---|---|")
    for mode in ("stacked", "streamed"):
        extra = []
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--child-rss", mode, str(n), profile], capture_output=True, text=True, check=True)
            before, after = map(float, out.stdout.split()[-2:])
            extra.append(after - before)
        slope = (extra[1] - extra[0]) / (sizes[1] - sizes[0])
        paper = extra[0] + slope * (PAPER_TRAIN * scale - sizes[0])   # validation follows at 1/10, as 534 / 5,172
        print(f"| {mode} | {extra[0]:.0f} | {extra[1]:.0f} | {slope:.3f} | {paper / 1024:.1f} |")


def bench_flops(p, repeats):
    px, bs = p.size_px, p.batch_size
    print(f"\n### Training achieved GFLOP/s ({px}² px, width {p.width}, batch {bs}, {torch.get_num_threads()} thread(s); best of {repeats})\n")
    print("FLOPs of one batch's forward + backward counted by `torch.utils.flop_counter.FlopCounterMode`, divided by the time of "
          "the engine's training step (forward, backward, Adam).\n")
    print("| model | GFLOP per batch (fwd + bwd) | ms per training step | achieved GFLOP/s |\n|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(bs, 1, px, px, generator=gen), (torch.rand(bs, 1, px, px, generator=gen) > 0.9).float()
    for model_name in ARMS:
        tc = TrainConfig(model=model_name, width=p.width, batch_size=bs)
        torch.manual_seed(0)
        model = build_model(tc)
        opt, scaler = torch.optim.Adam(model.parameters(), tc.lr), torch.amp.GradScaler("cuda", enabled=False)
        with FlopCounterMode(display=False) as counter:
            focal_dice_loss(model(x.contiguous(memory_format=torch.channels_last)), y, tc).backward()
        flops = counter.get_total_flops()
        t = best_of(lambda: _train_step(model, opt, scaler, x, y, tc), repeats)
        print(f"| {model_name} | {flops / 1e9:.2f} | {t * 1e3:.0f} | {flops / t / 1e9:.1f} |")


SECTIONS = ["simulator", "training", "parallel", "inference", "memory", "flops"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-rss", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.child_rss:
        peak_rss_of_training_step(*args.child) if args.child else peak_rss_of_short_training(args.child_rss[0], int(args.child_rss[1]), args.child_rss[2])
        sys.exit()
    profile, repeats = ("tiny", 1) if args.quick else ("cpu", 3)
    if args.quick: torch.set_num_threads(1)
    p = load_study_params("cryoem", CryoEMStudyParams, profile)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; profile {profile}: {p.size_px}² px at {p.pixel_size_a:g} Å/px, "
          f"width {p.width}, batch {p.batch_size}, {p.n_train} training / {p.n_val} validation micrographs")
    if {"simulator", "training", "parallel", "inference"} & set(args.sections):
        cfg = p.micrograph_config()
        _, first = timed(lambda: simulate_micrograph(cfg, np.random.default_rng(0)))   # reads the structures, builds the projection banks
        train_set, t = timed(lambda: simulate_dataset(cfg, p.n_train, p.data_seed))
        val_set = simulate_dataset(_lowest_dose(p), p.n_val, p.data_seed + 1)
    if "simulator" in args.sections:
        print(f"\n### Simulator\n\n{p.size_px}² micrographs at {p.pixel_size_a:g} Å/px ({'/'.join(p.particle_types)}, "
              f"{p.particles_min}-{p.particles_max} particles, dose {cfg.dose_e_per_a2:g} e-/Å²): {p.n_train / t:.1f} micrographs/s "
              f"({t / p.n_train * 1e3:.0f} ms each, {p.n_train} micrographs); the first call, which reads the structures and builds "
              f"the projection banks, {first:.1f} s")
    if "training" in args.sections: bench_training(p, train_set, repeats)
    if "parallel" in args.sections: bench_parallel(p, train_set, val_set, 1 if args.quick else 4, repeats)
    if "inference" in args.sections: bench_inference(p, train_set, val_set, repeats, profile)
    if "memory" in args.sections: bench_memory(p, (24, 120) if args.quick else (96, 960), profile)
    if "flops" in args.sections: bench_flops(p, repeats)
