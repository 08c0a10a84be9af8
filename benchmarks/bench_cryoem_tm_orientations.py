"""How many projections per particle type template matching needs: particle F1 of the study's template matching (CTF and MTF,
carbon masked, thresholds chosen on the validation micrographs) on test micrographs of the reference condition, against the
number of random orientations in the bank, with the time per micrograph. The study uses `cryoem_analysis.<profile>.template_orientations`.

Run: `.venv/bin/python benchmarks/bench_cryoem_tm_orientations.py [--profile cpu] [--test 8]`.
"""
import argparse
import time

import project_lib  # first: the portable numerical paths
import numpy as np
import pandas as pd

from project_lib.core import load_study_params
from project_lib.cryoem.baselines import image_key, micrograph_ctf, simulation_internals, template_bank, template_match_map
from project_lib.cryoem.data import load_structure
from project_lib.cryoem.stage import CryoEMStudyParams, simulate_condition
from project_lib.cryoem.train import choose_thresholds, score_picker


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--test", type=int, default=8, help="test micrographs scored (the first n of the reference condition's)")
    parser.add_argument("--orientations", type=int, nargs="+", default=[6, 12, 24, 48])
    args = parser.parse_args()
    p = load_study_params("cryoem", CryoEMStudyParams, args.profile)
    d = simulate_condition(p.reference_condition, p.micrograph_config(), p, replay=False)
    val, test = list(d.sets["val"]), list(d.sets["test"][:args.test])
    holes = {image_key(m.image): clear for s in (d.sets["val"], d.sets["test"][:args.test]) for m, *_, clear in simulation_internals(s)}
    structures, cfg, rows = [load_structure(t) for t in p.particle_types], d.config, []
    for n in args.orientations:
        bank = template_bank(structures, p.pixel_size_a, n, seed=p.data_seed)
        maps = lambda mics: np.stack([template_match_map(m.image, bank, micrograph_ctf(m, cfg), cfg.pixel_size_a, cfg.detector_pixel_a,
                                                         holes[image_key(m.image)]) for m in mics])
        start = time.perf_counter()
        test_maps = maps(test)
        seconds = (time.perf_counter() - start) / len(test)
        val_maps = maps(val)
        table, _ = score_picker(val_maps, test_maps, val, test, choose_thresholds(val_maps, val))
        rows.append({"orientations per type": n, "templates": sum(map(len, bank)), "test particle F1 (mean)": table.particle_f1.mean(),
                     "F1 min over micrographs": table.particle_f1.min(), "s per micrograph": seconds})
    print(f"{args.profile} profile, reference condition, {len(val)} validation and {len(test)} test micrographs of {p.size_px}² px")
    print(pd.DataFrame(rows).round(4).to_markdown(index=False))


if __name__ == "__main__":
    main()
