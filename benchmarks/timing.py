"""Timing and memory helpers shared by the benchmark scripts (run as `python benchmarks/bench_*.py`, so this folder is on sys.path)."""
import re
import time
from pathlib import Path


def best_of(fn, repeats):
    """Shortest wall time of `repeats` calls of `fn`, in seconds: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)


def _status_mb(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def rss_mb():
    """This process's resident set size now (MB; Linux)."""
    return _status_mb("VmRSS")


def reset_peak_rss():
    """Reset this process's peak RSS (VmHWM, Linux) to its current RSS and return that (MB): the peak read later is then
    not masked by earlier transient peaks (imports: torch alone is ~0.5 GB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def peak_rss_mb():
    """This process's peak RSS (VmHWM, MB; Linux). Unlike `resource.getrusage(RUSAGE_SELF).ru_maxrss`, it counts only this
    process's own memory: a child started by subprocess (vfork + exec) reports in ru_maxrss at least its parent's peak."""
    return _status_mb("VmHWM")


# Kernel switches that imitate another CPU on this one (what an AVX2-only or an older x86-64 machine runs).
MACHINE_VARIANTS = {
    "AVX2 kernels (torch, oneDNN, MKL)": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "scalar / SSE4.1 kernels": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
