"""Run by tests/test_cryoem.py under `torchrun --nproc_per_node=2`: one tiny DistributedDataParallel training run on CPU (gloo)."""
import sys
from pathlib import Path

import torch

from project_lib.cryoem.data import MicrographConfig, read_pdb_atoms
from project_lib.cryoem.train import TrainConfig, simulate_dataset, train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    mics = simulate_dataset(MicrographConfig(size_px=64, pixel_size_a=8.0, particles_min=3, particles_max=6), 10, 0,
                            read_pdb_atoms("data/cryoem/6z6u.pdb"))
    result = train(TrainConfig(epochs=2, batch_size=4, width=0.0625), mics[:6], mics[6:], out, "s", "d", "cpu", progress=False)
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.txt").write_text(f"{torch.distributed.get_world_size()} {len(result.history)}")
    torch.distributed.destroy_process_group()
