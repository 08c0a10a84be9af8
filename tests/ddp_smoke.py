"""Run by tests/test_cryoem_train.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU).

1. One step of the engine's `train_step` on different data per rank, with and without the engine's DDP wrapper:
   the largest weight difference between the ranks afterwards (0 when gradients are synchronised).
2. A tiny `train()` run under DDP: each rank's history and data hashes; a batch size that does not split is refused.
Each rank writes rank<r>.json into the folder given as the first argument.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

from project_lib.cryoem.data import MicrographConfig
from project_lib.cryoem.train import TrainConfig, build_model, focal_dice_loss, simulate_dataset, train
from project_lib.engine import distributed, train_step, wrap_ddp


def weight_spread_after_one_step(ddp: bool) -> float:
    "Largest difference between the ranks' weights after one step on rank-specific data."
    rank, world, device = distributed("cpu")
    config = TrainConfig(width=0.0625, batch_size=2)
    torch.manual_seed(0)   # the same initial weights on every rank
    model = build_model(config)
    gen = torch.Generator().manual_seed(100 + rank)   # different data on every rank
    xb, yb = torch.randn(2, 1, 32, 32, generator=gen), (torch.rand(2, 1, 32, 32, generator=gen) > 0.8).float()
    train_step(wrap_ddp(model, world, device) if ddp else model, torch.optim.Adam(model.parameters(), lr=config.lr),
               torch.amp.GradScaler("cuda", enabled=False), lambda net: focal_dice_loss(net(xb), yb, config), device)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    torch.distributed.all_gather(gathered, weights)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    spread = {"ddp": weight_spread_after_one_step(True), "no_ddp": weight_spread_after_one_step(False)}
    mics = simulate_dataset(MicrographConfig(size_px=64, pixel_size_a=8.0, particle_types=("apoferritin",),
                                             type_proportions=(1.0,), particles_min=3, particles_max=6), 7, 0)
    config = TrainConfig(epochs=2, batch_size=4, width=0.0625)
    result = train(config, mics[:5], mics[5:], out / "run", device="cpu", progress=False)
    try:
        train(dataclasses.replace(config, batch_size=3), mics[:5], mics[5:], out / "odd", device="cpu", progress=False)
        refusal = ""
    except ValueError as e:
        refusal = str(e)
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"world": torch.distributed.get_world_size(), "spread": spread,
                                                      "history": result.history.to_dict("list"),
                                                      "hashes": [result.train_hash, result.val_hash], "refusal": refusal}))
    torch.distributed.destroy_process_group()
