"""The shared executor: the same training units give byte-identical records and checkpoints whether they ran in one
process, in local worker processes or on a Dask cluster of worker processes."""
import json
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
from torch import nn

from project_lib.engine import Executor, TrainingUnit, code_hash, file_hash, fit, load_units, run_units

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Dask workers need this module's training function by value


def _train_tiny(folder: Path, device: str, seed: int, epochs: int) -> dict:
    """A small seeded regression network trained by the engine (the same code path as the studies' trainings)."""
    torch.manual_seed(seed)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
    y = x.mean(dim=(1, 2, 3)) ** 2
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 1)).to(device)
    loss = lambda m, idx, gen: ((m(x[idx].to(device)).squeeze(1) - y[idx].to(device)) ** 2).mean()
    evaluate = lambda m: {"val": -float(((m(x.to(device)).squeeze(1) - y.to(device)) ** 2).mean().detach())}
    run = fit(net, torch.optim.Adam(net.parameters(), lr=1e-2), loss, n_train=64, epochs=epochs, batch_size=16, seed=seed,
              lr_at=lambda e: 1e-2, evaluate=evaluate, select="val", out_dir=folder, identity={"seed": seed}, device=device, progress=False)
    return {"history": run.history.to_dict(orient="list"), "best_epoch": run.best_epoch, "best_sha": file_hash(run.best_checkpoint)}


def _units(epochs=3):
    return [TrainingUnit(f"tiny/s{s}", {"seed": s, "epochs": epochs, "code": code_hash(sys.modules[__name__])}, _train_tiny,
                         {"seed": s, "epochs": epochs}) for s in range(4)]



def test_executors_give_identical_results(tmp_path):
    distributed = pytest.importorskip("distributed")
    one = run_units(_units(), tmp_path / "one", Executor(n_workers=1, threads_per_worker=1))
    local = run_units(_units(), tmp_path / "local", Executor(n_workers=2, threads_per_worker=1))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = run_units(_units(), tmp_path / "dask", Executor(scheduler_address=cluster.scheduler_address))
    assert json.dumps(one, sort_keys=True) == json.dumps(local, sort_keys=True) == json.dumps(dask, sort_keys=True)
    for s in range(4):   # the checkpoints themselves, byte for byte
        hashes = {file_hash(tmp_path / where / f"tiny/s{s}" / "best.pt") for where in ("one", "local", "dask")}
        assert len(hashes) == 1, s


def test_finished_units_are_reused_and_changed_ones_retrained(tmp_path):
    first = run_units(_units(), tmp_path, Executor(n_workers=1))
    stamps = {u.key: (tmp_path / u.key / "unit.json").stat().st_mtime_ns for u in _units()}
    assert run_units(_units(), tmp_path, Executor(n_workers=1)) == first
    assert {u.key: (tmp_path / u.key / "unit.json").stat().st_mtime_ns for u in _units()} == stamps    # nothing retrained
    longer = run_units(_units(epochs=4), tmp_path, Executor(n_workers=1))                            # another identity: retrained
    assert all(len(r["history"]["epoch"]) == 4 for r in longer.values())
    with pytest.raises(FileNotFoundError, match="not trained with this configuration"):
        load_units(_units(epochs=3), tmp_path)


def test_executor_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="n_workers"):
        Executor(n_workers=-2)
    with pytest.raises(ValueError, match="distinct keys"):
        run_units(_units() + _units()[:1], tmp_path)
