"""Deepfake cascade: what does the issue's full design of 5 benchmark draws x 3 training seeds add over the cpu profile's 5 x 1
(plus 3 seeds on the first draw)? Runs the cascade's training and evaluation notebooks with `draw_seeds` overridden, into a scratch
output root, and prints the headline numbers beside those of `outputs/cpu/cascade/metrics.json` (the committed run).

The trainings already in `outputs/cpu/cascade/runs` are copied first, so only the extra seeds train (units are reused by identity:
the same configuration, data and code give the same record). Nothing tracked is written. Run from the project root:
`.venv/bin/python benchmarks/scan_cascade_draw_seeds.py [--draw-seeds 0 1 2] [--out /tmp/cascade-scan]`
(2026-12-06 on 2 cores: 890 s of training for the 32 extra units, 243 s of evaluation).
"""
import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

HEADLINE = {"LightGBM stack": "draw_auc/LightGBM stack", "best single expert": "draw_auc/best single expert",
            "filter": "draw_auc/filter", "cascade": "draw_auc/cascade", "experts-only stack": "draw_auc/experts-only stack",
            "GenConViT ED": "draw_auc/genconvit_ed", "null (shuffled labels)": "draw_auc/null (shuffled labels)",
            "stack - best single expert": "verdict"}


def scratch_params(out: Path, draw_seeds: list[int]) -> Path:
    "A copy of params.yaml with the cpu profile's `draw_seeds` replaced (comments are not kept: a scratch file)."
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["cascade"]["cpu"]["draw_seeds"] = draw_seeds
    path = out / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_notebook(name: str, out: Path, params: Path) -> float:
    "Seconds to run `nbs/studies/<name>.ipynb` with papermill into the scratch output root."
    target = out / "outputs" / "cpu" / "cascade" / (f"train/{name}.ipynb" if name.endswith("_train") else f"{name}.ipynb")
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["papermill", "-k", "python3", "--no-progress-bar", "--cwd", ".", f"nbs/studies/{name}.ipynb", str(target),
                    "-p", "profile", "cpu", "-p", "output_root", str(out / "outputs"), "-p", "params_file", str(params)], check=True)
    return time.perf_counter() - t0


def interval(metrics: dict, key: str) -> str:
    group = metrics
    for part in key.split("/"): group = group[part]
    return f"{group['estimate']:+.3f} [{group['low']:+.3f}, {group['high']:+.3f}]" if key == "verdict" else f"{group['estimate']:.3f} [{group['low']:.3f}, {group['high']:.3f}]"


def main(draw_seeds: list[int], out: Path) -> None:
    runs = Path("outputs/cpu/cascade/runs")
    if not runs.exists(): raise SystemExit(f"{runs} is missing: run `dvc repro train_cascade` first (its trainings are reused)")
    if out.exists(): raise SystemExit(f"{out} exists: give another --out or remove it")
    shutil.copytree(runs, out / "outputs" / "cpu" / "cascade" / "runs")
    params = scratch_params(out, draw_seeds)
    seconds = {name: run_notebook(name, out, params) for name in ("cascade_train", "cascade")}
    base, scan = (json.loads(Path(p).read_text()) for p in ("outputs/cpu/cascade/metrics.json", out / "outputs/cpu/cascade/metrics.json"))
    print(f"\ntraining {seconds['cascade_train']:.0f} s (only the units not already trained), evaluation {seconds['cascade']:.0f} s\n")
    print(f"| test AUC over draws | committed cpu profile | draw_seeds {draw_seeds} |\n|---|---|---|")
    for label, key in HEADLINE.items(): print(f"| {label} | {interval(base, key)} | {interval(scan, key)} |")
    print(f"| smallest detectable effect | {base['verdict']['mde']:.3f} | {scan['verdict']['mde']:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draw-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/cascade-scan"))
    args = parser.parse_args()
    main(args.draw_seeds, args.out)
