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


def bench_training(size, batch, repeats):
    """Contrastive training step (two views per cube, forward and backward) in the default and the channels-last-3d layout."""
    from project_lib.synapse.train import ContrastiveVGG, augment, channels_last, nt_xent
    print(f"\n### Contrastive training step ({size}³, {batch} cubes = {2 * batch} views; best of {repeats})\n\n"
          "| memory layout | s / step | ms / view |\n|---|---|---|")
    x = torch.rand(batch, 1, size, size, size) * 2 - 1
    for name, layout in (("default (contiguous)", lambda t: t), ("channels_last_3d (used)", channels_last)):
        torch.manual_seed(0)
        net = layout(ContrastiveVGG(VGG3D(input_size=size, classifier_hidden=8)))
        opt, gen = torch.optim.AdamW(net.parameters(), lr=1e-3), torch.Generator().manual_seed(0)
        def step():
            z = net(layout(torch.cat([augment(x, gen), augment(x, gen)])))
            loss = nt_xent(z[:batch], z[batch:]); opt.zero_grad(); loss.backward(); opt.step()
        step()
        t = best_of(step, repeats)
        print(f"| {name} | {t:.3f} | {t / (2 * batch) * 1e3:.1f} |")


def run_child(*args):
    """stdout of this script run with `--child *args` in a fresh process (the memory sections measure one thing per process)."""
    return subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, check=True).stdout


def extract_and_report_rss(n_cubes, size, voxel_nm):
    """Run in a child process: extract standard features of n_cubes generated cubes; print the rows, the peak RSS (MB), the
    wall time, the feature table's MB and the RSS once imported (MB)."""
    imported = rss_mb()
    axons = -(-n_cubes // (4 * 5))
    cfg = GeneratorConfig(cube_size=size, voxel_nm=voxel_nm, n_bboxes=4, axons_per_bbox=axons, synapses_per_axon=5)
    data = SyntheticSynapses(cfg, seed=0)
    t0 = time.perf_counter()
    features = extract_features(VGG3D(input_size=size, classifier_hidden=256), data, ExtractionConfig(batch_size=8, progress=False))
    print(len(features), peak_rss_mb(), time.perf_counter() - t0, features.memory_usage(deep=True).sum() / 2 ** 20, imported)


def bench_memory(counts, size, voxel_nm):
    print(f"\n### Peak memory of extracting many cubes ({size}³, standard method, batch 8, one process per count)\n")
    print(f"Peak RSS: the child's own (VmHWM). Its ru_maxrss would read at least this process's peak, now "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB: a child started by subprocess inherits it.\n")
    print("| cubes | peak RSS (MB) | feature table (MB) | wall (s) | cubes / s incl. generation |\n|---|---|---|---|---|")
    for n in counts:
        rows, rss, wall, table_mb, _ = run_child("extract", n, size, voxel_nm).split()
        print(f"| {rows} | {float(rss):.0f} | {float(table_mb):.1f} | {float(wall):.0f} | {int(rows) / float(wall):.1f} |")


def memory_component(name, size, voxel_nm, batch, hidden, mkldnn):
    """Run in a child process: one part of extraction's peak memory on its own; print the RSS once imported, the peak RSS
    after that (VmHWM reset once imported; for "imports", the peak while importing), both MB, and a detail."""
    import_peak, imported = peak_rss_mb(), reset_peak_rss()
    if name == "imports":
        print(imported, import_peak, f"torch {torch.__version__} + project_lib + this script's imports; {imported:.0f} MB resident once imported")
    elif name == "idle":
        print(imported, peak_rss_mb(), f"its ru_maxrss reads {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    elif name == "inherit":
        a = np.ones(batch * 2 ** 20 // 8); a[:] = 2; del a
        base, peak, detail = run_child("idle", size, voxel_nm, batch, hidden, mkldnn).split(maxsplit=2)
        print(base, peak, f"the parent peaked at {peak_rss_mb():.0f} MB and freed the 1 GB before starting it; {detail}")
    elif name == "generate":
        data = SyntheticSynapses(GeneratorConfig(cube_size=size, voxel_nm=voxel_nm), seed=0)
        x = cubes_to_input([prepare_cube(data[i]) for i in range(batch)])
        peak = peak_rss_mb()
        tracemalloc.start(); data[0]; numpy_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20; tracemalloc.stop()
        print(imported, peak, f"{batch} cubes generated and prepared (input batch {x.nbytes / 2 ** 20:.1f} MB); "
                              f"traced peak of one `data[i]`: {numpy_peak:.0f} MB")
    elif name == "forward":
        torch.backends.mkldnn.enabled = bool(mkldnn)
        model = VGG3D(input_size=size, classifier_hidden=hidden).eval()
        built, x = peak_rss_mb(), torch.rand(batch, 1, size, size, size) * 2 - 1
        with torch.no_grad(): model.features(x)
        mb = lambda module: sum(p.numel() * p.element_size() for p in module.parameters()) / 2 ** 20
        print(imported, peak_rss_mb(), f"weights {mb(model):.1f} MB (head {mb(model.classifier):.1f}); "
                                       f"+{built - imported:.0f} MB building, +{peak_rss_mb() - built:.0f} MB forward")
    else: raise ValueError(f"unknown memory component {name!r}")


def bench_memory_components(size, voxel_nm, quick):
    """Where the peak memory of extraction goes: each part measured alone in a fresh process (VmHWM)."""
    print(f"\n### Where the peak memory goes ({size}³ at {voxel_nm:g} nm, batch 8; one child process per row)\n")
    print("| component | peak RSS (MB) | above the imports (MB) | detail |\n|---|---|---|---|")
    forward = lambda b, h=256, mkl=1, s=size: ("forward", s, voxel_nm, b, h, mkl)
    rows = [("imports only", ("imports", size, voxel_nm, 0, 0, 1))]
    if not quick: rows += [(f"generator, no network ({size}³)", ("generate", size, voxel_nm, 8, 0, 1)),
                           ("generator, no network (80³ at 8 nm)", ("generate", 80, 8.0, 8, 0, 1))]
    rows += [(f"`model.features` forward, classifier_hidden=256, batch {b}", forward(b)) for b in ((8,) if quick else (1, 4, 8))]
    if not quick:
        rows += [("same, classifier_hidden=4096 (default), batch 8", forward(8, 4096)),
                 ("same, classifier_hidden=256, batch 8, `torch.backends.mkldnn.enabled = False`", forward(8, mkl=0)),
                 ("80³, classifier_hidden=4096, batch 4 (the extraction section, run in the parent first)", forward(4, 4096, s=80)),
                 ("idle child started by a process after a 1 GB peak (subprocess.run, as the sections above)",
                  ("inherit", size, voxel_nm, 1024, 0, 1))]
    for label, args in rows:
        base, peak, detail = run_child(*args).split(maxsplit=2)
        above = "" if args[0] == "imports" else f"{float(peak) - float(base):.0f}"
        print(f"| {label} | {float(peak):.0f} | {above} | {detail.strip()} |")
    if not quick:
        rows_, peak, wall, _, base = run_child("extract", 20, size, voxel_nm).split()
        print(f"| `extract_features` of {rows_} generated cubes, batch 8 (the child of the section above) | {float(peak):.0f} | "
              f"{float(peak) - float(base):.0f} | wall {float(wall):.0f} s |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny profile, fewer sizes, repeats and memory rows: a smoke check")
    parser.add_argument("--memory-only", action="store_true", help="only the section on where the peak memory goes")
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
    bench_extraction([p.cube_size] if args.quick else [p.cube_size, 80], 2 if args.quick else 4, 1 if args.quick else 3)
    bench_generator([GeneratorConfig(cube_size=p.cube_size, voxel_nm=p.voxel_nm), GeneratorConfig(cube_size=80, voxel_nm=8.0)],
                    2 if args.quick else 10, 1 if args.quick else 3)
    bench_training(p.cube_size, p.ssl_batch_size, 1 if args.quick else 5)
    bench_memory([20, 40] if args.quick else [100, 1000], p.cube_size, p.voxel_nm)
    bench_memory_components(p.cube_size, p.voxel_nm, args.quick)
