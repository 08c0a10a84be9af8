"""Synapse: how many contrastive epochs reach a validation plateau at the cpu profile's sizes? A pilot that sized `ssl_epochs`.

Trains training seed 0's contrastive network of the cpu profile (32³ cubes, `fmaps` 8, batch 40, bfloat16) at a constant learning
rate for `--epochs` epochs, one process per learning rate (one thread each, as the training stage runs), on the pretraining cache
that `dvc repro train_synapse` built, and prints its validation loss and the standard - layer 20 validation ARI gap every few
epochs, with the trend of validation loss over the last 10 epochs (minus its least-squares slope, in per cent of its mean per epoch:
a constant learning rate leaves epoch-to-epoch noise of a few per cent). Run: `.venv/bin/python benchmarks/pilot_synapse_convergence.py [--epochs 40] [--lrs 0.001 0.003]`
(about 7.5 minutes for 40 epochs on 2 cores).
"""
import argparse
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd


def train(lr: float, epochs: int, folder: str) -> pd.DataFrame:
    import torch
    torch.set_num_threads(1)
    from project_lib.core import load_study_params
    from project_lib.synapse.train import ContrastiveConfig, contrastive_unit, history_of, runs_cache
    from project_lib.synapse.units import SynapseStudyParams
    p = load_study_params("synapse", SynapseStudyParams, "cpu")
    cache = runs_cache(Path("outputs/cpu/synapse/runs"))
    if not cache.exists(): raise SystemExit(f"{cache} is missing: run `dvc repro train_synapse` first (it builds the pretraining cache)")
    unit = Path(folder) / f"lr{lr:g}"
    unit.mkdir(parents=True)
    if not runs_cache(Path(folder)).exists(): runs_cache(Path(folder)).symlink_to(cache.resolve())
    config = ContrastiveConfig(epochs, p.ssl_batch_size, lr, temperature=p.ssl_temperature, seed=0, schedule="constant", patience=epochs, bf16=p.ssl_bf16)
    record = contrastive_unit(unit, "cpu", p.pretraining_set(), p.network_kwargs(), config)
    return history_of(record).assign(lr=lr, seconds=record["train_seconds"])


def trend(values: np.ndarray) -> float:
    "Fall of `values` per epoch, in per cent of their mean: minus the least-squares slope (NaN for fewer than 4 epochs)."
    if len(values) < 4: return float("nan")
    return float(-100 * np.polyfit(np.arange(len(values)), values, 1)[0] / values.mean())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder, ProcessPoolExecutor(len(args.lrs)) as pool:
        runs = list(pool.map(train, args.lrs, [args.epochs] * len(args.lrs), [folder] * len(args.lrs)))
    shown = sorted({1, *range(4, args.epochs + 1, 4), args.epochs})
    for h in runs:
        lr, v = h.lr.iloc[0], h.val_loss.to_numpy()
        table = h.assign(**{"trend, % per epoch (last 10)": [trend(v[max(0, e - 10):e]) for e in range(1, len(v) + 1)]})
        print(f"\n### Constant learning rate {lr:g}, {args.epochs} epochs in {h.seconds.iloc[0]:.0f} s\n")
        print(table[table.epoch.isin(shown)][["epoch", "train_loss", "val_loss", "val_top1", "val_gap", "trend, % per epoch (last 10)"]]
              .round(3).to_markdown(index=False))
