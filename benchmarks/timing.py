"""Timing helper shared by the benchmark scripts (run as `python benchmarks/bench_*.py`, so this folder is on sys.path)."""
import time


def best_of(fn, repeats):
    """Shortest wall time of `repeats` calls of `fn`, in seconds: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)
