"""Memory and time at real size: compress, sizing and sensitivity of torchvision models (issue 13.3).

Each measurement runs in a fresh subprocess (one model per process), so its peak RSS
(resource.getrusage ru_maxrss) is that model's own. Per model, with random weights and 10 classes:

- compress: compress(model, plan, calibrate=False), the call the repair and warm start make;
- sizing: cost.artifact_size of the result (median of --repeat), for a 90%-sparse 4-bit plan and,
  on resnet50, for every granularity (dense, unstructured, N:M, block, channel, low rank, float16);
  the size is checked against the bytes the writer produces (artifact_bytes) where --check;
- peak RSS against the bound 4 x fp32 bytes + 2 GB;
- sensitivity: sensitivity.analyse of mobilenet_v2 (28x28 grey, as on Fashion-MNIST).

Times are wall seconds and the process's CPU seconds (user + system): on a loaded machine the
CPU seconds of a single-threaded run (--threads 1) are the steadier figure.

    python bench/scale.py                          # every model, 3 repeats
    python bench/scale.py --models resnet50 --repeat 5

Writes bench/results/scale.jsonl (one line per measurement) and bench/results/scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = {"resnet50": 64, "vit_b_16": 224, "swin_v2_t": 64, "vgg16": 64, "convnext_base": 64}
GB = 1 << 30


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn):
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return out, time.perf_counter() - t, _cpu() - c


def _plans(model, kinds: list[str]):
    from autocompress.models import layer_weight, prunable_layers
    from autocompress.plan import CompressionPlan, LayerPlan

    layers = prunable_layers(model)
    body, out = layers[:-1], layers[-1]
    nm_ok = [n for n in body if getattr(model.get_submodule(n), "groups", 1) == 1  # MultiheadAttention: in_proj_weight
             and layer_weight(model.get_submodule(n))[0].numel() % 4 == 0]
    per_kind = {
        "unstructured 90% 4b": {n: LayerPlan(prune="unstructured", amount=0.9, bits=4) for n in body},
        "dense 4b": {n: LayerPlan(bits=4) for n in body},
        "n:m 2:4 4b": {n: LayerPlan(prune="nm", n=2, m=4, bits=4) for n in nm_ok},
        "block 80% 3b": {n: LayerPlan(prune="block", amount=0.8, block_size=8, bits=3) for n in nm_ok},
        "channel 30% 4b": {n: LayerPlan(prune="channel", amount=0.3, bits=4) for n in body},
        "low rank 0.5 6b": {n: LayerPlan(rank_ratio=0.5, bits=6) for n in nm_ok},
        "float16 unstructured 95% 16b": {n: LayerPlan(prune="unstructured", amount=0.95, bits=16) for n in body},
        "act 8b, floats 16": {n: LayerPlan(prune="unstructured", amount=0.9, bits=4, act_bits=8) for n in body},
    }
    plans = {}
    for k in kinds:
        fb = 16 if "floats 16" in k else 32
        plans[k] = CompressionPlan(layers={**per_kind[k], out: LayerPlan(bits=8)}, float_bits=fb)
    return plans


def child_model(name: str, size: int, repeat: int, kinds: list[str], check: bool) -> list[dict]:
    import torch

    from autocompress.compression import compress
    from autocompress.cost import artifact_size
    from autocompress.models import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec(f"torchvision:{name}", 10, 3, size)
    model = build_model(spec).eval()
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    example = torch.randn(1, 3, size, size)
    calib = [(torch.randn(2, 3, size, size), torch.randint(0, 10, (2,)))]
    rows = []
    for kind, plan in _plans(model, kinds).items():
        row = {"bench": "scale", "model": name, "input": size, "plan": kind, "fp32_bytes": fp32,
               "threads": torch.get_num_threads()}
        try:
            c, row["compress_s"], row["compress_cpu_s"] = _timed(
                lambda: compress(model, plan, example, calib, calibrate=False))
            sized = [_timed(lambda: artifact_size(c, spec)) for _ in range(repeat)]
            row["bytes"] = sized[0][0]
            row["size_s"] = statistics.median(s[1] for s in sized)
            row["size_cpu_s"] = statistics.median(s[2] for s in sized)
            row["size_runs_s"] = [round(s[1], 3) for s in sized]
            row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if check:
                from autocompress.artifact import artifact_bytes

                row["bytes_written"] = len(artifact_bytes(c, spec))
            del c
        except Exception as e:  # report, do not stop the other plans
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        row["bound"] = 4 * fp32 + 2 * GB
        rows.append(row)
    return rows


def child_sensitivity(repeat: int) -> list[dict]:
    import torch

    from autocompress.data import TensorData
    from autocompress.models import ModelSpec, build_model
    from autocompress.sensitivity import AMOUNTS, BITS, SAMPLES, analyse

    torch.manual_seed(0)
    model = build_model(ModelSpec("torchvision:mobilenet_v2", 10, 1, 28)).eval()
    val = TensorData(torch.randn(2000, 1, 28, 28), torch.randint(0, 10, (2000,)))
    runs = []
    for _ in range(repeat):
        sens, wall, cpu = _timed(lambda: analyse(model, val, val.x[:2]))
        runs.append((wall, cpu))
    return [{"bench": "scale", "model": "mobilenet_v2", "input": 28, "plan": "sensitivity",
             "layers": len(sens.layers), "settings": len(AMOUNTS) + len(BITS), "samples": SAMPLES,
             "threads": torch.get_num_threads(), "sensitivity_s": statistics.median(r[0] for r in runs),
             "sensitivity_cpu_s": statistics.median(r[1] for r in runs),
             "runs_s": [round(r[0], 1) for r in runs],
             "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}]


def _run_child(args: list[str], timeout: int) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"bench": "scale", "child": " ".join(args), "error": f"timed out after {timeout}s"}]
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"bench": "scale", "child": " ".join(args), "error": f"exit {p.returncode}: {tail[:200]}"}]
    return lines


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def write_md(rows: list[dict], path: str, note: str) -> None:
    lines = ["# Memory and time at real size (issue 13.3)", "", note,
             "Each row is the latest run of that model and plan (bench/results/scale.jsonl has every run, "
             "with its time and load).", "",
             "| model | input | plan | compress s (cpu s) | sizing s (cpu s), median | bytes | "
             "peak RSS MB | bound MB | within | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("plan") == "sensitivity" or "model" not in r:
            continue
        if "error" in r and "size_s" not in r:
            lines.append(f"| {r['model']} | {r['input']} | {r['plan']} | error: {r['error']} | | | | | |")
            continue
        exact = "" if "bytes_written" not in r else (" (= written)" if r["bytes_written"] == r["bytes"] else " (!= written)")
        lines.append(f"| {r['model']} | {r['input']} | {r['plan']} | {r['compress_s']:.2f} ({r['compress_cpu_s']:.2f}) | "
                     f"{r['size_s']:.3f} ({r['size_cpu_s']:.3f}) | {r['bytes']:,}{exact} | {_mb(r['peak_rss'])} | "
                     f"{_mb(r['bound'])} | {'yes' if r['peak_rss'] <= r['bound'] else 'NO'} | {r.get('load_at_start', '')} |")
    sens = [r for r in rows if r.get("plan") == "sensitivity"]
    if sens:
        lines += ["", "| sensitivity | layers | settings | samples | threads | wall s (median, runs) | cpu s | load |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sens:
            lines.append(f"| {r['model']} {r['input']}x{r['input']} | {r['layers']} | {r['settings']} | {r['samples']} | "
                         f"{r['threads']} | {r['sensitivity_s']:.1f} ({', '.join(map(str, r['runs_s']))}) | "
                         f"{r['sensitivity_cpu_s']:.1f} | {r.get('load_at_start', '')} |")
    errors = [r for r in rows if "error" in r and "model" not in r]
    lines += [f"- {r['child']}: {r['error']}" for r in errors]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    ap.add_argument("--repeat", type=int, default=3, help="sizing repeats (median), sensitivity runs")
    ap.add_argument("--sensitivity-repeat", type=int, default=2, help="sensitivity runs (median)")
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads in the children (default: torch's)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per child")
    ap.add_argument("--tag", default="scale")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kinds", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.child:
        rows = child_sensitivity(a.repeat) if a.child == "sensitivity" else \
            child_model(a.child, a.size, a.repeat, a.kinds.split(";"), a.check)
        for r in rows:
            print(json.dumps(r))
        return
    os.makedirs(RESULTS, exist_ok=True)
    threads = ["--threads", str(a.threads)] if a.threads else []
    load = os.getloadavg()
    note = (f"{platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads or 'default'}; "
            "the load column is the 1-minute load average when that run started (the machine was shared with "
            "other jobs: wall times are inflated, CPU seconds less so).")
    rows: list[dict] = []
    all_kinds = ";".join(["unstructured 90% 4b", "dense 4b", "n:m 2:4 4b", "block 80% 3b", "channel 30% 4b",
                          "low rank 0.5 6b", "float16 unstructured 95% 16b", "act 8b, floats 16"])
    for name in a.models.split(","):
        size = MODELS.get(name, 64)
        kinds = all_kinds if name == "resnet50" else "unstructured 90% 4b"
        extra = ["--check"] if name == "resnet50" else []
        rows += _run_child(["--child", name, "--size", str(size), "--repeat", str(a.repeat), "--kinds", kinds,
                            *extra, *threads], a.timeout)
        print(json.dumps(rows[-1]))
    if not a.no_sensitivity:
        rows += _run_child(["--child", "sensitivity", "--repeat", str(a.sensitivity_repeat), *threads], a.timeout)
        print(json.dumps(rows[-1]))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(RESULTS, f"{a.tag}.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "time": stamp, "load_at_start": round(load[0], 1)}) + "\n")
    latest: dict = {}  # the table shows the latest measurement of each (model, plan) in the .jsonl
    with open(os.path.join(RESULTS, f"{a.tag}.jsonl")) as f:
        for r in map(json.loads, f):
            latest[(r.get("model"), r.get("plan"), r.get("child"))] = r
    write_md(list(latest.values()), os.path.join(RESULTS, f"{a.tag}.md"), note)
    print(open(os.path.join(RESULTS, f"{a.tag}.md")).read())


if __name__ == "__main__":
    main()
