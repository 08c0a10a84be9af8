"""How far one training moves when the machine changes (issue "Reproduction across machines", item 2).

Trains the same cryo-EM unit (cpu profile, dose 20, U-Net, seed 0) in fresh processes under variants that imitate
another machine: the same settings again, another thread count, and torch/oneDNN/MKL limited to AVX2 or to scalar
kernels (what an AVX2-only or older CPU runs). Prints, against the first run: identical weights?, the largest weight
difference, and the differences in best validation F1, best epoch and threshold. Usage:
`python benchmarks/bench_training_reproducibility.py [--unit dose-20/unet-s0] [--profile cpu]`.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch

from project_lib.cryoem.train import load_best, run_from_record
from timing import MACHINE_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "this machine (reference)": {},
    "this machine, again": {},
    "2 threads instead of 1": {"BENCH_THREADS": "2"},
    **MACHINE_VARIANTS,
}
TRAIN = """
import sys, json, torch
from pathlib import Path
from project_lib import engine
from project_lib.core import load_study_params
from project_lib.cryoem import stage
p, key = load_study_params("cryoem", stage.CryoEMStudyParams, sys.argv[1]), sys.argv[2]
(d, units), = stage.study_units(p, [key.split("/")[0]]).values()
unit = next(u for u in units if u.key == key)
print(json.dumps(engine.run_units([unit], Path(sys.argv[3]), engine.Executor(n_workers=1, threads_per_worker=int(sys.argv[4])))[key]))
"""


def _train(profile: str, unit: str, root: Path, env: dict) -> tuple[dict, dict, float]:
    threads = env.pop("BENCH_THREADS", "1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", TRAIN, profile, unit, str(root), threads], cwd=ROOT, env=os.environ | env,
                         capture_output=True, text=True, check=True).stdout
    record = json.loads(out.splitlines()[-1])
    run = run_from_record(record, root / unit)
    return {"best_val_f1": max(run.history["val_f1"]), "best_epoch": run.best_epoch, "threshold": run.threshold}, load_best(run).state_dict(), time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu"); parser.add_argument("--unit", default="dose-20/unet-s0")
    args = parser.parse_args()
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env) in enumerate(VARIANTS.items()):
            record, weights, seconds = _train(args.profile, args.unit, Path(tmp) / str(i), dict(env))
            if ref is None: ref = (record, weights)
            diff = max(float((weights[k].float() - ref[1][k].float()).abs().max()) for k in weights if weights[k].is_floating_point())
            rows.append((name, diff == 0.0, diff, record["best_val_f1"] - ref[0]["best_val_f1"], record["best_epoch"] - ref[0]["best_epoch"],
                         record["threshold"] - ref[0]["threshold"], seconds))
    print(f"cryo-EM unit {args.unit}, profile {args.profile}, {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| variant | identical weights | max abs weight difference | best val F1 difference | best epoch difference | threshold difference | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows: print(f"| {r[0]} | {'yes' if r[1] else 'no'} | {r[2]:.2e} | {r[3]:+.4f} | {r[4]:+d} | {r[5]:+.3f} | {r[6]:.0f} |")


if __name__ == "__main__":
    main()
