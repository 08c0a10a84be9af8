"""Cryo-EM evaluation memory before and after lazy micrographs: peak resident memory of the evaluation stage's work
(every condition simulated as `evaluate_study` does, then every picker scored by `score_condition`) with the
library as it was before (`--before`, default the last commit that held micrographs and maps in lists; its
`project_lib` and `params.yaml` are taken from git) and as it is now (this working tree).

Scoring costs the same whatever the weights, so the networks are freshly initialised (the profile's architecture,
one checkpoint per arm and seed, as `train_cryoem` would leave them) and nothing is trained. Each version runs in
its own process; the table gives the rise of its peak resident memory (Linux VmHWM, reset once the libraries are
imported and the template bank is built) above its resident memory then, the resident memory left once every condition
is scored, above the same point (what the evaluation keeps), the same two for the Python objects and NumPy arrays
alone (`tracemalloc`: micrographs, maps and tables, without the allocator's and torch's own memory), the size of one pickled training unit (what the executor ships to a worker) and the time.
Run: `.venv/bin/python benchmarks/bench_cryoem_memory.py [--profile cpu|tiny] [--before COMMIT]`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "c35f772"   # the last commit whose cryo-EM stages held every micrograph of a condition and every score map in lists


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: Linux only")


def worker(profile: str) -> dict:
    "Score every condition of `profile` with the `project_lib` on sys.path (run in the version's folder); the measurements."
    import project_lib  # noqa: F401  (first: portable numerics)
    import pickle
    import time
    import tracemalloc
    import torch
    from project_lib.core import load_study_params
    from project_lib.engine import save_checkpoint
    from project_lib.cryoem.baselines import template_bank
    from project_lib.cryoem.data import load_structure
    from project_lib.cryoem.stage import ARMS, CryoEMStudyParams, study_units
    from project_lib.cryoem.study import score_condition
    from project_lib.cryoem.train import RunResult, build_model
    import pandas as pd
    torch.set_num_threads(1)
    p = load_study_params("cryoem", CryoEMStudyParams, profile)
    templates = template_bank([load_structure(t) for t in p.particle_types], p.pixel_size_a, p.template_orientations, seed=p.data_seed)
    folder = Path(tempfile.mkdtemp())
    runs = {}
    for seed in p.seeds:
        for model in ARMS:
            config = p.train_config(model, seed)
            torch.manual_seed(seed)
            save_checkpoint(folder / f"{model}-{seed}.pt", {"model": build_model(config).state_dict(), "epoch": 1, "metrics": {}})
            runs[(model, seed)] = RunResult(config, pd.DataFrame(), 1, 0.5, "train", "val", "budget", 0.0, folder / f"{model}-{seed}.pt")
    Path("/proc/self/clear_refs").write_text("5")   # the peak restarts from here: what the imports and the template bank cost is not counted
    baseline_mb, t0 = _status_mb("VmRSS"), time.perf_counter()
    tracemalloc.start()                             # Python objects and NumPy arrays (micrographs, maps, tables), not torch's own memory
    conditions = study_units(p)                  # as evaluate_study: every condition, with its units
    unit_bytes = len(pickle.dumps(next(iter(conditions.values()))[1][0]))
    scored = {name: score_condition(d, runs, "split", templates, "cpu") for name, (d, _) in conditions.items()}
    seconds = time.perf_counter() - t0
    traced_kept, traced_peak = tracemalloc.get_traced_memory()
    rows = sum(len(r.per_micrograph) for r in scored.values())
    return {"peak_mb": _status_mb("VmHWM"), "baseline_mb": baseline_mb, "kept_mb": _status_mb("VmRSS"), "unit_kb": unit_bytes / 1024,
            "traced_peak_mb": traced_peak / 2**20, "traced_kept_mb": traced_kept / 2**20,
            "seconds": seconds, "rows": rows, "micrographs": len(conditions) * (p.n_train + p.n_val + p.n_test)}


def _checkout(commit: str, into: Path) -> Path:
    "`project_lib`, `params.yaml` and `settings.ini` of `commit` in `into`, with the repository's `data` beside them."
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "project_lib", "params.yaml", "settings.ini"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    (into / "data").symlink_to(ROOT / "data")
    return into


def measure(folder: Path, profile: str) -> dict:
    "Run `worker` in a fresh process whose `project_lib` and `params.yaml` are those of `folder`."
    env = {**os.environ, "PYTHONPATH": str(folder), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--profile", profile], cwd=folder, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=["tiny", "cpu"])
    parser.add_argument("--before", default=BEFORE, help="commit of the list-based library (default %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.profile)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {f"before ({args.before}: lists)": measure(_checkout(args.before, Path(tmp)), args.profile),
                   "after (lazy micrographs, maps dropped once scored)": measure(ROOT, args.profile)}
    first = next(iter(results.values()))
    print(f"Evaluation of the cryo-EM comparison, {args.profile} profile: {first['micrographs']} micrographs, {first['rows']} scored rows, one process, one thread\n")
    print("| version | RSS before scoring (MB) | peak RSS rise while scoring (MB) | RSS rise kept after scoring (MB) | "
          "Python + NumPy allocations: peak (MB) | kept (MB) | pickled training unit (kB) | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['baseline_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | {r['kept_mb'] - r['baseline_mb']:.0f} | "
              f"{r['traced_peak_mb']:.1f} | {r['traced_kept_mb']:.1f} | {r['unit_kb']:.1f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
