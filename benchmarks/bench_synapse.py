"""Synapse performance on this machine, in one run: feature-extraction throughput of the standard and stage-specific
methods next to their FLOP counts and achieved GFLOP/s, peak memory while extracting many cubes (it must not grow with
their number beyond the feature table), what that peak is made of (imports, generator, weights, forward temporaries, each
in its own process), generator throughput, and the contrastive training step in two memory layouts.

Run: `.venv/bin/python benchmarks/bench_synapse.py [--quick] [--memory-only]`. Sizes follow the cpu profile of params.yaml,
plus 80³ (`--quick`: the tiny profile, a smoke check; `--memory-only`: only the section on what the peak memory is made of).
"""
import argparse
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch

from timing import best_of, peak_rss_mb, reset_peak_rss, rss_mb
from project_lib.core import load_study_params
from project_lib.synapse.study import SynapseStudyParams
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


def bench_generator(configs, count, repeats):
    print(f"\n### Generator (best of {repeats} passes over {count} cubes)\n\n| cube | voxel | cubes / s | ms / cube |\n|---|---|---|---|")
    for cfg in configs:
        data = SyntheticSynapses(cfg, seed=0)
        dt = best_of(lambda: [data[i] for i in range(count)], repeats) / count
        print(f"| {cfg.cube_size}³ | {cfg.voxel_nm:g} nm | {1 / dt:.1f} | {dt * 1e3:.0f} |")


def bench_training(size, batch, fmaps, repeats):
    """Contrastive training step (two views per cube, both read-outs' projectors, forward and backward): the original width
    against the profile's `fmaps`, the default and the channels-last-3d layout, float32 and bfloat16 autocast."""
    from project_lib.synapse.train import ContrastiveConfig, ContrastiveVGG, channels_last, contrastive_loss
    print(f"\n### Contrastive training step ({size}³, {batch} cubes = {2 * batch} views; best of {repeats}; the last row is the profile's choice)\n\n"
          "| width (fmaps) | network layout | precision | s / step | ms / view | speed-up |\n|---|---|---|---|---|---|")
    x, first = torch.rand(batch, 1, size, size, size) * 2 - 1, None
    for width, layout_name, bf16 in ((24, "default (contiguous)", False), (24, "channels_last_3d", False), (24, "channels_last_3d", True),
                                     (fmaps, "channels_last_3d", False), (fmaps, "channels_last_3d", True)):
        layout = channels_last if layout_name == "channels_last_3d" else (lambda t: t)
        torch.manual_seed(0)
        net = layout(ContrastiveVGG(VGG3D(input_size=size, fmaps=width, classifier_hidden=8)))
        opt, gen, config = torch.optim.AdamW(net.parameters(), lr=1e-3), torch.Generator().manual_seed(0), ContrastiveConfig(batch_size=batch, bf16=bf16)
        def step():
            loss = contrastive_loss(net, x, gen, config); opt.zero_grad(); loss.backward(); opt.step()
        step()
        t = best_of(step, repeats)
        first = first or t
        print(f"| {width} | {layout_name} | {'bfloat16 autocast' if bf16 else 'float32'} | {t:.3f} | {t / (2 * batch) * 1e3:.1f} | {first / t:.1f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny profile, fewer sizes, repeats and memory rows: a smoke check")
    parser.add_argument("--memory-only", action="store_true", help="only the section on where the peak memory goes")
    parser.add_argument("--training-only", action="store_true", help="only the section on the contrastive training step")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "extract": extract_and_report_rss(int(rest[0]), int(rest[1]), float(rest[2]))
        else: memory_component(kind, int(rest[0]), float(rest[1]), *map(int, rest[2:]))
        sys.exit()
    p = load_study_params("synapse", SynapseStudyParams, "tiny" if args.quick else "cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.memory_only:
        bench_memory_components(p.cube_size, p.voxel_nm, args.quick)
        sys.exit()
    if args.training_only:
        bench_training(p.cube_size, p.ssl_batch_size, p.fmaps, 1 if args.quick else 3)
        sys.exit()
    bench_extraction([p.cube_size] if args.quick else [p.cube_size, 80], 2 if args.quick else 4, 1 if args.quick else 3)
    bench_generator([GeneratorConfig(cube_size=p.cube_size, voxel_nm=p.voxel_nm), GeneratorConfig(cube_size=80, voxel_nm=8.0)],
                    2 if args.quick else 10, 1 if args.quick else 3)
    bench_training(p.cube_size, p.ssl_batch_size, p.fmaps, 1 if args.quick else 3)
    bench_memory([20, 40] if args.quick else [100, 1000], p.cube_size, p.voxel_nm)
    bench_memory_components(p.cube_size, p.voxel_nm, args.quick)
