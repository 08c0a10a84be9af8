"""Generated data are the same bits on any x86-64 machine: golden fingerprints of every study's tiny data.

`tests/golden_hashes.json` was written by `python tests/golden_data.py > tests/golden_hashes.json`; rewrite it only
for an intended change of a generator (and say so in the commit). Another kind of machine is imitated by switching
the kernels that differ between CPUs: OpenBLAS's, torch's and oneDNN's instruction sets, and the thread counts.
"""
import json, os, platform, re, subprocess, sys
from pathlib import Path

import pytest

import project_lib

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests/golden_hashes.json").read_text())
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
OTHER_KERNELS = {"OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def _fingerprints(**env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in project_lib.PORTABLE_ENV}   # the pin comes from importing project_lib
    return subprocess.run([sys.executable, "tests/golden_data.py"], cwd=ROOT, env=base | env, capture_output=True, text=True)


@pytest.mark.skipif(not X86_64, reason="the golden fingerprints are x86-64's")
def test_generated_data_match_the_golden_fingerprints():
    run = _fingerprints()
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == GOLDEN


@pytest.mark.skipif(not X86_64, reason="the golden fingerprints are x86-64's")
def test_other_kernels_and_thread_counts_generate_the_same_bits():
    run = _fingerprints(**OTHER_KERNELS)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == GOLDEN


@pytest.mark.skipif(not X86_64, reason="x86-64 only")
def test_generators_refuse_machine_specific_numpy_kernels():
    from numpy._core._multiarray_umath import __cpu_features__
    if not __cpu_features__.get("AVX2"): pytest.skip("this CPU has no kernels above x86-64-v2 to dispatch to")
    run = subprocess.run([sys.executable, "-c", "import numpy; import sys; sys.argv = ['x', 'cryoem']; exec(open('tests/golden_data.py').read())"],
                         cwd=ROOT, env={k: v for k, v in os.environ.items() if k not in project_lib.PORTABLE_ENV}, capture_output=True, text=True)
    assert run.returncode != 0 and "cryo-EM micrographs must be generated with portable numerics" in run.stderr


def test_makefile_exports_the_portable_environment():
    "make test and make repro set the same variables as project_lib, so that tools importing NumPy first are pinned too."
    makefile = (ROOT / "Makefile").read_text()
    exported = dict(re.findall(r"^export (\w+) := (.*)$", makefile, re.M))
    assert {k: exported.get(k) for k in project_lib.PORTABLE_ENV} == project_lib.PORTABLE_ENV
