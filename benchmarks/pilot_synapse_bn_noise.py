"""Synapse: how much of an epoch-to-epoch change in validation loss is BatchNorm's running averages rather than the weights?

For each trained contrastive network of the cpu profile (the kept epoch's weights in `best.pt`, from `dvc repro train_synapse`)
it prints the validation loss with the statistics stored in the checkpoint, then the validation loss after one epoch of
running-average updates at fixed weights (a train-mode pass over the training cubes in a random order, two augmented views per
cube as in training, momentum 0.1), for `--repeats` orders, and after re-estimating the statistics over fixed views
(`reestimate_batchnorm`, what training does before every validation). The spread over orders is the noise that the running averages
add to validation loss at fixed weights. Run: `.venv/bin/python benchmarks/pilot_synapse_bn_noise.py [--seeds 0 1 2 3 4] [--repeats 4]`
(about 20 s per network on 2 cores).
"""
import argparse
import copy

import pandas as pd
import torch

import project_lib  # noqa: F401  (pins the portable numerical paths first)
from project_lib.core import load_study_params
from project_lib.engine import load_weights
from project_lib.synapse.model import VGG3D
from project_lib.synapse.train import (Augmentation, ContrastiveVGG, channels_last, contrastive_loss, contrastive_validation,
                                       reestimate_batchnorm, runs_cache)
from project_lib.synapse.units import SynapseStudyParams

RUNS = "outputs/cpu/synapse/runs"


def one_epoch_of_running_updates(net: ContrastiveVGG, train_x, config, order_seed: int) -> ContrastiveVGG:
    "A copy of `net` whose running statistics have seen one training epoch of views (random order), weights untouched."
    moved, gen = copy.deepcopy(net).train(), torch.Generator().manual_seed(order_seed)
    order = torch.randperm(len(train_x), generator=gen)
    with torch.no_grad():
        for i in range(0, len(order), config.batch_size):
            contrastive_loss(moved, train_x[order[i:i + config.batch_size]], gen, config)   # the training forward pass: two views per cube
    return moved


def main(seeds: list[int], repeats: int) -> None:
    torch.set_num_threads(2)
    p = load_study_params("synapse", SynapseStudyParams, "cpu")
    data = p.pretraining_set().load(runs_cache(RUNS))   # renders the cache when the training code has moved on
    rows = []
    for seed in seeds:
        config = p.contrastive_config(seed)
        net = channels_last(ContrastiveVGG(VGG3D(**p.network_kwargs()), config.proj_dim, config.stage_layer))
        load_weights(net, f"{RUNS}/contrastive-s{seed}/best.pt")
        val = lambda n: contrastive_validation(n, data["val_x"], config)["val_loss"]
        stored = val(net)
        moved = [val(one_epoch_of_running_updates(net, data["train_x"], config, 1000 + k)) for k in range(repeats)]
        settled = val(reestimate_batchnorm(copy.deepcopy(net), data["train_x"], config.batch_size, aug=Augmentation(), bf16=config.bf16))
        change = [100 * (m / stored - 1) for m in moved]
        rows.append({"seed": seed, "stored statistics": stored, "after one epoch of updates: min %": min(change),
                     "max %": max(change), "range %": max(change) - min(change), "re-estimated (fixed views) %": 100 * (settled / stored - 1)})
        print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
    print("\n" + pd.DataFrame(rows).round(3).to_markdown(index=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    main(args.seeds, args.repeats)
