"""Deepfake cascade, real-data loader: peak resident memory of loading a manifest of N face crops the old way (every
image decoded into one array with np.stack, as `load_manifest` did until issue 18) against the streaming loader
(decoded once into an on-disk .npy cache, then read through mmap a batch at a time), for several N and sizes.

Each case runs in its own process; the number is its peak RSS (VmHWM) above what it held after its imports (torch
alone is about 0.5 GB). The streaming cases: the first load (decoding into the cache), and a later load that reuses
the cache, computes the data hash (what a training's identity needs) and reads a few batches and then a whole epoch in
batches. The manifests hold random RGB images (PNG), written with `write_manifest`.
Run: `.venv/bin/python benchmarks/bench_cascade_memory.py [--sizes 2000x64 8000x64 500x256 2000x256] [--workdir DIR]`.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, BATCHES = 64, 5


def write_synthetic_manifest(folder: Path, n: int, px: int) -> Path:
    """A manifest of n random px x px RGB images (PNG) in groups of 10, alternately real and fake."""
    import numpy as np
    import pandas as pd
    from project_lib.cascade.data import Benchmark, write_manifest
    images = np.random.default_rng(0).integers(0, 256, (n, px, px, 3), dtype=np.uint8)
    bench = Benchmark(images, np.arange(n) % 2, np.array([f"g{i // 10}" for i in range(n)], dtype=object), pd.DataFrame(index=range(n)))
    return write_manifest(bench, folder)


def measure(case: str, manifest: str, px: int, cache: str) -> dict:
    """Peak RSS above the post-import RSS (MB) and seconds of one case, in this process."""
    import numpy as np
    from project_lib.cascade.data import load_image, load_manifest, read_manifest
    from timing import peak_rss_mb, reset_peak_rss
    base = reset_peak_rss()
    t0 = time.perf_counter()
    if case == "old":
        images = np.stack([load_image(p, px) for p in read_manifest(manifest).path])
    else:
        images = load_manifest(manifest, px, cache).images
        if case == "stream-reuse": load_manifest(manifest, px, cache).data_hash()
    rng = np.random.default_rng(0)
    for _ in range(BATCHES): images[np.sort(rng.choice(len(images), min(BATCH, len(images)), replace=False))]
    if case == "stream-reuse":
        for i in range(0, len(images), BATCH): images[rng.permutation(len(images))[:BATCH]]   # an epoch's worth of random batches
    return {"peak_mb": peak_rss_mb() - base, "seconds": time.perf_counter() - t0}


def run_case(case: str, manifest: Path, px: int, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", case, "--manifest", str(manifest), "--px", str(px), "--cache", str(cache)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["2000x64", "8000x64", "500x256", "2000x256"], help="NxPX: images x side")
    parser.add_argument("--workdir", help="where the manifests and caches go (default: a temporary folder)")
    parser.add_argument("--case", choices=["old", "stream-decode", "stream-reuse"], help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--px", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import project_lib  # noqa: F401  (first, as the stages do)
        print(json.dumps(measure(args.case, args.manifest, args.px, args.cache)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cascade_memory-"))
    print(f"Peak RSS above the post-import RSS (MB), each case in its own process; {BATCHES} batches of {BATCH} random rows "
          f"(reuse: the data hash, then also an epoch of random batches). Work folder {work}.\n")
    print("| images | px | pixels (MB) | old: np.stack of all (MB) | streaming, first load: decoding into the cache (MB) "
          "| streaming, cache reused: hash + batches + an epoch (MB) | seconds old / decode / reuse |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n, px = map(int, size.split("x"))
        manifest = write_synthetic_manifest(work / size, n, px)
        cache = work / size / "cache"
        old, decode, reuse = (run_case(c, manifest, px, cache) for c in ("old", "stream-decode", "stream-reuse"))
        print(f"| {n} | {px} | {n * px * px * 3 / 2**20:.0f} | {old['peak_mb']:.0f} | {decode['peak_mb']:.0f} | {reuse['peak_mb']:.0f} "
              f"| {old['seconds']:.1f} / {decode['seconds']:.1f} / {reuse['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
