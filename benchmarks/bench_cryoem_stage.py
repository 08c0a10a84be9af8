"""What the cryo-EM comparison's stage time is spent on, old way against new, in one run (cpu profile, reference condition):

1. training sets: every unit simulating its own (each arm of a seed again) against one cache per seed that the second arm
   finds by its recipe, for two seeds on two workers (what `train_study` runs);
2. the replay's fixed-threshold scores at a validation (4 alternative sets of 2 micrographs): `pixel_metrics` twice per set
   (ROC-AUC and AP of 200,000 pixels each time) against the four counts of `_fixed_threshold_scores`;
3. evaluation: the conditions one after another in one process against one process per condition (`evaluate_study`,
   n_jobs 2), from the trained units under outputs/<profile>/cryoem/runs (section `evaluation`, minutes).

Run: `.venv/bin/python benchmarks/bench_cryoem_stage.py [--sections caches replay evaluation]`.
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import project_lib  # first: the portable numerical paths
import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed

from project_lib.core import load_study_params, output_dir
from project_lib.cryoem.baselines import template_bank
from project_lib.cryoem.data import load_structure
from project_lib.cryoem.metrics import pixel_metrics
from project_lib.cryoem.stage import CryoEMStudyParams, simulate_condition
from project_lib.cryoem.study import evaluate_study
from project_lib.cryoem.train import _fixed_threshold_scores, cache_micrographs

SECTIONS = ("caches", "replay", "evaluation")


def _cache(train_set, folder):
    t0 = time.perf_counter(); cache_micrographs(train_set, folder); return time.perf_counter() - t0


def bench_caches(p, d):
    "Two seeds x two arms on two workers: per-unit caches (4 simulations) vs per-seed caches, arms staggered (2 + 2 reads)."
    rows, sets = [], [d.training_set(s) for s in (1, 2)]
    for name, plan in (("per unit (before)", [(s, f"{arm}-s{k}") for arm in ("unet", "attention") for k, s in enumerate(sets)]),
                       ("per seed, staggered (now)", [(s, f"s{k}") for k, s in enumerate(sets)] * 2)):
        root = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        # the first two start together; the next two once a worker is free: the seed's cache is complete by then
        first = Parallel(n_jobs=2, backend="loky")(delayed(_cache)(s, root / f) for s, f in plan[:2])
        second = Parallel(n_jobs=2, backend="loky")(delayed(_cache)(s, root / f) for s, f in plan[2:])
        rows.append({"training sets": name, "wall s": time.perf_counter() - t0, "cpu s (sum over units)": sum(first) + sum(second)})
        shutil.rmtree(root)
    return pd.DataFrame(rows)


def _old_fixed_threshold_scores(probs, micrographs, threshold=0.5):
    truth = np.stack([m.mask for m in micrographs])
    return {"pixel_f1": pixel_metrics(probs, truth, threshold)["f1"],
            "thresholded_auc": pixel_metrics((probs >= threshold).astype(float), truth)["roc_auc"]}


def bench_replay(p, d):
    alt = [list(v) for v in d.alt_sets.values()]
    rng = np.random.default_rng(0)
    maps = [np.clip(0.3 * np.stack([m.mask for m in s]) + rng.uniform(0, 0.6, (len(s), p.size_px, p.size_px)), 0, 1) for s in alt]
    rows = []
    for name, fn in (("pixel_metrics twice (before)", _old_fixed_threshold_scores), ("four counts (now)", _fixed_threshold_scores)):
        t0 = time.perf_counter(); out = [fn(m, s) for m, s in zip(maps, alt)]
        rows.append({"replay scores per validation": name, "s": time.perf_counter() - t0, "pixel F1 (set 0)": out[0]["pixel_f1"],
                     "thresholded AUC (set 0)": out[0]["thresholded_auc"]})
    return pd.DataFrame(rows)


def bench_evaluation(p, profile):
    runs = output_dir("cryoem", profile) / "runs"
    templates = template_bank([load_structure(t) for t in p.particle_types], p.pixel_size_a, p.template_orientations, seed=p.data_seed)
    rows, scored = [], {}
    for jobs in (1, 2):
        t0 = time.perf_counter(); scored[jobs] = evaluate_study(p, runs, templates, "cpu", n_jobs=jobs)
        rows.append({"evaluation": f"{jobs} process(es), one torch thread each", "s": time.perf_counter() - t0})
    same = all(scored[1][c].per_micrograph.equals(scored[2][c].per_micrograph) for c in scored[1])
    return pd.DataFrame(rows).assign(**{"per-micrograph scores identical": same})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    p = load_study_params("cryoem", CryoEMStudyParams, args.profile)
    d = simulate_condition(p.reference_condition, p.micrograph_config(), p, replay=True)
    print(f"{args.profile} profile, reference condition: {p.n_train} training micrographs of {p.size_px}² px per seed")
    if "caches" in args.sections: print(bench_caches(p, d).round(2).to_markdown(index=False), "\n")
    if "replay" in args.sections: print(bench_replay(p, d).round(4).to_markdown(index=False), "\n")
    if "evaluation" in args.sections: print(bench_evaluation(p, args.profile).round(1).to_markdown(index=False))


if __name__ == "__main__":
    main()
