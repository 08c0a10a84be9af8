"""Is the cascade's generated benchmark the same on another machine? Forgers in float32 vs float64 (issue "Reproduction across machines").

The cascade's fakes are rendered by two forgers trained for the profile's epochs; they are part of the data
generator. For each precision, trains the cpu profile's forgers (the training stage's own units) in fresh processes
under variants that imitate another machine, builds the benchmark, and prints its data hash (the key of every
detector's training) and whether it equals the reference run's. Usage:
`python benchmarks/bench_forger_portability.py [--profile cpu]` (about 12 minutes on one core).
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

from timing import MACHINE_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"this machine (reference)": {}, "2 threads instead of 1": {"BENCH_THREADS": "2"}, **MACHINE_VARIANTS}
BUILD = """
import project_lib, sys, json, time, torch
from pathlib import Path
from project_lib import engine
from project_lib.cascade import data
from project_lib.cascade.units import CascadeParams, benchmark_draft, forger_units
from project_lib.core import load_study_params
data.FORGER_DTYPE = getattr(torch, sys.argv[2])
p, runs = load_study_params("cascade", CascadeParams, sys.argv[1]), Path(sys.argv[3])
draft, t0 = benchmark_draft(p), time.perf_counter()
units = forger_units(p, draft)
records = engine.run_units(units, runs, engine.Executor(n_workers=1, threads_per_worker=int(sys.argv[4])))
seconds = time.perf_counter() - t0
forgers = {u.kwargs["up"]: data.load_forger(runs / u.key, records[u.key]) for u in units}
print(json.dumps({"hash": data.build_benchmark(draft, forgers).data_hash(), "train_s": seconds}))   # the first draw, as the training stage builds it
"""


def _build(profile: str, dtype: str, runs: Path, env: dict) -> dict:
    threads = env.pop("BENCH_THREADS", "1")
    out = subprocess.run([sys.executable, "-c", BUILD, profile, dtype, str(runs), threads], cwd=ROOT, env=os.environ | env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    print(f"cascade forgers, profile {args.profile}: benchmark data hash per precision and machine variant")
    print("| forger precision | variant | benchmark data hash | same as reference | forger training s (both) |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "float64"):
        ref = None
        for i, (name, env) in enumerate(VARIANTS.items()):
            with tempfile.TemporaryDirectory() as tmp:
                r = _build(args.profile, dtype, Path(tmp), dict(env))
            ref = ref or r["hash"]
            print(f"| {dtype} | {name} | {r['hash']} | {'yes' if r['hash'] == ref else 'no'} | {r['train_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
