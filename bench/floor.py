"""The default space's floor on every torchvision classifier: how small can its artifact get?

For each name in torchvision.models.list_models(module=torchvision.models) (random weights,
10 classes, 3 channels, the natural input size of its weights' transforms), the default search
space is bound and its smallest plan (most pruning, fewest bits, float_bits 16) compressed and
sized: the floor ratio is fp32 bytes / floor bytes. "Untouchable" is what no plan can change:
the framing, the header and the float tensors outside every weight slot (cost.untouchable_bytes).
Each model runs in its own subprocess under `ulimit -v` and a timeout; models above --max-params
are skipped with a note. The floor plan prunes unstructured (it is as sparse as channel pruning
and applies to every layer), so no floor depends on channel pruning; the `channel` column says
whether the bound space offers channel pruning anywhere.

    python bench/floor.py                          # every model up to 100M parameters
    python bench/floor.py --models mobilenet_v2,vit_b_16 --memory-gb 8 --timeout 300
    python bench/floor.py --append                 # probe only the models not yet in floor.jsonl

Writes bench/results/floor.jsonl (one line per model) and bench/results/floor.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
TARGET = 50.0


def input_size(name: str) -> int:
    """The crop size of the model's default weights' transforms (224 when it has none)."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])
    except Exception:
        return 224


def probe(name: str, max_params: float, space: str | None) -> dict:
    """Floor figures of one model (runs in the child process)."""
    import torch
    from torch import nn

    sys.path.insert(0, ROOT)
    from autocompress.compression import compress
    from autocompress.cost import artifact_size, untouchable_bytes
    from autocompress.models import ModelSpec, build_model, param_bytes, prunable_layers
    from autocompress.space import load_space

    torch.manual_seed(0)
    torch.set_num_threads(1)
    size = input_size(name)
    spec = ModelSpec(f"torchvision:{name}", 10, 3, size)
    model = build_model(spec).eval()
    params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "params": params, "fp32_bytes": param_bytes(model), "input": size}
    if params > max_params:
        return {**row, "skipped": f"above {max_params / 1e6:.0f}M parameters"}
    t0 = time.perf_counter()
    bound = load_space(space).bind(model)
    plan = bound.smallest()
    c = compress(model, plan, torch.zeros(1, 3, size, size), calibrate=False)
    floor = artifact_size(c, spec)
    untouchable = untouchable_bytes(c, spec)
    rec = c.autocompress_record
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    reached = sum(p.numel() for n in prunable_layers(model)
                  for p in model.get_submodule(n).parameters(recurse=False) if p.dim() > 1)
    return {**row, "floor_bytes": floor, "ratio": row["fp32_bytes"] / floor, "untouchable_bytes": untouchable,
            "untouchable_share": untouchable / floor, "layers": len(plan.layers),
            "reached_weight_share": reached / params, "bn": len(bns), "bn_folded": len(rec["folded"]),
            "channel": any("channel" in c["prune"].values for c in bound.layers.values()),
            "float_bits": plan.float_bits, "seconds": round(time.perf_counter() - t0, 2)}


def run_one(name: str, args: argparse.Namespace) -> dict:
    """probe(name) in a subprocess under ulimit -v and a timeout; a failure becomes an `error` row."""
    cmd = (f"ulimit -v {int(args.memory_gb * 1024 * 1024)}; exec timeout {args.timeout} {sys.executable} "
           f"{os.path.abspath(__file__)} --child {name} --max-params {args.max_params}"
           + (f" --space {args.space}" if args.space else ""))
    t0 = time.perf_counter()
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = "timed out" if p.returncode == 124 else (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return {"model": name, "error": why[:200], "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict]) -> str:
    head = ["model", "params", "fp32", "floor", "ratio", "untouchable", "share", "BN folded", "ok"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "ratio" in r:
            out.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['fp32_bytes'] / 1e6:.1f} MB | "
                       f"{r['floor_bytes'] / 1e3:.1f} KB | {r['ratio']:.1f}x | {r['untouchable_bytes'] / 1e3:.1f} KB | "
                       f"{r['untouchable_share']:.0%} | {r['bn_folded']}/{r['bn']} | "
                       f"{'yes' if r['ratio'] >= TARGET else 'NO'} |")
        else:
            note = r.get("skipped") or f"error: {r.get('error')}"
            out.append(f"| {r['model']} | {r.get('params', 0) / 1e6:.1f}M | | | | | | | {note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: every torchvision classifier)")
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--memory-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--space", help="search space (default: search_spaces/default.yaml)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "floor"))
    ap.add_argument("--append", action="store_true", help="keep the rows already in OUT.jsonl, probe only new models")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(probe(args.child, args.max_params, args.space)))
        return
    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows = []
    if args.append and os.path.exists(args.out + ".jsonl"):
        with open(args.out + ".jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    known = {r["model"] for r in rows}
    with open(args.out + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for name in (n for n in names if n not in known):
            row = run_one(name, args)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
    done = [r for r in rows if "ratio" in r]
    summary = (f"{sum(r['ratio'] >= TARGET for r in done)} of {len(done)} models measured reach {TARGET:.0f}x; "
               f"{sum('skipped' in r for r in rows)} skipped, {sum('error' in r for r in rows)} failed.")
    with open(args.out + ".md", "w") as f:
        f.write("# Floor of the default search space (smallest artifact) per torchvision classifier\n\n"
                f"`python bench/floor.py` ({time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}, "
                f"torchvision {torchvision.__version__}; random weights, 10 classes). {summary}\n\n"
                "untouchable = bytes no plan can change (header + float tensors outside the planned weights); "
                "share = untouchable / floor.\n\n" + table(rows) + "\n")
    print(summary)


if __name__ == "__main__":
    main()
