"""Search vs uniform compression at the same budget, same fine-tune, same storage format.

For each budget (default 40x and 100x of LeNet-5's fp32 parameter bytes on Fashion-MNIST):
- uniform: for bits 3, 4, 5 the smallest global-magnitude sparsity whose artifact fits; each is
  fine-tuned for --final-epochs (the same fine-tune the search gives its finalists); the best by
  validation accuracy is the "best uniform"; its test accuracy is measured once;
- search: `autocompress.search` with --trials short (1-epoch) trials, then its top-3 fine-tuned
  for --final-epochs; the exported best artifact is loaded back and scored on the test split.
Wall time, trials (complete / early-stopped / infeasible / repaired) and the tool's own overhead
per trial (time outside fine-tune and evaluation) are recorded too.

    python bench/search_quality.py                     # 40x,100x; 20 trials; 3 final epochs; 20-epoch baseline
    python bench/search_quality.py --budgets 40x --trials 8 --final-epochs 2
    python bench/search_quality.py --equal-time 300 --budgets 200x --seeds 0,1,2 --trials 8   # equal time
    python bench/search_quality.py --default-run --budgets 50KB --baseline-epochs 8  # README's default vs U

Writes bench/results/search_quality.jsonl and bench/results/search_quality.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autocompress.api import search  # noqa: E402
from autocompress.compression import compress, kept_weights, recalibrate_bn  # noqa: E402
from autocompress.cost import artifact_size  # noqa: E402
from autocompress.data import load_data  # noqa: E402
from autocompress.artifact import export, load  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.models import ModelSpec, param_bytes  # noqa: E402
from autocompress.plan import parse_budget  # noqa: E402
from autocompress.trials import trial_state  # noqa: E402
from autocompress.train import baseline, evaluate  # noqa: E402
from autocompress.warmstart import fit_uniform  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_uniform(model, spec, data, limit: int, epochs: int, lr: float, distill: float,
                 bits_list=(3, 4, 5), device: str = "cpu") -> dict:
    """Fit, fine-tune and score the uniform plans; return the best by validation accuracy."""
    example = data.train.x[:2]
    calib = list(data.train.batches(128, shuffle=True, seed=0, limit=4))
    size_of = lambda p: artifact_size(compress(model, p, example), spec)  # noqa: E731
    rows = []
    for bits in bits_list:
        t0 = time.perf_counter()
        fit = fit_uniform(model, bits, size_of, limit)
        if fit is None:
            continue
        sparsity, plan = fit
        cm = compress(model, plan, example, calib)
        res = finetune(cm, data.train, data.val, FinetuneConfig(epochs=epochs, lr=lr, distill=distill),
                       teacher=model if distill > 0 else None, l1_weights=lambda: kept_weights(cm), device=device,
                       recalibrate=lambda: recalibrate_bn(cm, calib))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "u.acz")
            size = export(cm, path, spec)
            deployed = load(path)
        rows.append({"bits": bits, "sparsity": sparsity, "bytes": size, "val_accuracy": res.val_acc[-1],
                     "deployed": deployed, "seconds": time.perf_counter() - t0})
        print(f"  uniform {bits}b sparsity {sparsity:.3f}: {size} B, val {res.val_acc[-1]:.4f}")
    best = max(rows, key=lambda r: r["val_accuracy"])
    best["test_accuracy"] = evaluate(best.pop("deployed"), data.test, device)
    best["seconds"] = sum(r["seconds"] for r in rows)
    for r in rows:
        r.pop("deployed", None)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="40x,100x")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per search trial")
    ap.add_argument("--final-epochs", type=int, default=3, help="fine-tune of finalists and uniform plans")
    ap.add_argument("--final-top", type=int, default=3)
    ap.add_argument("--final-distill", type=float, default=0.5, help="distillation weight of that fine-tune")
    ap.add_argument("--baseline-epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, help="train samples used (smoke runs); default all")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "autocompress-bench"))
    ap.add_argument("--tag", default="search_quality")
    ap.add_argument("--keep", help="folder to copy each search's best artifact to (e.g. to time it later)")
    ap.add_argument("--equal-time", type=float, help="seconds per arm: search(time_budget=T) against the uniform plan "
                    "fine-tuned for T (bench/equal_time.py); default tag equal_time")
    ap.add_argument("--seeds", default="0,1,2", help="with --equal-time: the seeds of each case")
    ap.add_argument("--uniform-bits", type=int, help="with --equal-time: U's bit width, when an earlier run chose it")
    ap.add_argument("--default-run", action="store_true", help="equal time against the README's default search "
                    "(no time budget): U gets that run's wall time; default tag equal_time")
    ap.add_argument("--arms", default="U,S", help="with --equal-time: the arms to run (S alone after a change that "
                    "leaves U as it was: copy U's rows of the earlier run into the tag's jsonl)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--baseline-only", action="store_true", help="train (or load) and cache the baseline, print "
                    "its test accuracy, stop: before arms run side by side, so that they do not both train it")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if (a.equal_time or a.default_run) and a.tag == "search_quality":
        a.tag = "equal_time"
    data = load_data(a.data, seed=0, limit=a.limit)
    spec = ModelSpec(a.model, data.num_classes, data.in_channels, data.image_size, data=data.name)
    model, _ = baseline(spec, data, epochs=a.baseline_epochs, seed=0, device=a.device)
    original = param_bytes(model)
    if a.device != "cpu":  # small data sets live on the device, as in the search
        data.train, data.val, data.test = data.train.to(a.device), data.val.to(a.device), data.test.to(a.device)
    base_test = evaluate(model, data.test, a.device)
    if a.baseline_only:
        print(f"baseline {a.model}: test {base_test * 100:.2f}%, {param_bytes(model)} parameter bytes")
        return
    device = f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if a.device == "cpu" else \
        torch.cuda.get_device_name(0)
    os.makedirs(RESULTS, exist_ok=True)
    if a.equal_time or a.default_run:
        from equal_time import equal_time

        return equal_time(a, model, spec, data, original, base_test, device, RESULTS)
    rows = []
    for budget in a.budgets.split(","):
        limit = parse_budget(budget).limit(original)
        print(f"== {budget}: {limit} bytes")
        t0 = time.perf_counter()
        uni = best_uniform(model, spec, data, limit, a.final_epochs, a.lr, a.final_distill, device=a.device)
        rows.append({"budget": budget, "budget_bytes": limit, "method": f"best uniform ({uni['bits']} bit, "
                     f"global sparsity {uni['sparsity']:.3f})", "test_accuracy": uni["test_accuracy"],
                     "val_accuracy": uni["val_accuracy"], "bytes": uni["bytes"], "wall_s": time.perf_counter() - t0,
                     "trials": "3 plans", "overhead_per_trial_s": None})
        t0 = time.perf_counter()
        out = os.path.join(a.out, f"{a.model}-{budget}-{int(time.time())}")
        res = search(budget, model=a.model, data=a.data, out=out, study="bench", trials=a.trials, epochs=a.epochs,
                     baseline_epochs=a.baseline_epochs, lr=a.lr, final_top=a.final_top, final_epochs=a.final_epochs,
                     final_distill=a.final_distill, device=a.device, limit=a.limit, progress=False)
        wall = time.perf_counter() - t0
        if a.keep and res.best_path:
            os.makedirs(a.keep, exist_ok=True)
            shutil.copyfile(res.best_path, os.path.join(a.keep, f"{a.model}-{budget}.acz"))
        trials = res.study.trials
        states = [trial_state(t) for t in trials]
        overhead = [t.user_attrs["overhead_seconds"] / t.user_attrs["seconds"] for t in trials
                    if "overhead_seconds" in t.user_attrs and t.user_attrs.get("seconds")]
        fine_tuned = [t for t in trials if trial_state(t) in ("complete", "early-stopped")]
        rows.append({"budget": budget, "budget_bytes": limit, "method": f"search (best: trial {res.best.number})",
                     "test_accuracy": res.test_accuracy, "val_accuracy": res.best_val,
                     "bytes": os.path.getsize(res.best_path), "wall_s": wall,
                     "trials": f"{states.count('complete')} complete / {states.count('early-stopped')} early-stopped / "
                               f"{states.count('infeasible')} infeasible / {states.count('failed')} failed; "
                               f"{sum(bool(t.user_attrs.get('repaired')) for t in trials)} repaired",
                     "overhead_per_trial_s": sum(t.user_attrs["overhead_seconds"] for t in fine_tuned) / max(len(fine_tuned), 1),
                     "overhead_fraction": sum(overhead) / max(len(overhead), 1),
                     "infeasible_fine_tuned": 0,
                     "plan": res.best.user_attrs["plan"]})
        for r in rows[-2:]:
            r.update({"model": a.model, "data": data.name, "device": device, "baseline_test": base_test,
                      "original_bytes": original, "ratio": original / r["bytes"]})
            with open(os.path.join(RESULTS, f"{a.tag}.jsonl"), "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: v for k, v in r.items() if k != "plan"}))
    write_table(rows, a, base_test, device)


def write_table(rows: list[dict], a: argparse.Namespace, base_test: float, device: str) -> None:
    lines = [f"# Search quality: {a.model} / {a.data}", "",
             f"fp32 baseline test {base_test * 100:.2f}% ({a.baseline_epochs} epochs). Device: {device}. "
             f"Search: {a.trials} trials x {a.epochs} epoch, top {a.final_top} re-fine-tuned {a.final_epochs} epochs; "
             f"uniform plans fine-tuned {a.final_epochs} epochs; both distilled from the baseline with weight "
             f"{a.final_distill}. Bytes = the exported file.", "",
             "| budget | method | test acc | val acc | bytes | ratio | wall | trials | overhead / trial |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ov = "-" if r["overhead_per_trial_s"] is None else \
            f"{r['overhead_per_trial_s']:.2f} s ({r['overhead_fraction'] * 100:.1f}%)"
        lines.append(f"| {r['budget']} | {r['method']} | {r['test_accuracy'] * 100:.2f}% | {r['val_accuracy'] * 100:.2f}% | "
                     f"{r['bytes']} | {r['ratio']:.1f}x | {r['wall_s']:.0f} s | {r['trials']} | {ov} |")
    with open(os.path.join(RESULTS, f"{a.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
