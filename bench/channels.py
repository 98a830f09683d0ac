"""Channel pruning on every torchvision classifier: compress, run, export, load, deploy.

For each name in torchvision.models.list_models(module=torchvision.models) (random weights, 10
classes), in its own subprocess under `ulimit -v` and a timeout: the layers that can lose channels
are found as the search space's binding finds them (channel.check_layers), every one of them
loses --amount of its channels with all weights at --bits bits (the output layer keeps its
channels), and the compressed model must run, export to exactly the bytes artifact_size reports,
load back with the same logits, and run deployed on the CPU (autocompress.deploy.deployable).

    python bench/channels.py                         # all classifiers up to 100M parameters
    python bench/channels.py --models resnet18,vit_b_16 --size 64
    python bench/channels.py --max-params 1e9 --mem-gb 60   # the large ones, where memory allows

`--size natural` (default) uses each model's natural input size (its weights' crop size); a number
uses that size wherever the model accepts it and falls back to the natural size where it does not
(ViT's patch grid is fixed). Writes bench/results/channels.jsonl and bench/results/channels.md.
`probe(name)` is the per-model function (importable, returns a dict).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKEND = "fbgemm"  # one quantized engine: "auto" would time both, which says nothing here
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def natural_size(name: str) -> int:
    """The input side a torchvision classifier is made for (its default weights' crop size)."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])
    except Exception:
        return 224


def _build(name: str, size: int | None):
    """The model and an example batch at `size` (or the natural size when the model refuses it)."""
    import torch
    import torchvision

    natural = natural_size(name)
    for side in ([size] if size else []) + [natural]:
        model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
        x = torch.randn(2, 3, side, side)
        try:
            with torch.no_grad():
                model(x)
            return model, x
        except Exception:
            continue
    raise RuntimeError(f"{name} does not run at {size} nor at {natural}")


def probe(name: str, size: int | None = None, amount: float = 0.3, bits: int = 4) -> dict[str, Any]:
    """Channel-prune one torchvision classifier and check the artifact round trip; a dict of results."""
    import torch

    from autocompress.artifact import export, load
    from autocompress.compression import channel, compress
    from autocompress.cost.size import artifact_size
    from autocompress.deploy import deployable
    from autocompress.models import ModelSpec, prunable_layers
    from autocompress.plan import CompressionPlan, LayerPlan

    torch.manual_seed(0)
    out: dict[str, Any] = {"model": name, "amount": amount, "bits": bits}
    t0 = time.perf_counter()
    model, x = _build(name, size)
    out["size"] = x.shape[-1]
    out["params"] = sum(p.numel() for p in model.parameters())
    layers = prunable_layers(model)
    t = time.perf_counter()
    refused = channel.check_layers(model, x, layers[:-1], layers[-1])
    out["check_s"] = round(time.perf_counter() - t, 2)
    out["layers"], out["channel_layers"] = len(layers), len(layers) - 1 - len(refused)
    out["refused"] = dict(list(refused.items())[:5])
    plan = CompressionPlan(layers={n: LayerPlan(prune="channel", amount=amount, bits=bits)
                                   if n != layers[-1] and n not in refused else LayerPlan(bits=bits) for n in layers})
    t = time.perf_counter()
    small = compress(model, plan, x, calibrate=False).eval()
    out["compress_s"] = round(time.perf_counter() - t, 2)
    out["params_kept"] = round(sum(p.numel() for p in small.parameters()) / out["params"], 4)
    with torch.no_grad():
        y = small(x)
    out["runs"] = bool(torch.isfinite(y).all() and tuple(y.shape) == (2, 10))
    spec = ModelSpec(spec=f"torchvision:{name}", num_classes=10, in_channels=3, image_size=int(x.shape[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.acz")
        out["reported_bytes"] = artifact_size(small, spec)
        out["written_bytes"] = export(small, path, spec)
        out["bytes_equal"] = out["reported_bytes"] == out["written_bytes"] == os.path.getsize(path)
        out["ratio"] = round(out["params"] * 4 / out["written_bytes"], 2)
        t = time.perf_counter()
        back = load(path)
        out["load_s"] = round(time.perf_counter() - t, 2)
        with torch.no_grad():
            diff = float((back(x) - y).abs().max())
        out["logit_diff"] = diff
        out["logits_equal"] = diff <= 1e-4 * max(1.0, float(y.abs().max()))
        try:
            dep = deployable(path, script=False, backend=BACKEND)
            with torch.no_grad():
                out["deployable"] = bool(tuple(dep(x[:1]).shape) == (1, 10))
        except Exception as e:
            out["deployable"] = False
            out["deploy_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    out["ok"] = bool(out["runs"] and out["bytes_equal"] and out["logits_equal"] and out["deployable"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _one(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run probe(name) in a subprocess under ulimit -v and a timeout."""
    cmd = (f"ulimit -v {int(args.mem_gb * 1024 * 1024)}; exec timeout {args.timeout} {sys.executable} "
           f"{os.path.abspath(__file__)} --one {name} --size {args.size} --amount {args.amount} --bits {args.bits} "
           f"--max-params {args.max_params}")
    t = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
    why = "timeout" if proc.returncode == 124 else "out of memory" if "MemoryError" in proc.stderr or \
        proc.returncode in (-9, 137) else tail
    return {"model": name, "ok": False, "error": why, "seconds": round(time.perf_counter() - t, 1)}


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ok = sum(bool(r.get("ok")) for r in rows)
    lines = [f"# Channel pruning on torchvision classifiers\n",
             f"{args.amount:.0%} of the channels of every layer that can lose them, all weights at {args.bits} bits, "
             f"random weights, 10 classes; input side `--size {args.size}`; each model in its own process under "
             f"`ulimit -v` {args.mem_gb:g} GB and a {args.timeout} s timeout. ok = runs, exported bytes equal the "
             f"reported size, loaded logits equal, deployable on CPU. {ok} of {len(rows)} ok.\n",
             "| model | params | side | channel layers | kept params | ratio | bytes equal | logits equal | "
             "deployable | compress s | peak RSS MB | ok | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('params', '')} | | | | | | | | | | no | {r['error']} |")
            continue
        note = r.get("deploy_error", "")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['size']} | {r['channel_layers']}/{r['layers'] - 1}"
                     f" | {r['params_kept']:.2f} | {r['ratio']:.1f}x | {r['bytes_equal']} | {r['logits_equal']} | "
                     f"{r['deployable']} | {r['compress_s']} | {r['peak_rss_mb']} | {'yes' if r['ok'] else 'no'} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: every classifier)")
    ap.add_argument("--size", default="natural", help="input side: natural or a number (default natural)")
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--mem-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default="channels", help="results name under bench/results (default channels)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = None if args.size == "natural" else int(args.size)
    if args.one:
        import torchvision

        params = sum(p.numel() for p in torchvision.models.get_model(args.one, weights=None).parameters())
        row = {"model": args.one, "params": params, "skipped": True} if params > args.max_params else \
            probe(args.one, size, args.amount, args.bits)
        print(json.dumps(row), flush=True)
        return
    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    os.makedirs(RESULTS, exist_ok=True)
    rows: list[dict[str, Any]] = []
    jsonl = os.path.join(RESULTS, f"{args.out}.jsonl")
    open(jsonl, "w").close()
    for name in names:
        row = _one(args, name)
        if row.get("skipped"):
            print(f"{name}: {row['params'] / 1e6:.0f}M parameters, skipped (--max-params)", flush=True)
            continue
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
            f.write(_table(rows, args))
        print(f"{name}: {'ok' if row.get('ok') else 'FAIL'} {row.get('error', row.get('deploy_error', ''))} "
              f"({row.get('seconds')} s)", flush=True)


if __name__ == "__main__":
    main()
