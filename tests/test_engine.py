"""The shared training engine: DistributedSampler-style shards, strict checkpoint loading with errors naming the
file, exact resume, selection of the best epoch (checked on an analytic SGD trajectory)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from project_lib.engine import fit, load_checkpoint_state, load_weights, rank_shard, save_checkpoint, uses_amp


@pytest.mark.parametrize("n, world", [(11, 2), (11, 3), (8, 4), (3, 5)])
def test_rank_shards_are_those_of_torch_distributed_sampler(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [rank_shard(order, r, world) for r in range(world)]
    assert [s.tolist() for s in shards] == [order[list(DistributedSampler(range(n), world, r, shuffle=False))].tolist() for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and set(torch.cat(shards).tolist()) == set(order.tolist())


def _noisy_quadratic(out_dir, epochs, target=3.0, killed_at=0, keep_last=False):
    """w fitted to `target` by SGD on seeded noisy batches; the validation number is -(w - 3)^2. With `killed_at`, the run stops
    with an exception in that validation (as a SIGKILL would), after the previous epoch's checkpoints."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    data = torch.linspace(-1, 1, 16)[:, None]
    validated = []
    def batch_loss(net, idx, gen):
        noise = torch.randn(len(idx), 1, generator=gen)
        return ((net(data[idx]) - target * data[idx] - 0.5 * noise) ** 2).mean()
    def evaluate(m):
        validated.append(1)
        if len(validated) == killed_at: raise InterruptedError("killed")
        return {"score": -float((m.weight.detach() - 3) ** 2)}
    return fit(model, torch.optim.SGD(model.parameters(), lr=0.5), batch_loss, n_train=16, epochs=epochs, batch_size=4, seed=1,
               lr_at=lambda e: 0.5 * 0.5 ** e, evaluate=evaluate, select="score",
               out_dir=out_dir, identity={"config": {"target": target}}, progress=False, keep_last=keep_last)


def test_resume_is_exact_and_other_runs_are_refused(tmp_path):
    full = _noisy_quadratic(tmp_path / "full", 4, keep_last=True)
    with pytest.raises(InterruptedError):
        _noisy_quadratic(tmp_path / "part", 4, killed_at=3)
    assert load_checkpoint_state(tmp_path / "part" / "last.pt")["epoch"] == 2
    resumed = _noisy_quadratic(tmp_path / "part", 4, keep_last=True)
    assert resumed.history.equals(full.history)
    assert torch.equal(*(load_checkpoint_state(r.last_checkpoint)["model"]["weight"] for r in (full, resumed)))
    assert full.last_checkpoint is not None and _noisy_quadratic(tmp_path / "other", 1).last_checkpoint is None
    assert full.best_epoch == int(full.history.epoch[full.history.score.idxmax()])
    best = load_checkpoint_state(full.best_checkpoint)
    assert best["epoch"] == full.best_epoch and best["metrics"]["score"] == full.history.score.max()
    with pytest.raises(ValueError, match="different config"):
        _noisy_quadratic(tmp_path / "part", 4, target=2.0)


def test_strict_loading_names_the_file(tmp_path):
    save_checkpoint(tmp_path / "w.pt", {"model": nn.Conv2d(3, 8, 3).state_dict()})
    load_weights(nn.Conv2d(3, 8, 3), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"w\.pt does not match the model.*of another shape"):
        load_weights(nn.Conv2d(1, 8, 3), tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(nn.Conv2d(3, 8, 3), tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(np.arange(10).tobytes())
    with pytest.raises(ValueError, match=r"bad\.pt cannot be read"):
        load_weights(nn.Conv2d(3, 8, 3), tmp_path / "bad.pt")


def test_mixed_precision_only_for_float32_models_on_cuda():
    "float64 models (the cascade's forgers, part of a data generator) keep full precision on every device."
    f32, f64 = nn.Linear(2, 2), nn.Linear(2, 2, dtype=torch.float64)
    assert [uses_amp(f32, "cuda"), uses_amp(f32, "cuda:1"), uses_amp(f32, "cpu")] == [True, True, False]
    assert [uses_amp(f64, "cuda"), uses_amp(f64, "cpu")] == [False, False]


def test_a_float64_model_trains_in_float64(tmp_path):
    "fit keeps a float64 model's precision: its weights after one epoch equal an independent float64 SGD loop's."
    torch.manual_seed(0)
    model, data = nn.Linear(1, 1, bias=False, dtype=torch.float64), torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    w0 = float(model.weight)
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda net, idx, gen: ((net(data[idx]) - 3 * data[idx]) ** 2).mean(),
        n_train=8, epochs=1, batch_size=8, seed=0, lr_at=lambda e: 0.1, evaluate=lambda m: {"s": 0.0}, select="s",
        out_dir=tmp_path, identity={"config": {}}, progress=False)
    w, x = w0, data[:, 0].numpy()
    w -= 0.1 * float(np.mean(2 * (w - 3) * x * x))    # one full-batch step, by hand
    assert model.weight.dtype == torch.float64 and float(model.weight) == pytest.approx(w, rel=1e-15)


def _scripted(out_dir, scores, patience, epochs=20):
    "A run whose validation numbers are `scores` in turn (NaN: an epoch not validated); how many epochs evaluated."
    torch.manual_seed(0)
    model, calls = nn.Linear(1, 1, bias=False), []
    def evaluate(m):
        calls.append(1)
        return {"score": scores[len(calls) - 1]}
    result = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda net, idx, gen: (net(torch.ones(len(idx), 1)) ** 2).mean(),
                 n_train=4, epochs=epochs, batch_size=2, seed=0, lr_at=lambda e: 0.1, evaluate=evaluate, select="score",
                 out_dir=out_dir, identity={"config": {"scores": "scripted"}}, progress=False, patience=patience)
    return result, len(calls)


def test_early_stopping_counts_scored_epochs_without_improvement(tmp_path):
    nan = float("nan")
    # best 3.0 at epoch 2; epochs 3, 5 (a tie is no improvement) and 6 are scored without improving, epoch 4 is not scored
    result, calls = _scripted(tmp_path / "a", [1.0, 3.0, 2.0, nan, 3.0, 2.5, 9.0], patience=3)
    assert calls == 6 and len(result.history) == 6 and result.stopped_early and result.best_epoch == 2
    assert load_checkpoint_state(tmp_path / "a" / "last.pt")["epoch"] == 6
    again, calls = _scripted(tmp_path / "a", [0.0] * 20, patience=3)   # a finished, early-stopped record is not continued
    assert calls == 0 and again.history.equals(result.history) and again.stopped_early
    capped, calls = _scripted(tmp_path / "b", [float(k) for k in range(5)], patience=2, epochs=5)   # still improving at the cap
    assert calls == 5 and not capped.stopped_early and capped.best_epoch == 5
    full, calls = _scripted(tmp_path / "c", [1.0, 0.0, 0.0, 0.0, 0.0], patience=0, epochs=5)   # 0: no early stopping
    assert calls == 5 and not full.stopped_early
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="patience must be an integer >= 0"):
            _scripted(tmp_path / "d", [1.0], patience=bad)
