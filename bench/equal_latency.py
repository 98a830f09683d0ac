"""Search vs the uniform channel plan under a CPU latency budget, at equal wall-clock time (issue 14).

The budget is a batch-1 speed-up of --divide (3 by default) over the fp32 original, each model
timed beside it: the shared machine's speed drifts too much for one absolute budget (the fp32
original read 0.43 ms and 0.73 ms at the starts of two runs an hour apart). For each seed both
arms get the same wall-clock time T (the baseline is trained or loaded before either clock
starts; both use the same train / validation split):

- U: the uniform channel plan, every layer whose space allows it losing the same fraction of
  its channels, int8 everywhere. The fraction is the least on a 0.05 grid whose deployed model
  (int8 kernels, the faster engine) reaches the speed-up; that timing is on U's clock. Then it is
  fine-tuned with the finalists' recipe for the rest of T (bench/equal_time.run_plan).
- S: `autocompress.search(size budget 2x, latency_budget=fp32 now / divide, time_budget=T)`:
  the latency predictor's profile is on its clock too.

Each arm's artifact is deployed as a user would run it (int8 kernels, TorchScript-frozen) and
timed alternately with the fp32 original (bench/latency.paired); the deployed model's test
accuracy is what is compared, at the speed-up each one measures.

    python bench/equal_latency.py --equal-time 300 --seeds 0,1,2 --threads 1

Writes bench/results/<tag>.jsonl (one line per arm and seed) and <tag>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autocompress.api import search  # noqa: E402
from autocompress.compression import compress  # noqa: E402
from autocompress.cost.latency import measure_latency  # noqa: E402
from autocompress.data import load_data  # noqa: E402
from autocompress.deploy import deployable  # noqa: E402
from autocompress.errors import UserError  # noqa: E402
from autocompress.models import ModelSpec  # noqa: E402
from autocompress.plan import CompressionPlan  # noqa: E402
from autocompress.space import load_space  # noqa: E402
from autocompress.train import baseline, evaluate  # noqa: E402
from autocompress.warmstart import channel_plan  # noqa: E402
from equal_time import mean_sd, run_plan, search_row  # noqa: E402
from latency import paired  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FRACTIONS = [i / 20 for i in range(19)]  # 0, 0.05, ..., 0.9


def lowest_ms(model, x: torch.Tensor, threads: int) -> float:
    """A model's batch-1 latency now: the lowest of 3 medians."""
    return min(measure_latency(model, x, threads=threads, repeats=200).median_ms for _ in range(3))


def fastest_channel_plan(model, layers: dict, x: torch.Tensor, divide: float, threads: int) -> tuple[str, CompressionPlan]:
    """U's plan: the least same-fraction channel plan, int8 everywhere, whose deployed model runs
    at least `divide` times faster than the fp32 original timed right beside it (the most pruned
    one if none does). A speed-up, not a latency: the shared machine's speed drifts (the fp32
    original read 0.43 ms and 0.73 ms at the starts of two runs an hour apart)."""
    for f in FRACTIONS:
        plan = channel_plan(layers, f, 8)
        dep = deployable(compress(model, plan, x, calibrate=False), threads=threads)
        ms, ref = lowest_ms(dep, x, threads), lowest_ms(model, x, threads)
        print(f"  U: channels -{f:.0%}, int8: {ms:.3f} ms, fp32 {ref:.3f} ms: {ref / ms:.2f}x (budget {divide:g}x)",
              flush=True)
        if ref / ms >= divide:
            break
    return f"channels -{f:.0%} everywhere, int8 ({ref / ms:.2f}x when sized)", plan


def timed(row: dict, path: str, net, data, x: torch.Tensor, a: argparse.Namespace) -> dict:
    """Deploy the arm's artifact, time it beside the fp32 original, score the deployed model on test;
    within the budget when that speed-up is at least --divide."""
    calib = list(data.train.batches(128, shuffle=True, seed=0, limit=4))
    dep = deployable(path, calib=calib, threads=a.threads)
    ref, lat = paired(net, dep, x, argparse.Namespace(threads=a.threads, repeats=200, device="cpu"))
    row.update({"deployed_test_accuracy": evaluate(dep, data.test), "latency_ms": lat.median_ms,
                "fp32_ms_paired": ref.median_ms, "speedup": ref.median_ms / lat.median_ms,
                "within_budget": ref.median_ms / lat.median_ms >= a.divide, "backend": getattr(dep, "backend", "float")})
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--divide", type=float, default=3.0, help="latency budget = fp32 latency / this")
    ap.add_argument("--equal-time", type=float, default=300, help="seconds per arm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--baseline-epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--final-distill", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, for training and for the timed batch-1 runs")
    ap.add_argument("--tag", default="equal_latency")
    ap.add_argument("--arms", default="U,S", help="the arms to run (S alone after a change to the search)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_data(a.data, seed=0)
    spec = ModelSpec(a.model, data.num_classes, data.in_channels, data.image_size, data=data.name)
    net, _ = baseline(spec, data, epochs=a.baseline_epochs, seed=0)
    x = data.test.x[:2]
    base_test = evaluate(net, data.test)
    layers = load_space(None).bind(net, data.train.x[:2]).layers
    print(f"fp32 test {base_test:.4f}; latency budget fp32 / {a.divide:g}", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    jsonl = os.path.join(RESULTS, f"{a.tag}.jsonl")
    for seed in [int(s) for s in a.seeds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            runs = []
            if "U" in a.arms.split(","):
                u_path = os.path.join(tmp, "u.acz")
                runs.append((run_plan(net, spec, data, lambda: fastest_channel_plan(net, layers, x, a.divide, a.threads),
                                      a.equal_time, seed, a.final_distill, a.lr, "cpu", u_path), u_path))
            if "S" in a.arms.split(","):
                t0 = time.monotonic()
                budget_ms = lowest_ms(net, x, a.threads) / a.divide  # on the search's clock, as U's timing is
                try:
                    res = search("2x", model=a.model, data=a.data, out=os.path.join(tmp, "s"), study="bench",
                                 time_budget=a.equal_time, trials=a.trials, seed=seed, split_seed=0,
                                 baseline_epochs=a.baseline_epochs, lr=a.lr, final_distill=a.final_distill,
                                 device="cpu", latency_budget=budget_ms, latency_threads=a.threads,
                                 latency_batch_size=1, progress=False)
                    runs.append(({**search_row(res, time.monotonic() - t0, "search"), "budget_ms": budget_ms},
                                 res.best_path))
                except UserError as e:  # the budget refused: near the floor, one slow spell can do it
                    runs.append(({"arm": "S", "refused": str(e), "budget_ms": budget_ms}, None))
            for row, path in runs:
                row = timed(row, path, net, data, x, a) if path else row
                row.update({"seed": seed, "model": a.model, "data": data.name, "time_budget_s": a.equal_time,
                            "divide": a.divide, "baseline_test": base_test, "threads": a.threads,
                            "load": os.getloadavg()[0]})
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    write_summary(jsonl, os.path.join(RESULTS, f"{a.tag}.md"))


def write_summary(jsonl: str, md: str) -> None:
    """Per (model, divide, T): each arm's deployed test accuracy and measured latency, mean ± sd."""
    rows = [json.loads(line) for line in open(jsonl)]
    cases: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if "latency_ms" in r:
            cases.setdefault((r["model"], r["divide"], r["time_budget_s"]), {}).setdefault(r["arm"], []).append(r)
    lines = ["# Search vs the uniform channel plan under a CPU batch-1 latency budget, equal time (issue 14)", "",
             "Deployed test accuracy (%, int8 kernels, the model that runs), batch-1 latency (ms) and speed-up "
             "over the fp32 original timed beside it (within budget: speed-up >= the budget's); mean ± sd "
             "over seeds. See bench/equal_latency.py.", "",
             "| model | budget | T | seeds | fp32 test | U test | S test | S - U | U ms | S ms | within budget U / S | "
             "U speed-up | S speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    within = lambda rs: sum(r["speedup"] >= r["divide"] for r in rs)  # noqa: E731
    for (model, divide, T), arms in cases.items():
        u, s = arms.get("U", []), arms.get("S", [])
        if not u or not s:
            continue
        acc = lambda rs: [r["deployed_test_accuracy"] for r in rs]  # noqa: E731
        lines.append(
            f"| {model} | fp32 / {divide:g} | {T:.0f}s | {len(s)} | "
            f"{u[0]['baseline_test'] * 100:.2f} | {mean_sd(acc(u))} | {mean_sd(acc(s))} | "
            f"{(statistics.mean(acc(s)) - statistics.mean(acc(u))) * 100:+.2f} | "
            f"{mean_sd([r['latency_ms'] for r in u], 1, 3)} | {mean_sd([r['latency_ms'] for r in s], 1, 3)} | "
            f"{within(u)}/{len(u)} / {within(s)}/{len(s)} | "
            f"{statistics.mean(r['speedup'] for r in u):.2f}x | {statistics.mean(r['speedup'] for r in s):.2f}x |")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
