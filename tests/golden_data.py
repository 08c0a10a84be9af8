"""Fingerprints of every study's generated data at the tiny profile, printed as JSON (run by tests/test_golden_data.py).

Run in a fresh interpreter so that `project_lib` is imported before NumPy, as the stages do:
`python tests/golden_data.py [study ...]`. The fingerprints cover everything a training is keyed on: images, masks,
labels and metadata (the cryo-EM data hash includes the particle SNRs, whose last digits depend on NumPy's SIMD kernels).
"""
import project_lib  # noqa: F401  (first: pins the portable numerical paths)
import hashlib, json, sys, tempfile
from pathlib import Path

import numpy as np

from project_lib.core import load_study_params
from project_lib.engine import Executor


def _hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays: h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

def cryoem() -> dict:
    from project_lib.cryoem.stage import CryoEMStudyParams, simulate_condition
    p = load_study_params("cryoem", CryoEMStudyParams, "tiny")
    name, cfg = next(iter(p.micrograph_configs().items()))
    d = simulate_condition(name, cfg, p, replay=False)
    mics = [m for s in d.sets.values() for m in s]
    from project_lib.cryoem.train import data_hash
    return {"cryoem data hash": d.data_hash, "cryoem training hash": data_hash(list(d.training_set(1))), "cryoem masks": _hash(*[m.mask for m in mics])}

def cryoem_al() -> dict:
    from project_lib.cryoem.al import ALStudyParams, simulate_sets
    from project_lib.cryoem.train import data_hash
    sets = simulate_sets(load_study_params("cryoem_al", ALStudyParams, "tiny"))
    return {f"cryoem_al {k} data hash": data_hash(v) for k, v in sets.items()}

def synapse() -> dict:
    from project_lib.synapse.data import SyntheticSynapses
    from project_lib.synapse.units import SynapseStudyParams
    p = load_study_params("synapse", SynapseStudyParams, "tiny")
    data = p.pretraining_set().load()
    cubes = SyntheticSynapses(p.generator_config(), p.eval_seeds[0])
    return {"synapse pretraining inputs": _hash(data["train_x"], data["val_x"]),
            "synapse evaluation cubes": _hash(*[c for i in range(len(cubes)) for c in (cubes[i].raw, cubes[i].instance, cubes[i].semantic)])}

def cascade() -> dict:
    from project_lib.cascade.units import CascadeParams, benchmark_draft, build_data, load_data
    p = load_study_params("cascade", CascadeParams, "tiny")
    draft = benchmark_draft(p)
    with tempfile.TemporaryDirectory() as runs:
        build_data(p, Path(runs), Executor(n_workers=1))   # the forgers are part of the generator; the training stage builds the draws with them
        _, bench = load_data(p, Path(runs))
    return {"cascade crops": _hash(draft.forger_crops()), "cascade benchmark": bench.data_hash()}

def cascade_forger() -> dict:
    "A forger at the cpu profile's size and epochs, on 256 of its crops (short): in float32 this training followed the CPU's kernels."
    from project_lib.cascade.data import load_forger, render, train_forger
    from project_lib.cascade.units import CascadeParams, benchmark_draft
    p = load_study_params("cascade", CascadeParams, "cpu")
    draft = benchmark_draft(p)
    with tempfile.TemporaryDirectory() as unit:
        record = train_forger(unit, "cpu", draft.forger_crops(256), "transposed", p.forger_epochs, p.data_seed)
        return {"cascade forger at the cpu profile": _hash(render(load_forger(unit, record), draft.crops[:256]))}

def mfn() -> dict:
    from project_lib.mfn.dataset import generate_dataset
    from project_lib.mfn.stage import MFNStudyParams, study_units
    unit = study_units(load_study_params("mfn", MFNStudyParams, "tiny"))[0]
    with tempfile.TemporaryDirectory() as t:
        path = Path(t) / "dataset.parquet"
        df = generate_dataset(unit.kwargs["configs"], path, unit.kwargs["feature_config"], 1, None, progress=False)
        return {"mfn dataset values": _hash(df.select_dtypes("number").to_numpy(np.float64)),
                "mfn dataset parquet": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}

STUDIES = {"cryoem": cryoem, "cryoem_al": cryoem_al, "synapse": synapse, "cascade": cascade, "cascade_forger": cascade_forger, "mfn": mfn}

if __name__ == "__main__":
    print(json.dumps({k: v for s in (sys.argv[1:] or STUDIES) for k, v in STUDIES[s]().items()}, sort_keys=True, indent=1))
