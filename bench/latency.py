"""Latency of deployed compressed models vs the fp32 original (CPU, batch 1), and predictor error.

For each model: the fp32 baseline (trained and cached, or --weights) is timed as it is (eager
PyTorch). Fixed plans (channel pruning of every hidden layer by AMOUNT, all weights 8-bit; the
output layer keeps its channels) are compressed, fine-tuned (--finetune-epochs, distilled),
exported, loaded, deployed (int8 kernels, TorchScript-frozen, faster engine) and timed
alternately with the fp32 original; test accuracy of the deployed model is measured. For
--search-models (LeNet-5 by default; ResNet-18 trials are too slow on 2 cores) a real search runs
with --latency-budget = fp32 latency / --target-speedup, and its deployed best is timed the same
way. The speed-up is reported for the fastest model within 1 point of the baseline's accuracy.
Then the latency predictor is fitted on timed random plans and scored on further held-out plans.

    python bench/latency.py                      # LeNet-5 and ResNet-18 on Fashion-MNIST, ~20 min on 2 cores
    python bench/latency.py --quick              # smoke test on digits (about a minute)
    python bench/latency.py --models resnet18 --weights resnet18=ckpt.pt

Writes bench/results/latency.jsonl (one line per measurement) and bench/results/latency.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autocompress.api import search  # noqa: E402
from autocompress.compression import compress, kept_weights, recalibrate_bn  # noqa: E402
from autocompress.cost.latency import PLANS, held_out_error, measure_latency  # noqa: E402
from autocompress.cost.profile import Yardstick, profile, random_plan, time_plan  # noqa: E402
from autocompress.data import load_data  # noqa: E402
from autocompress.deploy import deployable  # noqa: E402
from autocompress.artifact import export, load  # noqa: E402
from autocompress.finetune import FinetuneConfig, finetune  # noqa: E402
from autocompress.models import ModelSpec, prunable_layers  # noqa: E402
from autocompress.plan import CompressionPlan, LayerPlan  # noqa: E402
from autocompress.space import load_space  # noqa: E402
from autocompress.train import baseline, evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_name() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def paired(reference, model, x, a: argparse.Namespace, rounds: int = 5, batch_size: int = 1) -> tuple:
    """Time the fp32 reference and `model` alternately, `rounds` times each, and pool each one's
    timings: both see the same machine state, so one slow spell cannot inflate a speed-up."""
    ref, dep = [], []
    kw = dict(threads=a.threads, repeats=a.repeats // rounds + 1, device=a.device, batch_size=batch_size)
    for _ in range(rounds):
        ref.append(measure_latency(reference, x, **kw))
        dep.append(measure_latency(model, x, **kw))
    def pool(rs: list) -> object:
        times = sorted(t for r in rs for t in r.timings_ms)
        return replace(rs[0], timings_ms=times, median_ms=statistics.median(times),
                       p90_ms=times[int(round(0.9 * (len(times) - 1)))])

    return pool(ref), pool(dep)


def fixed_plan(model: torch.nn.Module, amount: float) -> CompressionPlan:
    """Channel pruning of every layer but the output one by `amount`, 8-bit weights everywhere."""
    names = prunable_layers(model)
    return CompressionPlan(layers={n: LayerPlan(prune="channel" if amount and n != names[-1] else "none",
                                                amount=amount if n != names[-1] else 0.0, bits=8) for n in names})


def references(net: torch.nn.Module, a: argparse.Namespace) -> dict:
    """The fp32 originals the deployed models are compared with: eager PyTorch (as users run it);
    on a GPU also the same fp32 model replayed as a CUDA graph, so the speed-up that compression
    brings is told apart from the one the graph runtime brings."""
    refs = {"fp32": net.eval()}
    if a.device != "cpu":
        from autocompress.deploy import CudaGraphed

        refs["fp32 graph"] = CudaGraphed(net).eval()
    return refs


def run_model(name: str, a: argparse.Namespace, write) -> dict:
    bundle = load_data(a.data, seed=0, limit=a.limit.get(name))
    spec = ModelSpec(name, bundle.num_classes, bundle.in_channels, bundle.image_size, data=bundle.name)
    net, _ = baseline(spec, bundle, epochs=a.baseline_epochs[name], weights=a.weights.get(name), progress=False,
                      device=a.device)
    if a.device != "cpu":  # small data sets live on the device
        bundle.train, bundle.val, bundle.test = (bundle.train.to(a.device), bundle.val.to(a.device),
                                                 bundle.test.to(a.device))
    x = bundle.test.x[:2]
    base_acc = evaluate(net, bundle.test, a.device)
    refs = references(net, a)
    fp32 = {}
    for bs in a.batch_sizes:
        for kind, ref in refs.items():
            res = min((measure_latency(ref, x, threads=a.threads, repeats=a.repeats, device=a.device, batch_size=bs)
                       for _ in range(3)), key=lambda r: r.median_ms)  # the lowest of 3 medians
            fp32[kind, bs] = res
            write({"model": name, "kind": kind, "test_accuracy": base_acc, **res.to_dict()})
            print(f"{name}: {kind} test {base_acc:.4f}, batch {bs}: {res.median_ms:.3f} ms", flush=True)
    calib = list(bundle.train.batches(128, shuffle=True, seed=0, limit=4))
    rows = []
    deployed_models = []
    for amount in a.amounts:
        plan = fixed_plan(net, amount)
        model = compress(net, plan, bundle.train.x[:2], calib)
        finetune(model, bundle.train, bundle.val, FinetuneConfig(epochs=a.finetune_epochs, max_batches=a.max_batches,
                                                                 distill=a.distill), teacher=net,
                 l1_weights=lambda: kept_weights(model), progress=False, device=a.device,
                 recalibrate=lambda: recalibrate_bn(model, calib))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.acz")
            size = export(model, path, spec)
            evaluated_acc = evaluate(load(path), bundle.test, a.device)
            deployed = deployable(path, calib=calib if a.device == "cpu" else None, device=a.device)
        deployed_models.append((f"channels -{amount:.0%}, " + ("int8" if a.device == "cpu" else "fp16"),
                                deployed, size, evaluated_acc, {"amount": amount}))
    for path in a.artifacts.get(name, []):
        deployed = deployable(path, calib=calib if a.device == "cpu" else None, device=a.device)
        deployed_models.append((f"searched artifact {os.path.basename(path)}", deployed, os.path.getsize(path),
                                evaluate(load(path), bundle.test, a.device), {"artifact": path}))
    for desc, deployed, size, evaluated_acc, extra in deployed_models:
        acc = evaluate(deployed, bundle.test, a.device)
        backend = getattr(deployed, "backend", "fp16 CUDA graph" if a.device != "cpu" else "")
        for bs in a.batch_sizes:
            ref_kinds = list(refs.items())
            timed = {kind: paired(ref, deployed, x, a, batch_size=bs) for kind, ref in ref_kinds}
            lat = timed["fp32"][1]
            row = {"model": name, "kind": "deployed", "plan": f"{desc} ({backend})", **extra,
                   "test_accuracy": acc, "evaluated_accuracy": evaluated_acc, "size_bytes": size,
                   "speedup": timed["fp32"][0].median_ms / lat.median_ms, "fp32_ms_paired": timed["fp32"][0].median_ms,
                   **lat.to_dict()}
            if "fp32 graph" in timed:
                ref_g, lat_g = timed["fp32 graph"]
                row.update({"speedup_vs_graph": ref_g.median_ms / lat_g.median_ms, "fp32_graph_ms_paired": ref_g.median_ms})
            write(row)
            rows.append(row)
            extra_txt = f", {row['speedup_vs_graph']:.2f}x vs fp32 graph" if "speedup_vs_graph" in row else ""
            print(f"{name}: {row['plan']} batch {bs}: test {acc:.4f} (evaluated {evaluated_acc:.4f}), "
                  f"{lat.median_ms:.3f} ms, {row['speedup']:.2f}x{extra_txt}", flush=True)
    if name in a.search_models:
        rows.append(searched(name, a, net, bundle, fp32["fp32", a.batch_sizes[0]], base_acc, write))
    layers = load_space(None).bind(net).layers
    preds = {}
    for bs in a.batch_sizes if a.plans else []:
        t0 = time.perf_counter()
        pred = profile(net, layers, x, plans=a.plans, threads=a.threads, repeats=a.profile_repeats, progress=False,
                       device=a.device, batch_size=bs)
        rng = random.Random(12345)
        stick = Yardstick(net, layers, x, device=a.device, batch_size=bs, threads=a.threads, backend=pred.backend,
                          base_ms=pred.reference_ms)  # held-out plans on the scale the predictor learnt
        held = [time_plan(net, random_plan(layers, rng), x, threads=a.threads, repeats=a.profile_repeats,
                          backend=pred.backend, device=a.device, batch_size=bs, yardstick=stick)
                for _ in range(a.heldout)]
        err = held_out_error(pred, [(r, res.scaled_ms) for r, res in held])
        raw = held_out_error(pred, [(r, res.median_ms) for r, res in held])
        preds[bs] = (err, pred.error, raw)
        write({"model": name, "kind": "predictor", "fit_plans": a.plans, "heldout_plans": a.heldout,
               "heldout_mare": err, "heldout_mare_raw": raw, "split_mare": pred.error,
               "seconds": time.perf_counter() - t0, "batch_size": bs, "device": a.device,
               "heldout": [{"predicted_ms": pred.predict_rows(r), "scaled_ms": res.scaled_ms, "median_ms": res.median_ms,
                            "scale": res.scale} for r, res in held]})
        print(f"{name}: predictor (batch {bs}) median abs relative error {err:.1%} on {a.heldout} held-out plans, "
              f"timed beside the yardstick ({raw:.1%} against their raw medians; {pred.error:.1%} on its own split)",
              flush=True)
    ok = [r for r in rows if (base_acc - r["test_accuracy"]) * 100 <= 1.0]
    best = {bs: max((r for r in ok if r.get("batch_size", 1) == bs), key=lambda r: r["speedup"], default=None)
            for bs in a.batch_sizes}
    return {"model": name, "data": bundle.name, "fp32_ms": {k: v.median_ms for k, v in fp32.items()},
            "fp32_acc": base_acc, "best": best, "rows": rows, "preds": preds, "limit": a.limit.get(name),
            "baseline_epochs": a.baseline_epochs[name], "weights": a.weights.get(name)}


def searched(name: str, a: argparse.Namespace, net, bundle, fp32, base_acc: float, write) -> dict:
    """A real search under --latency-budget = fp32 latency / --target-speedup (size budget loose):
    the deployed best model is timed here the same way as the fp32 original."""
    budget_ms = fp32.median_ms / a.target_speedup
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = search(a.size_budget, model=name, data=a.data, out=out, study="latency", trials=a.search_trials,
                     epochs=1, baseline_epochs=a.baseline_epochs[name], limit=a.limit.get(name),
                     final_top=2, final_epochs=a.finetune_epochs, final_distill=a.distill,
                     latency_budget=budget_ms, latency_threads=a.threads, latency_plans=a.plans,
                     latency_batch_size=a.batch_sizes[0], device=a.device, progress=False)
        if res.best is None:
            row = {"model": name, "kind": "search", "plan": f"searched: no plan met {budget_ms:.3f} ms",
                   "test_accuracy": 0.0, "speedup": 0.0, "median_ms": float("nan"), "budget_ms": budget_ms}
            write(row)
            return row
        calib = list(bundle.train.batches(128, shuffle=True, seed=0, limit=4)) if a.device == "cpu" else None
        deployed = deployable(res.best_path, calib=calib, device=a.device)
        size = os.path.getsize(res.best_path)
        plan = res.best.user_attrs["plan"]["layers"]
    acc = evaluate(deployed, bundle.test, a.device)
    ref, lat = paired(net, deployed, bundle.test.x[:2], a, batch_size=a.batch_sizes[0])
    desc = ", ".join(f"{n} {p['prune']} {p['amount']:.0%} {p['bits']}b" if p["prune"] != "none" and p["amount"] > 0
                     else f"{n} dense {p['bits']}b" for n, p in plan.items())
    row = {"model": name, "kind": "search", "plan": f"searched, latency budget {budget_ms:.3f} ms "
           f"({a.search_trials} trials): {desc} ({getattr(deployed, 'backend', 'fp16 CUDA graph')})", "test_accuracy": acc,
           "search_test_accuracy": res.test_accuracy, "size_bytes": size, "budget_ms": budget_ms,
           "speedup": ref.median_ms / lat.median_ms, "fp32_ms_paired": ref.median_ms,
           "search_seconds": time.perf_counter() - t0, **lat.to_dict()}
    write(row)
    print(f"{name}: {row['plan']}: deployed test {acc:.4f} (baseline {base_acc:.4f}), {lat.median_ms:.3f} ms, "
          f"{row['speedup']:.2f}x", flush=True)
    return row


def markdown(results: list[dict], a: argparse.Namespace) -> str:
    if a.device == "cpu":
        where = f"{a.threads} threads, CPU: {cpu_name()}"
        how = ("deployed = channel-pruned, int8 weights and activations (torch.ao FX, the faster of the x86 and "
               "fbgemm engines, named in brackets), TorchScript-frozen")
    else:
        where = f"GPU: {torch.cuda.get_device_name(0)}"
        how = ("deployed = channel-pruned, BatchNorm folded, fp16 channels-last, replayed as a CUDA graph; "
               "fp32 graph = the original fp32 model replayed as a CUDA graph too (isolates what compression "
               "brings from what the graph runtime brings)")
    lines = [f"# Latency ({where}, torch {torch.__version__})", "",
             f"fp32 = the original model in eager PyTorch; {how}. Fixed plans, then (searched) a real `search` "
             "with a latency budget, or searched artifacts timed as they are. "
             f"Fine-tune {a.finetune_epochs} epoch(s), distilled with weight {a.distill}"
             + (f", at most {a.max_batches} batches" if a.max_batches else "")
             + ". Test accuracy is the deployed model's. Each deployed model is timed alternately with "
             "the fp32 original (5 rounds each, timings pooled; the fp32 median of those rounds in brackets) "
             "and the speed-up is the ratio of those two medians"
             + ("; denormals flushed to zero for both." if a.device == "cpu" else "; torch.cuda.synchronize after each run."),
             "", "| model | data | plan | batch | test acc | ms | speed-up |", "|---|---|---|---|---|---|---|"]
    for r in results:
        note = f" (train subset {r['limit']}, {r['baseline_epochs']} epochs)" if r["limit"] else \
            f" ({r['baseline_epochs']} epochs)"
        for (kind, bs), ms in r["fp32_ms"].items():
            lines.append(f"| {r['model']} | {r['data']}{note} | {kind} | {bs} | {r['fp32_acc']:.2%} | {ms:.3f} | 1.00x |")
        for row in r["rows"]:
            vs_graph = f" ({row['speedup_vs_graph']:.2f}x vs fp32 graph)" if "speedup_vs_graph" in row else ""
            lines.append(f"| {r['model']} | | {row['plan']} | {row.get('batch_size', 1)} | {row['test_accuracy']:.2%} | "
                         f"{row['median_ms']:.3f} (fp32 {row.get('fp32_ms_paired', float('nan')):.3f}) | "
                         f"{row['speedup']:.2f}x{vs_graph} |")
    goal = "2.5x" if a.device == "cpu" else "2x"
    lines += ["", f"| model | batch | speed-up at <= 1 point loss (goal >= {goal}) | predictor error, held-out plans "
              "(goal <= 10%) |", "|---|---|---|---|"]
    for r in results:
        for bs, best in r["best"].items():
            sp = f"{best['speedup']:.2f}x ({best['plan']})" if best else "none within 1 point"
            if best and "speedup_vs_graph" in best:
                sp += f"; {best['speedup_vs_graph']:.2f}x vs fp32 graph"
            err = r["preds"].get(bs)
            lines.append(f"| {r['model']} | {bs} | {sp} | "
                         + (f"{err[0]:.1%} ({err[2]:.1%} against raw medians)" if err else "-") + " |")
    return "\n".join(lines) + "\n"


def _pairs(text: str | None, cast) -> dict:
    return {k: cast(v) for k, v in (p.split("=", 1) for p in text.split(","))} if text else {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet18")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--weights", help="model=checkpoint,... (skips baseline training)")
    ap.add_argument("--baseline-epochs", default="lenet5=20,resnet18=2", help="model=epochs,...")
    ap.add_argument("--limit", default="resnet18=6000", help="model=train samples,... (ResNet-18 on a subset)")
    ap.add_argument("--amounts", default="0.25,0.5", help="channel fractions removed by the fixed plans")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--max-batches", type=int, help="cap on fine-tune batches per epoch")
    ap.add_argument("--distill", type=float, default=0.5, help="distillation weight of the fine-tunes")
    ap.add_argument("--search-models", default="lenet5", help="models also searched with a latency budget")
    ap.add_argument("--target-speedup", type=float, default=2.5, help="latency budget = fp32 latency / this")
    ap.add_argument("--size-budget", default="4x", help="the search's (loose) size budget")
    ap.add_argument("--search-trials", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--plans", type=int, default=PLANS, help="timed plans the predictor is fitted on (the search's default)")
    ap.add_argument("--heldout", type=int, default=12,
                    help="further timed plans it is scored on (the median of 6 swings by several points)")
    ap.add_argument("--profile-repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke test: digits, tiny settings")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (fp16, CUDA graphs)")
    ap.add_argument("--batch-sizes", default="1", help="batch sizes timed, e.g. 1,256")
    ap.add_argument("--artifacts", help="model=a.acz:b.acz,... searched artifacts to time as well")
    ap.add_argument("--tag", default="latency")
    a = ap.parse_args(argv)
    if a.quick:
        a.data, a.baseline_epochs, a.limit = "digits", "lenet5=2,resnet18=1", None
        a.amounts, a.max_batches, a.repeats, a.plans, a.heldout, a.profile_repeats = "0.5", 2, 10, 5, 2, 5
        a.finetune_epochs, a.search_trials = 1, 2
        a.tag = a.tag + "-quick"
    a.weights, a.limit = _pairs(a.weights, str), _pairs(a.limit, int)
    a.artifacts = {k: v.split(":") for k, v in _pairs(a.artifacts, str).items()}
    a.batch_sizes = [int(v) for v in a.batch_sizes.split(",")]
    a.baseline_epochs = {"lenet5": 20, "resnet18": 2, **_pairs(a.baseline_epochs, int)}
    a.search_models = set(a.search_models.split(",")) if a.search_models else set()
    a.amounts = [float(v) for v in a.amounts.split(",")] if a.amounts else []
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    os.makedirs(RESULTS, exist_ok=True)
    jsonl = os.path.join(RESULTS, f"{a.tag}.jsonl")
    meta = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M"),
            "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(0)}

    def write(row: dict) -> None:
        with open(jsonl, "a") as f:
            f.write(json.dumps({**meta, **row}) + "\n")

    start = time.perf_counter()
    results = [run_model(m, a, write) for m in a.models.split(",")]
    md = markdown(results, a) + f"\nTotal bench time {time.perf_counter() - start:.0f} s.\n"
    with open(os.path.join(RESULTS, f"{a.tag}.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
