"""Trials per minute of `autocompress search` with 1 and with 2 worker processes on this machine.

Same study settings for every run, a fresh study each time (SQLite storage and MLflow store in a
temporary folder), the baseline trained once beforehand and cached, so no run pays for it; no warm
start and no final phase (they run once, in the invoking process, whatever the worker count). Two
rates per run: trials / wall-clock of the whole command (process start, data, workers' start up
included), and trials / span from the first trial's start to the last trial's end (the steady
rate). The 1-minute load average before each run is recorded: the machine is shared.

    python bench/workers.py                                   # fashion-mnist, 12 trials, 1 vs 2
    python bench/workers.py --data digits --trials 10 --epochs 3 --max-batches 10

Writes bench/results/workers.jsonl (one line per run) and bench/results/workers.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import optuna

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def run(workers: int, a: argparse.Namespace, tmp: str, tag: str) -> dict:
    """One fresh search; returns its timings."""
    out = os.path.join(tmp, tag)
    cmd = [sys.executable, "-m", "autocompress", "search", "--budget", a.budget, "--model", a.model,
           "--data", a.data, "--trials", str(a.trials), "--epochs", str(a.epochs), "--max-batches", str(a.max_batches),
           "--seed", "0", "--no-progress", "--no-warm-start", "--final-top", "0", "--study", "bench", "--out", out,
           "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": ROOT, "AUTOCOMPRESS_CACHE": os.path.join(tmp, "cache")}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    trials = optuna.load_study(study_name="bench", storage=f"sqlite:///{out}/optuna.db").trials
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return {"workers": workers, "trials": len(trials), "wall_s": round(wall, 1), "span_s": round(span, 1),
            "trials_per_min_wall": round(60 * len(trials) / wall, 2),
            "trials_per_min_span": round(60 * len(trials) / span, 2), "load1_before": round(load, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--budget", default="20x")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--max-batches", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = argparse.Namespace(**{**vars(a), "trials": 1})
        run(1, warm, tmp, "warm")  # trains and caches the baseline
        for r in range(a.repeat):
            for workers in (1, 2):  # alternate, so a change of load hits both
                row = run(workers, a, tmp, f"w{workers}-{r}")
                row.update(model=a.model, data=a.data, budget=a.budget, epochs=a.epochs, max_batches=a.max_batches,
                           repeat=r,
                           cpus=os.cpu_count(), machine=platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
                print(json.dumps(row), flush=True)
                rows.append(row)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "workers.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    write_table(rows, a)


def write_table(rows: list[dict], a: argparse.Namespace) -> None:
    """bench/results/workers.md: every run, then the mean rates and the speed-up of 2 over 1."""
    mean = {w: [sum(r[k] for r in rows if r["workers"] == w) / sum(r["workers"] == w for r in rows)
                for k in ("trials_per_min_wall", "trials_per_min_span")] for w in (1, 2)}
    lines = [f"# 1 vs 2 workers: {a.model} on {a.data}, budget {a.budget}, {a.trials} trials, {a.epochs} epoch(s), "
             f"--max-batches {a.max_batches}, {os.cpu_count()} CPU cores", "",
             "| workers | repeat | wall s | trials/min (wall) | span s | trials/min (span) | load before |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['repeat']} | {r['wall_s']} | {r['trials_per_min_wall']} | {r['span_s']} | "
              f"{r['trials_per_min_span']} | {r['load1_before']} |" for r in rows]
    lines += ["", f"Speed-up of 2 workers over 1: {mean[2][0] / mean[1][0]:.2f}x by wall clock, "
              f"{mean[2][1] / mean[1][1]:.2f}x by trial span (means over repeats)."]
    with open(os.path.join(RESULTS, "workers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
