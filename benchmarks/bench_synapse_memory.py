"""Peak memory of the synapse study's data paths at two set sizes: the old way, whole sets in memory (the pretraining
inputs rendered into one tensor, an evaluation set's cubes and inputs in lists), against the new one (the pretraining
inputs rendered once into the on-disk cache and read a batch at a time; evaluation features streamed a batch of cubes
at a time). The new peaks must not grow with the number of cubes; the old ones grow with it.

Each row is one fresh process (peak RSS = VmHWM of that process alone, after `import project_lib`, torch and the
generator), so rows do not inherit each other's peaks. Run:
`.venv/bin/python benchmarks/bench_synapse_memory.py [--cube-size 40] [--bboxes 2 8]` (sizes in bounding boxes of
8 axons x 4 synapses: 64 and 256 cubes by default, one torch thread as the stage's units train).
"""
import project_lib  # noqa: F401  (first, before NumPy: the generator refuses otherwise)
import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from timing import peak_rss_mb, rss_mb
from project_lib.synapse.data import GeneratorConfig, SyntheticSynapses
from project_lib.synapse.model import VGG3D
from project_lib.synapse.study import handcrafted_matrix, network_features, streamed_features
from project_lib.synapse.train import PretrainingSet, array_hash, prepared_inputs

BATCH = 8
WORKLOADS = {"pretraining": "pretraining inputs: loaded, hashed, one epoch of shuffled batches read (a unit's data)",
             "render": "pretraining inputs: rendering the cache (the training stage, once)",
             "evaluation": "evaluation set: standard features + hand-crafted statistics of every cube"}


def config(cube_size: int, n_bboxes: int) -> GeneratorConfig:
    return GeneratorConfig(cube_size=cube_size, voxel_nm=640.0 / cube_size, n_bboxes=n_bboxes, axons_per_bbox=8, synapses_per_axon=4)


def pretraining(spec: PretrainingSet, cache: str | None):
    """What a training unit does with its data, without the network: load, hash both parts, read one shuffled epoch."""
    d = spec.load(cache, write=False) if cache else spec.load()
    array_hash(d["train_x"]), array_hash(d["val_x"])
    order = np.random.default_rng(0).permutation(len(d["train_x"]))
    for i in range(0, len(order), BATCH): d["train_x"][torch.as_tensor(order[i:i + BATCH])]


def evaluation(cubes: SyntheticSynapses, cube_size: int, streamed: bool):
    """Standard features of a random VGG3D and the hand-crafted statistics of every cube of an evaluation set."""
    torch.manual_seed(0)
    model = VGG3D(input_size=cube_size, classifier_hidden=8)
    def features(batch):
        return {"standard": network_features(model, prepared_inputs(batch, 0, 1.0), [33], BATCH)[33],
                "hand-crafted": handcrafted_matrix(batch, 0, 1.0, cubes.config.voxel_nm)}
    if streamed: return streamed_features(cubes, features, BATCH)
    return features([cubes[i] for i in range(len(cubes))])          # the old way: the whole set, then its inputs, in memory


def child(workload: str, way: str, cube_size: int, n_bboxes: int, cache: str):
    """One measurement in this (fresh) process: print the RSS once imported, the peak RSS (MB) and the seconds."""
    torch.set_num_threads(1)
    spec = PretrainingSet(config(cube_size, n_bboxes), 1000, 0, 1.0, 1)
    imported, t0 = rss_mb(), time.perf_counter()
    if workload == "render": spec.load(cache)
    elif workload == "pretraining": pretraining(spec, cache if way == "new" else None)
    else: evaluation(SyntheticSynapses(config(cube_size, n_bboxes), 0), cube_size, streamed=way == "new")
    print(imported, peak_rss_mb(), time.perf_counter() - t0)


def measure(workload: str, way: str, cube_size: int, n_bboxes: int, cache: str) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, __file__, "--child", workload, way, str(cube_size), str(n_bboxes), cache],
                         capture_output=True, text=True, check=True).stdout
    return tuple(float(v) for v in out.split()[-3:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cube-size", type=int, default=40, help="voxels per side (the field of view stays 640 nm)")
    parser.add_argument("--bboxes", type=int, nargs=2, default=[2, 8], help="the two set sizes, in bounding boxes of 32 cubes")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, way, size, n, cache = args.child
        return child(workload, way, int(size), int(n), cache)
    rows = [("pretraining", "old (tensor in memory)"), ("render", "new"), ("pretraining", "new (cache, batches)"),
            ("evaluation", "old (set in memory)"), ("evaluation", "new (streamed)")]
    print(f"### Peak RSS of the synapse data paths ({args.cube_size}³ cubes, batch {BATCH}, 1 torch thread, one process per row; "
          f"torch {torch.__version__})\n")
    print("| workload | way | cubes | RSS once imported (MB) | peak RSS (MB) | peak above imports (MB) | s |\n|---|---|---|---|---|---|---|")
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload, way in rows:
            for n in args.bboxes:
                cache = f"{tmp}/cache-{n}"
                imported, peak, seconds = measure(workload, way.split()[0], args.cube_size, n, cache)
                peaks[workload, way, n] = peak - imported
                print(f"| {WORKLOADS[workload]} | {way} | {n * 32} | {imported:.0f} | {peak:.0f} | {peak - imported:.0f} | {seconds:.1f} |", flush=True)
    small, large = args.bboxes
    print(f"\nGrowth of the peak from {small * 32} to {large * 32} cubes (MB): "
          + "; ".join(f"{w} {way}: {peaks[w, way, large] - peaks[w, way, small]:+.0f}" for w, way in rows))


if __name__ == "__main__":
    main()
