"""cryoem training engine: the fairness guard checks the data itself, resume is exact and refuses other data,
checkpoints never unpickle code, the DistributedSampler-style split, DDP gradient synchronisation, thresholds over
the range the scores take; lazy micrographs are the list's, bit for bit; streamed scoring; validation every k epochs
on a subset."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from project_lib.cryoem import train as train_module
from project_lib.cryoem.data import Micrograph, MicrographConfig
from project_lib.cryoem.metrics import extract_picks, particle_metrics_by_image, pixel_metrics
from project_lib.cryoem.train import (SimulatedMicrographs, TrainConfig, budget_hash, check_comparable, data_hash, load_best, predict, predict_maps,
                                      run_record, score_picker, select_pixel_threshold, select_threshold, simulate_dataset, train, validated_epochs)

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


def _killed_in_validation(monkeypatch, n: int, *args, **kwargs):
    "`train`, stopped by an exception in its n-th validation: what a SIGKILL there leaves behind (the previous epoch's checkpoints)."
    calls = []
    def killing(*a, **k):
        calls.append(1)
        if len(calls) == n: raise InterruptedError("killed")
        return select_threshold(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(train_module, "select_threshold", killing)
        with pytest.raises(InterruptedError): train(*args, **kwargs)


def test_resume_refuses_other_data_and_otherwise_continues_exactly(mics, tmp_path, monkeypatch):
    straight = fit(TINY, mics[:4], mics[4:5], tmp_path / "straight")
    _killed_in_validation(monkeypatch, 2, TINY, mics[:4], mics[4:5], tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ValueError, match="different val_hash"):
        fit(TINY, mics[:4], mics[5:6], tmp_path / "resumed")
    with pytest.raises(ValueError, match="different train_hash"):
        fit(TINY, mics[1:5], mics[4:5], tmp_path / "resumed")
    with pytest.raises(ValueError, match="different config"):
        fit(dataclasses.replace(TINY, lr=0.5), mics[:4], mics[4:5], tmp_path / "resumed")
    with pytest.raises(ValueError, match="different config"):                           # epochs are part of the identity
        fit(dataclasses.replace(TINY, epochs=3), mics[:4], mics[4:5], tmp_path / "resumed")
    resumed = fit(TINY, mics[:4], mics[4:5], tmp_path / "resumed")
    pd.testing.assert_frame_equal(resumed.history, straight.history)
    a, b = (torch.load(tmp_path / d / "best.pt", weights_only=True)["model"] for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # the same weights, bit for bit
    kept = fit(TINY, mics[:4], mics[4:5], tmp_path / "kept", keep_last=True)           # kept last weights: the same as an uninterrupted run's
    assert torch.load(kept.best_checkpoint, weights_only=True)["epoch"] == straight.best_epoch
    assert "model" in torch.load(tmp_path / "kept" / "last.pt", weights_only=True)


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
def test_gradscaler_state_is_checkpointed_and_restored(mics, tmp_path, monkeypatch):
    three = dataclasses.replace(TINY, epochs=3)
    _killed_in_validation(monkeypatch, 2, three, mics[:4], mics[4:5], tmp_path, device="cuda", progress=False)   # last.pt: epoch 1
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0   # torch's initial scale, no overflow in 2 steps
    state["scaler"]["scale"] = 1024.0            # as if it had backed off earlier
    torch.save(state, tmp_path / "last.pt")
    _killed_in_validation(monkeypatch, 2, three, mics[:4], mics[4:5], tmp_path, device="cuda", progress=False)   # resumed: last.pt at epoch 2
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["scaler"]["scale"] <= 1024.0   # continued, not reset


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


# --- lazy micrographs: the same data as the list, a bounded number in memory, cheap to pickle ---------------------------------


def _same_micrograph(a, b):
    return (np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype and np.array_equal(a.mask, b.mask)
            and np.array_equal(a.centres, b.centres) and np.array_equal(a.diameters_px, b.diameters_px)
            and a.diameter_px == b.diameter_px and a.metadata == b.metadata)


def test_lazy_micrographs_are_the_list_item_for_item():
    reference = simulate_dataset(SMALL, 7, 3)
    lazy = SimulatedMicrographs(SMALL, 3, range(7), cache=2)
    assert len(lazy) == 7 and all(_same_micrograph(lazy[k], reference[k]) for k in range(7))
    assert all(_same_micrograph(a, b) for a, b in zip(lazy, reference))                    # iteration
    assert _same_micrograph(lazy[-1], reference[6])
    # item i depends on (cfg, seed, i) only: spawning 7 children or reading micrograph 6 alone gives the same micrograph
    assert _same_micrograph(SimulatedMicrographs(SMALL, 3, [6])[0], reference[6])
    assert all(_same_micrograph(a, reference[i]) for a, i in zip(lazy[2:6:2], (2, 4)))      # slices
    assert all(_same_micrograph(a, reference[i]) for a, i in zip(lazy.subset([5, 0, 5]), (5, 0, 5)))
    assert lazy.metadata() == [m.metadata for m in reference]
    assert data_hash(lazy) == data_hash(reference)
    assert data_hash(lazy.subset([5, 1])) == data_hash([reference[5], reference[1]]) and data_hash(lazy[4:]) == data_hash(reference[4:])


def test_lazy_micrographs_keep_at_most_cache_in_memory_and_pickle_without_images(monkeypatch):
    calls = []
    real = train_module.simulate_micrograph
    monkeypatch.setattr(train_module, "simulate_micrograph", lambda *a, **k: calls.append(1) or real(*a, **k))
    two = SimulatedMicrographs(SMALL, 3, range(3), cache=2)
    list(two); list(two)
    assert len(calls) == 6                 # three micrographs through a memory of two: every read simulates again
    calls.clear()
    three = SimulatedMicrographs(SMALL, 3, range(3), cache=3)
    list(three); list(three); three[1:].subset([0]); three[1:][0]
    assert len(calls) == 3                 # all three kept; a view of the sequence shares its memory
    h = data_hash(three)
    payload = pickle.dumps(three)
    assert len(payload) < 64 * 64 * 4      # the recipe, hashes and metadata: not one image (a 64² float32 image is 16 kB)
    calls.clear()
    back = pickle.loads(payload)
    assert data_hash(back) == h and calls == []                                 # the hash travelled with it...
    assert _same_micrograph(back[2], three[2]) and len(calls) == 1              # ...the images did not: generated again


def test_one_pass_hashes_a_sequence_its_parts_and_each_micrograph(monkeypatch):
    reference = simulate_dataset(SMALL, 6, 1)
    whole = SimulatedMicrographs(SMALL, 1, range(6), cache=0)
    parts = [whole.subset([0, 2, 5]), whole[3:5]]
    calls = []
    real = train_module.simulate_micrograph
    monkeypatch.setattr(train_module, "simulate_micrograph", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert whole.data_hash(*parts) == data_hash(reference) and len(calls) == 6   # one pass
    assert [data_hash(part) for part in parts] == [data_hash([reference[i] for i in (0, 2, 5)]), data_hash(reference[3:5])]
    assert [data_hash(whole[i:i + 1]) for i in range(6)] == [data_hash([m]) for m in reference]
    assert len(calls) == 6                                                        # every hash above was remembered
    fresh = SimulatedMicrographs(SMALL, 1, range(3))
    with pytest.raises(ValueError, match="order"):
        fresh.data_hash(fresh.subset([2, 0]))
    with pytest.raises(ValueError, match="subsets taken of this sequence"):
        fresh.data_hash(SimulatedMicrographs(SMALL, 1, range(3)))


@pytest.mark.parametrize("kwargs, message", [({"cache": -1}, "cache must be >= 0"), ({"cache": 1.5}, "cache must be an integer"),
                                             ({"ids": [0, -2]}, "ids must be >= 0"), ({"ids": [0.5]}, "ids must be an integer"),
                                             ({"seed": -1}, "seed must be >= 0"), ({"cfg": {"size_px": 64}}, "cfg must be a MicrographConfig")])
def test_lazy_micrographs_refuse_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedMicrographs(**{"cfg": SMALL, "seed": 0, "ids": range(2), **kwargs})


def test_lazy_micrographs_refuse_bad_indices():
    lazy = SimulatedMicrographs(SMALL, 0, range(2))
    with pytest.raises(IndexError, match="out of range: 2 micrographs"):
        lazy[2]
    with pytest.raises(TypeError, match="subset"):
        lazy[[0, 1]]
    with pytest.raises(IndexError):
        lazy.subset([3])


def test_a_training_on_lazy_micrographs_is_the_training_on_lists(tmp_path):
    "Lists (batches from the on-disk cache), lazy sequences (the same cache) and stored lazy sequences (batches read from the store, no cache) train alike."
    torch.set_num_threads(1)
    listed, lazy = simulate_dataset(SMALL, 6, 0), SimulatedMicrographs(SMALL, 0, range(6))
    stored = SimulatedMicrographs(SMALL, 0, range(6), cache=0, store=tmp_path / "store")
    names = ("list", "lazy", "stored")
    runs = [train(TINY, s[:4], s[4:5], tmp_path / name, device="cpu", progress=False, extra_eval={"alt": s[5:]}) for name, s in zip(names, (listed, lazy, stored))]
    records = [run_record(r, tmp_path / name) for r, name in zip(runs, names)]
    for r in records: r.pop("train_time_s")
    assert records[0] == records[1] == records[2]                                 # history, best epoch, threshold, hashes
    for other in runs[1:]: pd.testing.assert_frame_equal(runs[0].history, other.history, check_exact=True)
    weights = [torch.load(r.best_checkpoint, weights_only=True)["model"] for r in runs]
    assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in weights[0])
    folders = lambda name: sorted(f.name for f in (tmp_path / name / "cache").iterdir() if f.is_dir())
    assert folders("list") == folders("lazy") and len(folders("list")) == 1               # one data folder, named by the same data hash
    assert [f.read_text() for f in (tmp_path / "lazy" / "cache").glob("*.recipe")] == folders("lazy")   # the lazy one found by its recipe
    assert not (tmp_path / "stored" / "cache").exists()                            # read from the store: no second copy of the training set


def test_stored_micrographs_are_simulated_once_and_read_back_exactly(tmp_path, monkeypatch):
    reference = simulate_dataset(SMALL, 3, 5)
    calls = []
    real = train_module.simulate_micrograph
    monkeypatch.setattr(train_module, "simulate_micrograph", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = SimulatedMicrographs(SMALL, 5, range(3), cache=0, store=tmp_path)
    assert all(_same_micrograph(a, b) for a, b in zip(first, reference)) and len(calls) == 3
    assert sorted(p.name for p in first.store.iterdir()) == ["0.pkl", "1.pkl", "2.pkl"]
    again = SimulatedMicrographs(SMALL, 5, range(3), cache=0, store=tmp_path)     # another process's sequence: reads the files
    assert all(_same_micrograph(a, b) for a, b in zip(again, reference)) and len(calls) == 3
    assert data_hash(again) == data_hash(reference) and again.metadata() == [m.metadata for m in reference]
    (again.store / "1.pkl").write_bytes(b"truncated")                              # a damaged file is simulated and written again
    assert _same_micrograph(again[1], reference[1]) and len(calls) == 4 and _same_micrograph(SimulatedMicrographs(SMALL, 5, [1], store=tmp_path)[0], reference[1])
    # another seed or configuration never reads these files
    assert SimulatedMicrographs(SMALL, 6, range(1), store=tmp_path).store != first.store
    assert SimulatedMicrographs(dataclasses.replace(SMALL, dose_e_per_a2=SMALL.dose_e_per_a2 * 2), 5, range(1), store=tmp_path).store != first.store
    with pytest.raises(ValueError, match="structures must be None"):
        SimulatedMicrographs(SMALL, 5, range(1), structures={}, store=tmp_path)


def test_streamed_scoring_is_the_whole_set_computation(mics, tmp_path):
    """Maps one by one (`predict_maps`, a generator) score as the stacked array does, and as particle metrics computed on
    every micrograph's picks at once (the whole-set computation), including a micrograph without any pick."""
    run = fit(dataclasses.replace(TINY, epochs=1), mics[:4], mics[4:5], tmp_path / "u")
    net = load_best(run)
    maps = predict(net, mics, "cpu")
    assert np.array_equal(np.stack(list(predict_maps(net, mics, "cpu"))), maps)
    maps[2] = 0.0                                                                 # no pick at all on micrograph 2
    thresholds = (0.3, 0.5)
    streamed, threshold = score_picker(None, iter(list(maps)), None, mics, thresholds)
    stacked, _ = score_picker(None, maps, None, mics, thresholds)
    pd.testing.assert_frame_equal(streamed, stacked, check_exact=True)
    assert threshold == 0.3 and streamed.n_picked[2] == 0
    picks = pd.concat([extract_picks(p, m.diameter_px).assign(image=i) for i, (p, m) in enumerate(zip(maps, mics))])
    truth = pd.concat([pd.DataFrame({"x": m.centres[:, 0], "y": m.centres[:, 1], "radius": m.diameters_px / 2, "image": i}) for i, m in enumerate(mics)])
    whole = particle_metrics_by_image(picks, truth, 0.0, 0.3).set_index("image")
    for k in ("precision", "recall", "f1", "auprc"):
        assert streamed[f"particle_{k}"].tolist() == whole[k].tolist()
    assert streamed.n_true.tolist() == whole.n_true.tolist()
    with pytest.raises(ValueError):                                               # a map missing is an error, not a shorter table
        score_picker(None, iter(list(maps[:-1])), None, mics, thresholds)


# --- validation during training: every k-th epoch, on the first n micrographs, on the training device ------------------------

def test_validated_epochs_by_hand():
    assert validated_epochs(TrainConfig(epochs=5, val_every=2)) == [2, 4, 5]           # every second, and the last
    assert validated_epochs(TrainConfig(epochs=4, val_every=2)) == [2, 4]
    assert validated_epochs(TrainConfig(epochs=3)) == [1, 2, 3]                        # default: every epoch
    assert validated_epochs(TrainConfig(epochs=3, val_every=10)) == [3]


@pytest.mark.parametrize("field, value, message", [("val_every", 0, "val_every must be >= 1"), ("val_every", -2, "val_every must be >= 1"),
                                                   ("val_every", 1.5, "val_every must be an integer"), ("val_every", "2", "val_every must be an integer"),
                                                   ("val_every", True, "val_every must be an integer"), ("val_subset", -1, "val_subset must be >= 0"),
                                                   ("val_subset", 2.0, "val_subset must be an integer")])
def test_validation_settings_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_only_validated_epochs_are_scored_and_can_be_the_best(mics, tmp_path, monkeypatch):
    """5 epochs, val_every 2: validation after epochs 2, 4 and 5 only, on the first 2 of 3 validation micrographs, on
    the training device. Scripted validation F1 0.4, 0.9, 0.6: the best epoch is 4, never an unvalidated one."""
    seen, scores = [], iter([(0.1, 0.4), (0.2, 0.9), (0.3, 0.6)])
    real_predict = train_module.predict
    monkeypatch.setattr(train_module, "predict", lambda m, micrographs, device, *a: seen.append((data_hash(micrographs), device)) or real_predict(m, micrographs, device, *a))
    monkeypatch.setattr(train_module, "select_threshold", lambda probs, micrographs: next(scores))
    val = [mics[4], mics[5], mics[0]]
    run = fit(dataclasses.replace(TINY, epochs=5, val_every=2, val_subset=2), mics[:4], val, tmp_path / "u")
    assert seen == [(data_hash(val[:2]), "cpu")] * 3                               # three validations, of the first two micrographs
    assert run.history.val_f1.isna().tolist() == [True, False, True, False, False]
    assert run.best_epoch == 4 and run.threshold == 0.2
    assert torch.load(run.best_checkpoint, weights_only=True)["epoch"] == 4
    assert run.val_hash == data_hash(val)                                         # the identity is the whole validation set's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_validation_runs_on_the_training_device(mics, tmp_path, monkeypatch):
    devices = []
    real = train_module.probabilities
    monkeypatch.setattr(train_module, "probabilities", lambda model, x, device="cpu", dropout=False: devices.append(
        (str(next(model.parameters()).device), device)) or real(model, x, device, dropout))
    train(dataclasses.replace(TINY, epochs=2), mics[:4], mics[4:6], tmp_path, device="cuda", progress=False)
    assert devices and all(d[0].startswith("cuda") and d[1].startswith("cuda") for d in devices)
