"""Every torchvision classifier through the engine: channel pruning, exact size, load, deploy, floor.

For each name of `torchvision.models.list_models(module=torchvision.models)` up to --max-params
parameters (larger ones are listed as skipped), one child process (under `ulimit -v` and a
timeout, one CPU thread) builds the model with random weights and 10 classes and measures:

- channel: a plan removing 30% of the output channels of every layer the default space lets lose
  channels (4-bit weights everywhere) compresses, runs, and really shrinks those layers;
- bytes: the exported file's size equals the reported artifact size (both plans below);
- load: `autocompress.load` of the file gives the compressed model's logits (max |diff|);
- deploy: `autocompress.deploy.deployable` builds and runs the channel plan's artifact on CPU;
- floor: the default space's smallest artifact (`BoundSpace.smallest()`) against fp32 bytes, and
  the bytes of it that no plan can touch (float tensors outside every planned layer's weight);
- time: compress() of the floor plan with calibration, and sizing it (compress without
  calibration + artifact bytes, what repair and warm start do per plan);
- peak RSS against 4x fp32 bytes + 2 GB: while compressing and sizing the floor plan (the
  kernel's high-water mark reset just before, /proc/self/clear_refs), and of the whole child
  (bind, both plans, export, load and the int8 deployment).

    python bench/zoo.py                          # all models, writes results as it goes
    python bench/zoo.py --models resnet18,vit_b_16 --resume

Writes bench/results/zoo.jsonl (one line per model) and bench/results/zoo.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIXED_224 = ("vit_", "swin_", "maxvit_")  # need 224 x 224 (position embeddings, windows)
SMALL_SIZE = 64
CHANNEL_AMOUNT = 0.3
CHANNEL_BITS = 4


def input_size(name: str) -> int:
    """A small input size the model accepts: 224 where its architecture fixes it, else 64
    (inception_v3's auxiliary classifier, run in training mode by calibration, needs its 299)."""
    if name.startswith(FIXED_224):
        return 224
    return 299 if name == "inception_v3" else SMALL_SIZE


def listed_params(name: str) -> int | None:
    """Parameter count of the model's default weights (1000 classes), without building it."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:160]


# ---- the measurements (one model, in the child) ----------------------------------------------

def channel_plan(bound: Any) -> Any:
    """30% channels off every layer whose bound choices allow it; 4-bit weights everywhere."""
    from autocompress.plan import CompressionPlan, LayerPlan

    layers = {}
    for name, choices in bound.layers.items():
        if "channel" in choices["prune"].values:
            layers[name] = LayerPlan(prune="channel", amount=CHANNEL_AMOUNT, bits=CHANNEL_BITS)
        else:
            layers[name] = LayerPlan(bits=CHANNEL_BITS)
    return CompressionPlan(layers=layers)


def round_trip(compressed: Any, spec: Any, example: Any, folder: str, tag: str) -> dict[str, Any]:
    """Export, compare the file's size with artifact_size, load back, compare logits."""
    import torch

    from autocompress.artifact import export, load
    from autocompress.cost import artifact_size

    reported = artifact_size(compressed, spec)
    path = os.path.join(folder, f"{tag}.acz")
    export(compressed, path, spec)
    on_disk = os.path.getsize(path)
    loaded = load(path)  # outside no_grad: the channel replay traces with autograd
    with torch.no_grad():
        want = compressed.eval()(example)
        got = loaded(example)
    diff = float((want - got).abs().max())
    # equal up to float32 rounding, at the logits' scale: the loaded model computes in another order
    # (swin_v2_b, 24 blocks: 3.8e-5 apart on logits up to 1.3)
    atol = max(1e-5, 1e-4 * float(want.abs().max()))
    return {f"{tag}_bytes": reported, f"{tag}_bytes_equal": reported == on_disk,
            f"{tag}_load_max_diff": diff, f"{tag}_load_equal": bool(torch.allclose(want, got, rtol=1e-4, atol=atol)),
            f"{tag}_path": path}


def deploy_check(path: str, example: Any) -> dict[str, Any]:
    """`deployable()` builds the artifact for the CPU and runs it: 'ok' when its logits have the
    right shape and are finite, else the first line of what went wrong."""
    import torch

    from autocompress.deploy import deployable

    try:
        dep = deployable(path, calib=[example], backend="x86" if "x86" in
                         torch.backends.quantized.supported_engines else "auto")
        with torch.no_grad():
            dout = dep(example)
        ok = tuple(dout.shape) == (example.shape[0], 10) and bool(torch.isfinite(dout).all())
        return {"deploy": "ok" if ok else f"output {tuple(dout.shape)}", "deploy_backend": getattr(dep, "backend", None)}
    except Exception as e:
        return {"deploy": _first_line(e)}


def measure(name: str, size: int, row: dict[str, Any], folder: str) -> None:
    """Fill `row` step by step, so a failure late on keeps what came before."""
    import torch
    import torchvision

    from autocompress.compression import compress
    from autocompress.cost import artifact_size, untouchable_bytes
    from autocompress.memory import collect, trim
    from autocompress.models import ModelSpec, param_bytes
    from autocompress.space import load_space

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    row["fp32_bytes"] = param_bytes(model)
    spec = ModelSpec(f"torchvision:{name}", 10, 3, size)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    calib = [(torch.randn(4, 3, size, size, generator=gen), torch.zeros(4, dtype=torch.long))]
    t0 = time.perf_counter()
    bound = load_space(None).bind(model, example)  # each option tried once on a copy
    row["bind_s"] = round(time.perf_counter() - t0, 3)
    row["layers"] = len(bound.layers)

    plan = channel_plan(bound)
    chan = [n for n, lp in plan.layers.items() if lp.prune == "channel"]
    row["channel_layers"] = len(chan)
    try:
        t0 = time.perf_counter()
        cm = compress(model, plan, example, calib)
        row["channel_compress_s"] = round(time.perf_counter() - t0, 3)
        with torch.no_grad():
            out = cm.eval()(example)
        shrunk = sum(cm.get_submodule(n).weight.shape[0] < model.get_submodule(n).weight.shape[0] for n in chan)
        row["channel_shrunk"] = int(shrunk)
        row["channel"] = "ok" if tuple(out.shape) == (2, 10) and shrunk == len(chan) else \
            f"output {tuple(out.shape)}, {shrunk}/{len(chan)} layers shrunk"
    except Exception as e:
        row["channel"] = _first_line(e)
        cm = None
    if cm is not None:
        try:
            row.update(round_trip(cm, spec, example, folder, "channel"))
        except Exception as e:
            row["channel_round_trip"] = _first_line(e)
        if row.get("channel_path"):
            row.update(deploy_check(row["channel_path"], example))
        del cm
        collect()  # the copy sits in reference cycles (autocompress.memory): freed now, as the search does

    smallest = bound.smallest()
    collect()
    trim()  # the pages glibc kept from the channel plan's stage would count towards this peak
    measured = reset_peak_rss()
    try:
        t0 = time.perf_counter()
        uncalibrated = compress(model, smallest, example, calibrate=False)
        row["compress_nocal_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        sized = artifact_size(uncalibrated, spec)  # what repair and warm start pay per plan, after compress
        row["size_s"] = round(time.perf_counter() - t0, 3)
        del uncalibrated
        collect()
        t0 = time.perf_counter()
        fm = compress(model, smallest, example, calib)
        row["compress_s"] = round(time.perf_counter() - t0, 3)
        if measured:
            row["compress_peak_rss_bytes"] = peak_rss()
        row["floor_bytes"] = sized
        row["floor_ratio"] = round(row["fp32_bytes"] / sized, 2)
        row["untouchable_bytes"] = untouchable_bytes(fm, spec)
    except Exception as e:
        row["floor"] = _first_line(e)
        return
    try:
        row.update(round_trip(fm, spec, example, folder, "floor"))
    except Exception as e:
        row["floor_round_trip"] = _first_line(e)
    row.pop("channel_path", None)
    row.pop("floor_path", None)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak RSS in bytes since start or the last reset_peak_rss (VmHWM)."""
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kb) * 1024


def guarded(row: dict[str, Any], run: Callable[[], None]) -> None:
    """Run one model's measurements; an exception becomes the row's status, error and trace."""
    try:
        run()
    except MemoryError:
        row["status"] = "out of memory"
    except Exception as e:
        row["status"] = "error"
        row["error"] = _first_line(e)
        row["trace"] = traceback.format_exc().splitlines()[-3:]


def run_one(name: str, size: int) -> dict[str, Any]:
    """All measurements of one model in this process (the child), as a row."""
    import torch

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name, "input": size, "status": "ok"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        guarded(row, lambda: measure(name, size, row, folder))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if "fp32_bytes" in row:
        row["rss_limit_bytes"] = 4 * row["fp32_bytes"] + 2 * 10**9
    return row


# ---- the driver (parent) -------------------------------------------------------------------

def spawn(name: str, size: int, mem_gb: float, timeout: float, script: str = __file__,
          extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run `script --one NAME --size SIZE` in a child under an address-space limit and a timeout;
    its last stdout line is the row (JSON)."""
    limit = int(mem_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.setsid()

    cmd = [sys.executable, os.path.abspath(script), "--one", name, "--size", str(size), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=cap)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return {"model": name, "input": size, "status": f"timeout ({timeout:.0f} s)",
                "seconds": round(time.perf_counter() - t0, 1)}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (err.strip().splitlines() or ["no output"])[-1][:160]
    status = "killed (memory)" if proc.returncode in (-9, 137) or "MemoryError" in err else f"crashed ({proc.returncode})"
    return {"model": name, "input": size, "status": status, "error": tail, "seconds": round(time.perf_counter() - t0, 1)}


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) else "-"


def _yes(v: Any) -> str:
    return {True: "yes", False: "NO"}.get(v, "-")


def table(rows: list[dict[str, Any]], skipped: list[tuple[str, int | None]], meta: str) -> str:
    """The Markdown summary of every row (and the models skipped for size)."""
    head = ("| model | params M | input | channel pruning | bytes = size | load equal | deployable | floor ratio "
            "| untouchable MB | compress s | size s | peak RSS GB: compress+size, child (limit) | status |")
    lines = ["# torchvision zoo through the engine", "", meta, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: r.get("params") or 0):
        equal = [r.get(f"{t}_bytes_equal") for t in ("channel", "floor") if f"{t}_bytes_equal" in r]
        load = [r.get(f"{t}_load_equal") for t in ("channel", "floor") if f"{t}_load_equal" in r]
        trip = "; ".join(f"{t}: {r[f'{t}_round_trip']}" for t in ("channel", "floor") if f"{t}_round_trip" in r)
        rss, during = r.get("peak_rss_bytes"), r.get("compress_peak_rss_bytes")
        rss_txt = "-"
        if rss and "rss_limit_bytes" in r:
            rss_txt = (f"{during / 1e9:.2f}, " if during else "-, ") + \
                f"{rss / 1e9:.2f} ({r['rss_limit_bytes'] / 1e9:.1f})"
            if (during or 0) > r["rss_limit_bytes"]:
                rss_txt += " OVER"
        chan = r.get("channel", "-")
        if chan == "ok":
            chan = f"ok ({r.get('channel_shrunk')}/{r.get('channel_layers')})"
        status = r["status"] if r["status"] != "ok" else ("ok" if "floor" not in r else f"floor: {r['floor']}")
        if r["status"] == "error":
            status = f"error: {r.get('error', '')}"
        lines.append(" | ".join([
            f"| {r['model']}", _mb(r.get("params")), str(r.get("input", "-")), chan.replace("|", "/"),
            _yes(all(equal)) if equal else "-", (_yes(all(load)) if load else "") + (f" {trip}" if trip else "")
            or "-",
            r.get("deploy", "-").replace("|", "/"), f"{r['floor_ratio']:.1f}x" if "floor_ratio" in r else "-",
            _mb(r.get("untouchable_bytes")), str(r.get("compress_s", "-")), str(r.get("size_s", "-")), rss_txt,
            status.replace("|", "/")]) + " |")
    if skipped:
        lines += ["", "Skipped (over the parameter cap): " + ", ".join(
            f"{n} ({(p or 0) / 1e6:.0f}M)" for n, p in skipped) + "."]
    return "\n".join(lines) + "\n"


def earlier_rows(jsonl: str, keep: bool) -> list[dict[str, Any]]:
    """The rows of an earlier run (--resume, --table), or none: then its file is removed."""
    if keep and os.path.isfile(jsonl):
        with open(jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]
    if os.path.exists(jsonl):
        os.remove(jsonl)
    return []


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: every torchvision classifier)")
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit per model (ulimit -v)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--resume", action="store_true", help="keep rows already in zoo.jsonl, run the others")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--table", action="store_true", help="only rewrite zoo.md from zoo.jsonl")
    ap.add_argument("--jobs", type=int, default=1, help="models measured at once (one thread each)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.size or input_size(a.one))), flush=True)
        return
    import torch
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    counts = {n: listed_params(n) for n in names}
    skipped = [(n, p) for n, p in counts.items() if p is not None and p > a.max_params]
    wanted = a.models.split(",") if a.models else names
    todo = sorted((n for n in wanted if (n, counts.get(n)) not in skipped), key=lambda n: (counts.get(n) or 0, n))
    os.makedirs(a.results, exist_ok=True)
    jsonl, md = os.path.join(a.results, "zoo.jsonl"), os.path.join(a.results, "zoo.md")
    rows = earlier_rows(jsonl, keep=a.resume or a.table)
    have = {r["model"] for r in rows}
    meta = (f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f} at the start: times are from a shared machine), 1 thread per model, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}; random weights, 10 classes; address space capped at "
            f"{a.mem_gb:g} GiB, {a.timeout:.0f} s per model. `python bench/zoo.py` (ordered by parameters).")
    if a.table:
        todo = []
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, a.jobs))
    futures = [pool.submit(spawn, n, input_size(n), a.mem_gb, a.timeout) for n in todo if n not in have]
    for future in futures:
        row = future.result()
        name = row["model"]
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(md, "w") as f:
            f.write(table(rows, skipped, meta))
        print(f"{name}: {row['status']} channel={row.get('channel', '-')} deploy={row.get('deploy', '-')} "
              f"floor={row.get('floor_ratio', '-')}x {row.get('seconds')} s", flush=True)
    with open(md, "w") as f:
        f.write(table(rows, skipped, meta))


if __name__ == "__main__":
    main()
