"""cryoem training engine: the fairness guard checks the data itself, resume is exact and refuses other data,
checkpoints never unpickle code, the DistributedSampler-style split, DDP gradient synchronisation, thresholds over
the range the scores take."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from project_lib.cryoem.data import Micrograph, MicrographConfig
from project_lib.cryoem.metrics import pixel_metrics
from project_lib.cryoem.train import (TrainConfig, budget_hash, check_comparable, data_hash,
                                      load_best, select_pixel_threshold, select_threshold, simulate_dataset, train)

TINY = TrainConfig(epochs=2, batch_size=2, width=0.0625)
SMALL = MicrographConfig(size_px=64, pixel_size_a=8.0, particle_types=("apoferritin",), type_proportions=(1.0,),
                         particles_min=3, particles_max=6)


@pytest.fixture(scope="module")
def mics():
    """Six 64-px micrographs: 0-3 train, 4 and 5 two different validation sets of one micrograph each."""
    torch.set_num_threads(1)
    return simulate_dataset(SMALL, 6, 0)


def fit(config, train_set, val_set, out, **kw):
    return train(config, train_set, val_set, out, device="cpu", progress=False, **kw)


def test_guard_refuses_arms_validated_on_other_micrographs(mics, tmp_path):
    unet = fit(dataclasses.replace(TINY, epochs=1), mics[:4], mics[4:5], tmp_path / "u", cache_dir=tmp_path / "cache")
    same = fit(dataclasses.replace(TINY, epochs=1, model="attention_unet"), mics[:4], mics[4:5], tmp_path / "a", cache_dir=tmp_path / "cache")
    other_val = fit(dataclasses.replace(TINY, epochs=1, model="attention_unet"), mics[:4], mics[5:6], tmp_path / "b", cache_dir=tmp_path / "cache")
    assert (unet.train_hash, unet.val_hash) == (data_hash(mics[:4]), data_hash(mics[4:5]))
    assert len(list((tmp_path / "cache").iterdir())) == 1   # the arms share one cache of the training set
    check_comparable([unet], [same])
    with pytest.raises(ValueError, match="val_hash .*validation micrographs"):
        check_comparable([unet], [other_val])
    with pytest.raises(ValueError, match="train_hash"):
        check_comparable([unet], [dataclasses.replace(same, train_hash=data_hash(mics[1:5]))])
    with pytest.raises(ValueError, match="budget_hash"):
        check_comparable([unet], [dataclasses.replace(same, budget_hash=budget_hash(dataclasses.replace(TINY, lr=0.5)))])
    with pytest.raises(ValueError, match="seeds differ"):
        check_comparable([unet], [dataclasses.replace(same, config=dataclasses.replace(same.config, seed=9))])


def test_resume_refuses_other_data_and_otherwise_continues_exactly(mics, tmp_path):
    straight = fit(TINY, mics[:4], mics[4:5], tmp_path / "straight")
    fit(dataclasses.replace(TINY, epochs=1), mics[:4], mics[4:5], tmp_path / "resumed")
    with pytest.raises(ValueError, match="different val_hash"):
        fit(TINY, mics[:4], mics[5:6], tmp_path / "resumed")
    with pytest.raises(ValueError, match="different train_hash"):
        fit(TINY, mics[1:5], mics[4:5], tmp_path / "resumed")
    with pytest.raises(ValueError, match="different config"):
        fit(dataclasses.replace(TINY, lr=0.5), mics[:4], mics[4:5], tmp_path / "resumed")
    resumed = fit(TINY, mics[:4], mics[4:5], tmp_path / "resumed")
    pd.testing.assert_frame_equal(resumed.history, straight.history)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # the same weights, bit for bit


def test_checkpoint_holding_a_pickled_object_is_refused_without_running_it(mics, tmp_path):
    run = fit(dataclasses.replace(TINY, epochs=1), mics[:4], mics[4:5], tmp_path / "u")
    load_best(run)   # the engine's own checkpoints load with weights_only=True

    class Trap:
        def __reduce__(self): return (open, (str(tmp_path / "sprung"), "w"))
    state = torch.load(run.best_checkpoint, weights_only=True)
    torch.save({**state, "note": Trap()}, tmp_path / "trap.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_best(dataclasses.replace(run, best_checkpoint=tmp_path / "trap.pt"))
    assert not (tmp_path / "sprung").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GradScaler is enabled on CUDA only")
def test_gradscaler_state_is_checkpointed_and_restored(mics, tmp_path):
    train(dataclasses.replace(TINY, epochs=1), mics[:4], mics[4:5], tmp_path, device="cuda", progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0   # torch's initial scale, no overflow in 2 steps
    state["scaler"]["scale"] = 1024.0            # as if it had backed off earlier
    torch.save(state, tmp_path / "last.pt")
    train(TINY, mics[:4], mics[4:5], tmp_path, device="cuda", progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]["scale"] <= 1024.0   # continued, not reset


def test_ddp_synchronises_gradients_and_ranks_agree(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "tests/ddp_smoke.py", tmp_path], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["spread"]["ddp"] == 0.0    # different data, one synchronised step: identical weights
    assert ranks[0]["spread"]["no_ddp"] > 1e-4  # the same step without the wrapper: the ranks drift apart
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]["epoch"]) == 2   # one validation, shared
    assert ranks[0]["hashes"] == ranks[1]["hashes"]
    assert "multiple of the number of processes" in ranks[0]["refusal"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2


def test_thresholds_reach_above_a_fixed_grid():
    """Confident maps: particles score 0.99, two false blobs 0.95, background 0; pixels 0.97-0.99 vs 0.93-0.96."""
    mic = Micrograph(np.zeros((64, 64), np.float32), np.array([[16.0, 16.0], [44.0, 40.0]]), 12.0, {})
    prob = np.zeros((64, 64))
    for (x, y), s in zip([(16, 16), (44, 40), (48, 12), (12, 48)], [0.99, 0.99, 0.95, 0.95]):
        prob[max(y - 5, 0):y + 6, max(x - 5, 0):x + 6] = s
    threshold, f1 = select_threshold(prob[None], [mic])
    assert f1 == 1.0 and threshold > 0.9
    rng = np.random.default_rng(1)
    prob = np.where(mic.mask, rng.uniform(0.97, 0.99, (64, 64)), rng.uniform(0.93, 0.96, (64, 64)))[None]
    t = select_pixel_threshold(prob, [mic])
    assert pixel_metrics(prob, mic.mask[None], t)["f1"] > 0.9 > pixel_metrics(prob, mic.mask[None], 0.9)["f1"]
