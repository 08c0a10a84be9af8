"""Deepfake cascade, building a benchmark draw: rendering every crop with both forgers (as `build_benchmark` did until
2026-12-06) against rendering only the fakes whose family uses a forger (`_renderings`: the swapper for ae_swap, the
generator for generator and generator_matched, about a sixth of the crops each), and the whole `build_benchmark`;
then what evaluation does since the training stage builds every draw once: writing the draw (`units.save_benchmark`)
and reading it back (`units.read_benchmark`, its data hash checked) against building it again (draft + build).

The forgers are freshly initialised (the float64 rendering costs the same whatever the weights); the renderings of the
needed crops are checked identical between the two ways. One process, one torch thread (as a training worker).
Run: `.venv/bin/python benchmarks/bench_cascade_benchmark.py [--profile cpu]`.
"""
import argparse
import tempfile
import time

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from project_lib.cascade.data import FORGER_UPS, Forger, _renderings, build_benchmark, render
    from project_lib.cascade.units import CascadeParams, benchmark_draft, read_benchmark, save_benchmark
    from project_lib.core import load_study_params, seed_everything
    p = load_study_params("cascade", CascadeParams, args.profile)
    t0 = time.perf_counter()
    draft = benchmark_draft(p)
    t_draft = time.perf_counter() - t0
    seed_everything(0)
    forgers = {up: Forger(up).eval() for up in FORGER_UPS}
    t0 = time.perf_counter()
    every = {up: render(f, draft.crops) for up, f in forgers.items()}
    t_every = time.perf_counter() - t0
    t0 = time.perf_counter()
    needed = _renderings(draft, forgers, np.arange(len(draft.plan)))
    t_needed = time.perf_counter() - t0
    up_of = {"ae_swap": "bilinear", "generator": "transposed", "generator_matched": "transposed"}
    same = all(np.array_equal(x, every[up_of[draft.plan[k]["family"]]][k]) for k, x in needed.items())
    t0 = time.perf_counter()
    bench = build_benchmark(draft, forgers)
    t_build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        record = save_benchmark(bench, tmp)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = read_benchmark(tmp, record)
        t_read = time.perf_counter() - t0
    identical = np.array_equal(back.images, bench.images) and np.array_equal(back.label, bench.label) and back.meta.equals(bench.meta) and list(back.group) == list(bench.group)
    n = len(draft.plan)
    print(f"profile {args.profile}: {n} samples of {p.px} px; draft (crops) {t_draft:.1f} s")
    print("| variant | renderings | seconds |\n|---|---|---|")
    print(f"| every crop, both forgers (before) | {2 * n} | {t_every:.1f} |")
    print(f"| only the fakes that use a forger | {len(needed)} | {t_needed:.1f} |")
    print(f"| whole `build_benchmark` (now) | {len(needed)} | {t_build:.1f} |")
    print(f"needed renderings identical to the every-crop ones: {same}")
    print("\n| a draw for evaluation | seconds |\n|---|---|")
    print(f"| built again: draft + `build_benchmark` (until 2026-12-06) | {t_draft + t_build:.1f} |")
    print(f"| written once by the training stage: `save_benchmark` | {t_save:.2f} |")
    print(f"| read back: `read_benchmark`, data hash checked (now) | {t_read:.2f} |")
    print(f"read back identical (pixels, labels, groups, metadata): {identical}")


if __name__ == "__main__":
    main()
