"""MFN dataset: exact Parquet schema, byte-identical reruns, Dask backend, CLI."""
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from project_lib.mfn.dataset import PARQUET_SCHEMA, generate_dataset, read_dataset, sweep, thread_budget
from project_lib.mfn.features import FEATURE_NAMES
from project_lib.mfn.sim import SimulationConfig

CONFIGS = sweep([16, 24], [0.1, 0.2], [0, 1], steps=[30])


def test_schema_is_section_9_plus_the_diffusion_ratio(tmp_path):
    df = generate_dataset(CONFIGS, tmp_path / "d.parquet", progress=False)
    schema = pq.read_schema(tmp_path / "d.parquet").remove_metadata()
    expected = [("sim_id", pa.int64()), ("random_seed", pa.int64()), ("grid_size", pa.int64()), ("steps", pa.int64()),
                ("alpha", pa.float64()), ("turing_enabled", pa.bool_()), ("diffusion_ratio", pa.float64())] + [(n, pa.float64()) for n in FEATURE_NAMES]
    assert [(f.name, f.type) for f in schema] == expected
    assert df.sim_id.tolist() == list(range(len(CONFIGS)))


def test_same_seed_gives_identical_parquet_bytes(tmp_path):
    generate_dataset(CONFIGS, tmp_path / "a.parquet", progress=False)
    generate_dataset(CONFIGS, tmp_path / "b.parquet", n_jobs=2, progress=False)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    generate_dataset(sweep([16, 24], [0.1, 0.2], [5, 6], steps=[30]), tmp_path / "c.parquet", progress=False)
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()


@pytest.mark.parametrize("workers, threads, processes", [(1, 2, False), (2, 1, True)])
def test_dask_backend_gives_the_same_dataset(tmp_path, workers, threads, processes):
    # in-process threads, and real worker processes (a pickled task, numba threads set in another process)
    distributed = pytest.importorskip("distributed")
    generate_dataset(CONFIGS, tmp_path / "local.parquet", progress=False)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=threads, processes=processes, dashboard_address=None) as cluster:
        generate_dataset(CONFIGS, tmp_path / "dask.parquet", n_jobs=2, scheduler_address=cluster.scheduler_address, progress=False)
    assert (tmp_path / "local.parquet").read_bytes() == (tmp_path / "dask.parquet").read_bytes()


@pytest.mark.parametrize("n_jobs, cpus, expected", [(-1, 8, (8, 1)), (-2, 8, (7, 1)), (1, 8, (1, 8)), (2, 8, (2, 4)), (3, 8, (3, 2)),
                                                     (16, 8, (16, 1))])
def test_thread_budget_never_oversubscribes_the_cores(n_jobs, cpus, expected):
    # -1 used to give every one of cpu_count workers cpu_count numba threads
    workers, threads = thread_budget(n_jobs, cpus)
    assert (workers, threads) == expected and (workers * threads <= cpus or threads == 1)


def test_zero_jobs_is_refused():
    with pytest.raises(ValueError, match="n_jobs must be a non-zero integer"):
        thread_budget(0)


def test_failed_generation_leaves_the_old_file(tmp_path):
    path = tmp_path / "d.parquet"
    generate_dataset(CONFIGS[:2], path, progress=False)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        generate_dataset(CONFIGS[:1] + ["not a config"], path, progress=False)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["d.parquet"]


@pytest.mark.parametrize("content, message", [(b"garbage", "not a readable Parquet"), (None, "does not exist")])
def test_corrupt_or_missing_dataset(tmp_path, content, message):
    path = tmp_path / "x.parquet"
    if content is not None: path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_dataset(path)


def test_wrong_schema_is_refused(tmp_path):
    pq.write_table(pa.table({"sim_id": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="MFN schema"):
        read_dataset(tmp_path / "other.parquet")


def test_cli_help_and_run(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "project_lib.mfn", *args], capture_output=True, text=True)
    help_ = run("--help")
    assert help_.returncode == 0 and "--scheduler-address" in help_.stdout
    out = tmp_path / "cli.parquet"
    ok = run("--output", str(out), "--grid-sizes", "16", "--alphas", "0.1", "0.2", "--seeds", "0", "--steps", "20", "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert len(read_dataset(out)[0]) == 4
    for args, message in ((("--alphas", "0.5"), "alpha=0.5 > 0.25"), (("--grid-sizes", "-16"), "grid_size must be an integer >= 4"),
                          (("--n-jobs", "0"), "n_jobs must be a non-zero integer"), (("--seeds", "0", "0"), "seeds has duplicate values"),
                          (("--grid-sizes", "97"), "grid_size 97 gives 0 box size")):
        bad = run("--output", str(out), *args, "--quiet")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    for target, message in ((tmp_path, "is a directory"), (tmp_path / "missing" / "x.parquet", "does not exist")):
        bad = run("--output", str(target), "--quiet")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_cli_refuses_the_third_reviews_cases_before_simulating_and_ctrl_c_ends_cleanly(tmp_path):
    import signal
    import time
    run = lambda *args: subprocess.run([sys.executable, "-m", "project_lib.mfn", *args], capture_output=True, text=True)
    out = tmp_path / "x.parquet"
    for args, message in ((("--output", str(out), "--n-jobs", "-100"), "n_jobs = -100 asks for all cores but 99"),
                          (("--output", str(tmp_path / "x.csv")), "give a path ending in .parquet"),
                          (("--output", "/proc/x.parquet"), "folder /proc is not writable"),
                          (("--output", str(out), "--scheduler-address", "tcp://127.0.0.1:1"), "no Dask scheduler answered")):
        t0 = time.perf_counter()
        bad = run(*args, "--quiet")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert time.perf_counter() - t0 < 60 and not out.exists()
    log = tmp_path.parent / f"{tmp_path.name}-stderr.txt"             # outside the output folder, which must stay empty
    with open(log, "w") as stderr:                                    # many short simulations: the interrupt lands between two of them soon
        long = subprocess.Popen([sys.executable, "-m", "project_lib.mfn", "--output", str(out), "--grid-sizes", "32", "--steps", "200",
                                 "--seeds", *map(str, range(2000))], stderr=stderr, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # pytest-xdist workers ignore SIGINT, and children inherit that
        deadline = time.monotonic() + 120
        while "simulations" not in log.read_text() and time.monotonic() < deadline: time.sleep(0.5)   # the progress bar: past the checks
        long.send_signal(signal.SIGINT)
        long.wait(timeout=120)
    err = log.read_text()
    assert long.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())          # nothing half-written


def test_library_edges_of_the_third_review(tmp_path):
    with pytest.raises(ValueError, match=r"grid_sizes must be integers, got \[16.5\]"):
        sweep([16.5], [0.1], [0])
    assert [c.grid_size for c in sweep([np.int64(16), 32.0], [0.1], [0], turing=(True,))] == [16, 32]   # numpy integers and whole floats are integers
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_dataset(tmp_path)
    assert SimulationConfig(spike_probability=np.float32(0.2)).spike_probability == pytest.approx(0.2)   # numpy scalars are numbers
    with pytest.raises(ValueError, match="n_jobs = -3 asks for all cores but 2 of 2"):
        thread_budget(-3, cpus=2)
    assert thread_budget(-2, cpus=2) == (1, 2)
