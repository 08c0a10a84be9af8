"""Library of the compendium (exported from nbs/ by nbdev; this file is the only one written by hand).

Importing `project_lib` first pins the numerical code paths that differ between CPUs, so that generated data are
bitwise identical on any x86-64 machine: NumPy's runtime-dispatched SIMD kernels (AVX2/AVX-512 versions of exp,
log, sin, reductions, ...) are limited to the x86-64-v2 baseline that every x86-64 CPU in use runs, and numba
compiles for a generic CPU. `core.numerics()` reports what is in force; generators refuse to run without it.
Both must be set before NumPy or numba is first imported; a value already in the environment wins.
"""
import os as _os, platform as _platform

__version__ = "0.1.0"

PORTABLE_ENV = {"NUMBA_CPU_NAME": "generic",                 # numba: no host-specific instructions
                "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}        # deterministic cuBLAS when torch runs deterministic algorithms
if _platform.machine().lower() in ("x86_64", "amd64"):
    PORTABLE_ENV["NPY_DISABLE_CPU_FEATURES"] = "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"   # NumPy's dispatched kernels above x86-64-v2
for _k, _v in PORTABLE_ENV.items(): _os.environ.setdefault(_k, _v)
