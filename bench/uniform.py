"""Uniform compression of LeNet-5 / Fashion-MNIST at fixed ratios, as real files.

Uniform = one global magnitude threshold over all layers + the same per-channel symmetric weight
bits for every layer + masked QAT fine-tune (BENCHMARKS.md). For each target ratio and each bit
width, the smallest global sparsity whose exported artifact fits the budget is found by bisection
on the exact artifact size; that plan is fine-tuned and its artifact written, loaded back and
scored. Per ratio, the configuration with the best validation accuracy is the "best uniform".

    python bench/uniform.py                       # ratios 10,20,40,100; bits 2-8; 1 epoch
    python bench/uniform.py --ratios 40,100 --bits 3,4 --max-batches 100   # quicker

Writes bench/results/uniform.jsonl (one line per run) and bench/results/uniform.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autocompress.compression import compress, kept_weights, recalibrate_bn  # noqa: E402
from autocompress.cost import artifact_size  # noqa: E402
from autocompress.data import load_data  # noqa: E402
from autocompress.artifact import export, load  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.models import ModelSpec, param_bytes  # noqa: E402
from autocompress.train import baseline, evaluate  # noqa: E402
from autocompress.warmstart import fit_uniform  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="10,20,40,100")
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--max-batches", type=int)
    ap.add_argument("--baseline-epochs", type=int, default=8)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="uniform")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_data(a.data, seed=0)
    spec = ModelSpec(a.model, data.num_classes, data.in_channels, data.image_size, data=data.name)
    model, base_val = baseline(spec, data, epochs=a.baseline_epochs, seed=0, device=a.device)
    base_test = evaluate(model, data.test, a.device)
    original = param_bytes(model)
    example = data.train.x[:2]
    calib = list(data.train.batches(128, shuffle=True, seed=0, limit=4))
    print(f"baseline {a.model}: val {base_val:.4f} test {base_test:.4f}, {original} fp32 bytes")
    os.makedirs(RESULTS, exist_ok=True)
    rows = []
    device_name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    for ratio in [float(r) for r in a.ratios.split(",")]:
        limit = int(original // ratio)
        for bits in [int(b) for b in a.bits.split(",")]:
            fit = fit_uniform(model, bits, lambda p: artifact_size(compress(model, p, example), spec), limit)
            if fit is None:
                print(f"{ratio:g}x {bits}b: does not fit even at 99.8% sparsity")
                continue
            sparsity, plan = fit
            cm = compress(model, plan, example, calib)
            size = artifact_size(cm, spec)
            t0 = time.perf_counter()
            res = finetune(cm, data.train, data.val, FinetuneConfig(epochs=a.epochs, lr=a.lr, max_batches=a.max_batches),
                           l1_weights=lambda: kept_weights(cm), device=a.device,
                           recalibrate=lambda: recalibrate_bn(cm, calib))
            ft = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "m.acz")
                written = export(cm.cpu(), path, spec)
                deployed = load(path)
            assert written == size, (written, size)
            row = {"bench": a.tag, "model": a.model, "data": data.name, "target_ratio": ratio, "budget_bytes": limit,
                   "bits": bits, "global_sparsity": round(sparsity, 4), "bytes": written, "ratio": original / written,
                   "val_accuracy": res.val_acc[-1], "test_accuracy": evaluate(deployed, data.test),
                   "finetune_epochs": a.epochs, "finetune_seconds": round(ft, 1), "baseline_test": base_test,
                   "device": device_name}
            rows.append(row)
            print(json.dumps(row))
            with open(os.path.join(RESULTS, f"{a.tag}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    with open(os.path.join(RESULTS, f"{a.tag}.jsonl")) as f:  # the table covers every recorded run of this tag
        write_table([json.loads(line) for line in f if line.strip()], a, base_test, original)


def write_table(rows: list[dict], a: argparse.Namespace, base_test: float, original: int) -> None:
    lines = [f"# Uniform compression: {a.model} / {a.data}", "",
             f"fp32 baseline: test {base_test * 100:.2f}%, {original} bytes of parameters. "
             f"Fine-tune: {a.epochs} epoch(s) masked QAT{f', {a.max_batches} batches/epoch' if a.max_batches else ''}. "
             f"Device: {rows[0]['device'] if rows else '?'}. Bytes = size of the exported file.", "",
             "| target | bits | global sparsity | bytes | ratio | val acc | test acc | best uniform |",
             "|---|---|---|---|---|---|---|---|"]
    for ratio in sorted({r["target_ratio"] for r in rows}):
        group = [r for r in rows if r["target_ratio"] == ratio]
        best = max(group, key=lambda r: r["val_accuracy"])
        for r in group:
            lines.append(f"| {ratio:g}x | {r['bits']} | {r['global_sparsity']:.3f} | {r['bytes']} | {r['ratio']:.1f}x | "
                         f"{r['val_accuracy'] * 100:.2f}% | {r['test_accuracy'] * 100:.2f}% | {'**yes**' if r is best else ''} |")
    with open(os.path.join(RESULTS, f"{a.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
