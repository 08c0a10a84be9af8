"""Synapse performance on this machine, in one run: feature-extraction throughput of the standard and stage-specific
methods next to their FLOP counts and achieved GFLOP/s, peak memory while extracting many cubes (it must not grow with
their number beyond the feature table), and generator throughput.

Run: `.venv/bin/python benchmarks/bench_synapse.py [--quick]`. Sizes follow the cpu profile of params.yaml, plus 80³.
"""
import argparse
import resource
import subprocess
import sys
import time

import torch

from timing import best_of
from project_lib.core import load_study_params
from project_lib.synapse.analysis import SynapseStudyParams
from project_lib.synapse.data import GeneratorConfig, SyntheticSynapses, prepare_cube
from project_lib.synapse.model import VGG3D, ExtractionConfig, VGG3DStageExtractor, cubes_to_input, extract_features, layer_table


def bench_extraction(sizes, batch, repeats):
    print("\n### Feature extraction (forward only, no_grad, batch %d; best of %d)\n" % (batch, repeats))
    print("| cube | method | layers run | GFLOP / cube | s / cube | cubes / s | GFLOP/s |\n|---|---|---|---|---|---|---|")
    for size in sizes:
        model = VGG3D(input_size=size).eval()
        extractor, table = VGG3DStageExtractor(model), layer_table(model)
        x = torch.rand(batch, 1, size, size, size) * 2 - 1
        per_cube = {}
        with torch.no_grad():
            for name, n in (("standard", 33), ("stage-specific (layer 20)", 20)):
                extractor.extract_layer(n, x)
                t = best_of(lambda: extractor.extract_layer(n, x), repeats) / batch
                gflop = table.cumulative_gflop[n]
                per_cube[name] = t
                print(f"| {size}³ | {name} | 0..{n} | {gflop:.2f} | {t:.3f} | {1 / t:.2f} | {gflop / t:.1f} |")
        print(f"| {size}³ | ratio stage-specific / standard | | {table.cumulative_gflop[20] / table.cumulative_gflop[33]:.2f} | "
              f"{per_cube['stage-specific (layer 20)'] / per_cube['standard']:.2f} | | |")


def bench_generator(configs, count):
    print("\n### Generator\n\n| cube | voxel | cubes / s | ms / cube |\n|---|---|---|---|")
    for cfg in configs:
        data = SyntheticSynapses(cfg, seed=0)
        t0 = time.perf_counter()
        for i in range(count): data[i]
        dt = (time.perf_counter() - t0) / count
        print(f"| {cfg.cube_size}³ | {cfg.voxel_nm:g} nm | {1 / dt:.1f} | {dt * 1e3:.0f} |")


def extract_and_report_rss(n_cubes, size, voxel_nm):
    """Run in a child process: extract standard features of n_cubes generated cubes, print peak RSS in MB."""
    axons = -(-n_cubes // (4 * 5))
    cfg = GeneratorConfig(cube_size=size, voxel_nm=voxel_nm, n_bboxes=4, axons_per_bbox=axons, synapses_per_axon=5)
    data = SyntheticSynapses(cfg, seed=0)
    t0 = time.perf_counter()
    features = extract_features(VGG3D(input_size=size, classifier_hidden=256), data, ExtractionConfig(batch_size=8, progress=False))
    print(len(features), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t0,
          features.memory_usage(deep=True).sum() / 2 ** 20)


def bench_memory(counts, size, voxel_nm):
    print(f"\n### Peak memory of extracting many cubes ({size}³, standard method, batch 8, one process per count)\n")
    print("| cubes | peak RSS (MB) | feature table (MB) | wall (s) | cubes / s incl. generation |\n|---|---|---|---|---|")
    for n in counts:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), str(size), str(voxel_nm)], capture_output=True, text=True, check=True)
        rows, rss, wall, table_mb = out.stdout.split()
        print(f"| {rows} | {float(rss):.0f} | {float(table_mb):.1f} | {float(wall):.0f} | {int(rows) / float(wall):.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        extract_and_report_rss(int(args.child[0]), int(args.child[1]), float(args.child[2]))
        sys.exit()
    p = load_study_params("synapse", SynapseStudyParams, "tiny" if args.quick else "cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_extraction([p.cube_size] if args.quick else [p.cube_size, 80], 2 if args.quick else 4, 1 if args.quick else 3)
    bench_generator([GeneratorConfig(cube_size=p.cube_size, voxel_nm=p.voxel_nm), GeneratorConfig(cube_size=80, voxel_nm=8.0)],
                    2 if args.quick else 10)
    bench_memory([20, 40] if args.quick else [100, 1000], p.cube_size, p.voxel_nm)
