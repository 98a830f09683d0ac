"""Every torchvision classifier through the real CLI search, as a user with a checkpoint runs it.

For each name of `torchvision.models.list_models(module=torchvision.models)` up to --max-params
parameters, one child process (under `ulimit -v` and a timeout, as bench/zoo.py does):

1. builds `models.build_model(ModelSpec('torchvision:NAME', 10, 1, 28))` with random weights
   (the grey Fashion-MNIST stem) and saves its state dict as ckpt.pt;
2. runs `python -m autocompress search --model torchvision:NAME --weights ckpt.pt
   --data fashion-mnist --budget 20x --trials 3 --max-batches 2 --limit 600 --no-progress`
   (one CPU thread), with `--image-size S` where the model cannot run on 28 x 28 images
   (S = zoo.input_size: 224 for vit/swin/maxvit, 299 for inception_v3, else 64); with
   `--data imagefolder:DIR` every model searches that folder instead, at 28 x 28 or S (RGB
   checkpoint, `--batch-size 16`): a small folder (bench/image_folder.py) keeps the test
   evaluations short, where 10,000 Fashion-MNIST test images took 500 s for DenseNet-121 at 64;
3. checks:
   - exit: the search's exit code is 0;
   - complete: the study holds >= 1 COMPLETE trial (within the budget);
   - bytes: os.path.getsize(best.acz) equals the size the study recorded for the exported trial
     (the refined finalist's, else the trial's);
   - load: `autocompress.load(best.acz)` runs, with the parameter shapes of the checkpoint model
     compressed by the best trial's plan, and that compressed model exported and loaded back gives
     its logits (zoo.round_trip: bytes equal, logits allclose). The search's own compressed model
     is fine-tuned inside the search and gone, so the logits are compared on the recompressed one;
   - deploy: `autocompress.deploy.deployable(best.acz)` runs it on CPU (zoo.deploy_check).

Records wall seconds of the search, the sensitivity seconds it printed, the trials' seconds (sum of
the study's per-trial seconds) and the search's peak RSS.

    python bench/zoo_search.py --jobs 1                       # all models
    python bench/zoo_search.py --models mobilenet_v2,googlenet --resume

Writes bench/results/zoo_search.jsonl (one line per model) and bench/results/zoo_search.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402  (bench/zoo.py: sizes, child processes, the round-trip and deploy checks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = 28  # Fashion-MNIST's own size
SEARCH_ARGS = ["--data", "fashion-mnist", "--budget", "20x", "--trials", "3", "--max-batches", "2",
               "--limit", "600", "--no-progress"]


def runs_at_native(model: Any) -> bool:
    """Whether the model runs (eval and train mode) on 28 x 28 grey images."""
    import torch

    x = torch.randn(2, 1, NATIVE, NATIVE)
    try:
        with torch.no_grad():
            model.eval()(x)
            model.train()(x)
        return True
    except Exception:
        return False
    finally:
        model.eval()


def search_args(size: int | None, data: str | None) -> list[str]:
    """SEARCH_ARGS for a model at `size` (None: 28 x 28). Other `data` than Fashion-MNIST is searched
    at the model's size, 16 images a batch (at 224 x 224 on one CPU thread, 10,000 Fashion-MNIST
    test images alone take 20-70 min to evaluate)."""
    if not data or data == "fashion-mnist":
        return [*SEARCH_ARGS] + (["--image-size", str(size)] if size else [])
    args = list(SEARCH_ARGS)
    args[args.index("--data") + 1] = data
    return [*args, "--image-size", str(size or NATIVE), "--batch-size", "16"]


def channels(data: str | None) -> int:
    """Input channels of the checkpoint: image folders are read as RGB."""
    return 3 if data and data.startswith("imagefolder:") else 1


def search_cli(name: str, ckpt: str, size: int | None, out: str, row: dict[str, Any],
               data: str | None = None) -> str:
    """Run the CLI search (one thread) and record exit code, times and peak RSS; returns its output."""
    cmd = [sys.executable, "-m", "autocompress", "search", "--model", f"torchvision:{name}", "--weights", ckpt,
           *search_args(size, data), "--out", out]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    log = os.path.join(os.path.dirname(out), "search.log")
    stamped: list[tuple[float, str]] = []
    with open(log, "w") as f:  # written as it goes, each line with its second: a timed-out model's log says where it was
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out)
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((time.perf_counter() - t0, line.rstrip("\n")))
            f.write(f"{stamped[-1][0]:7.1f}  {line}")
            f.flush()
        proc.wait()
    row["search_s"] = round(time.perf_counter() - t0, 1)
    row["search_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    row["exit"] = proc.returncode
    text = "\n".join(line for _, line in stamped)
    m = re.search(r"^sensitivity \(([\d.]+)s[,)]", text, re.M)
    if m:
        row["sensitivity_s"] = float(m.group(1))
    row.update(phases(stamped, row["search_s"]))
    if proc.returncode != 0:
        row["error"] = last_line(log)
    return text


PHASES = (("setup_s", "study "), ("warm_start_s", "warm start:"), ("trials_wall_s", "finalist trial"),
          ("finalists_s", "top trials"))  # (phase, first line of the next one)


def phases(stamped: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Wall seconds of each stage from the time-stamped output: setup (imports, data, baseline,
    binding the space) until the study line, the warm start (sensitivity), the trials, the
    finalists' fine-tunes, and the finish (test accuracy, export, review) after them."""
    out, start = {}, 0.0
    for key, marker in PHASES:
        t = next((t for t, line in stamped if line.startswith(marker)), None)
        if t is None:
            continue
        out[key], start = round(t - start, 1), t
    if out:
        out["finish_s"] = round(total - start, 1)
    return out


def last_line(path: str) -> str:
    """The last non-empty line of a (time-stamped) log ('' when there is none)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return re.sub(r"^\d+\.\d\s+", "", (lines or [""])[-1])[:200]  # without the log's time stamp


def study_checks(out: str, row: dict[str, Any]) -> Any:
    """Complete trials, trial seconds, and the exported trial's plan and recorded size."""
    import optuna

    from autocompress.plan import CompressionPlan
    from autocompress.trials import Attr, TrialState, best_final, exported_trial, trial_state

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{os.path.join(out, 'optuna.db')}"
    (study_name,) = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=study_name, storage=url)
    states = [str(trial_state(t)) for t in study.trials]
    row["trial_states"] = states
    row["complete"] = states.count(str(TrialState.COMPLETE))
    row["trials_s"] = round(sum(t.user_attrs.get(Attr.SECONDS, 0.0) for t in study.trials), 1)
    fails = [t.user_attrs.get(Attr.FAIL_REASON) for t in study.trials if t.user_attrs.get(Attr.FAIL_REASON)]
    if fails:
        row["fail_reason"] = str(fails[0])[:200]
    best = exported_trial(study)
    if best is None:
        return None
    final = best_final(study)
    row["best_trial"] = best.number
    row["best_recorded_bytes"] = final[1]["size_bytes"] if final else best.user_attrs[Attr.SIZE_BYTES]
    return CompressionPlan.from_dict(best.user_attrs[Attr.PLAN])


def artifact_checks(name: str, ckpt: str, size: int, plan: Any, best: str, folder: str, row: dict[str, Any],
                    in_channels: int = 1) -> None:
    """bytes, load and deploy of best.acz (see the module docstring)."""
    import torch

    from autocompress.artifact import load
    from autocompress.compression import compress, plain_copy
    from autocompress.models import ModelSpec, build_model, load_weights

    row["best_bytes"] = os.path.getsize(best)
    row["bytes_equal"] = row["best_bytes"] == row["best_recorded_bytes"]
    spec = ModelSpec(f"torchvision:{name}", 10, in_channels, size)
    model = build_model(spec).eval()
    load_weights(model, ckpt)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, in_channels, size, size, generator=gen)
    calib = [(torch.randn(4, in_channels, size, size, generator=gen), torch.zeros(4, dtype=torch.long))]
    loaded = load(best)
    with torch.no_grad():
        out = loaded.eval()(example)
    cm = compress(model, plan, example, calib)
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in plain_copy(cm).state_dict().items()}
    row["load_shapes_equal"] = shapes == want
    if shapes != want:
        row["load_shapes_diff"] = sorted(set(shapes.items()) ^ set(want.items()))[:3]
    row["load_runs"] = tuple(out.shape) == (2, 10) and bool(torch.isfinite(out).all())
    trip = zoo.round_trip(cm, spec, example, folder, "replan")
    row["replan_bytes_equal"], row["load_max_diff"] = trip["replan_bytes_equal"], trip["replan_load_max_diff"]
    row["load_equal"] = trip["replan_load_equal"]
    row.update(zoo.deploy_check(best, example))


def verdict(row: dict[str, Any]) -> str:
    """'ok', or the first failing check."""
    if row.get("status", "ok") != "ok":
        return row["status"]
    if row.get("exit") != 0:
        return f"exit {row.get('exit')}"
    if not row.get("complete"):
        return "no complete trial"
    for key, label in (("bytes_equal", "bytes"), ("replan_bytes_equal", "bytes (replanned)"),
                       ("load_runs", "load runs"), ("load_shapes_equal", "load shapes"), ("load_equal", "load logits")):
        if row.get(key) is not True:
            return label
    return "ok" if row.get("deploy") == "ok" else "deploy"


def measure(name: str, folder: str, row: dict[str, Any], data: str | None = None) -> None:
    """Checkpoint, search, checks; fills `row` step by step so a late failure keeps what came before."""
    import torch

    from autocompress.models import ModelSpec, build_model, param_bytes

    torch.manual_seed(0)
    model = build_model(ModelSpec(f"torchvision:{name}", 10, 1, NATIVE))
    row["params"] = sum(p.numel() for p in model.parameters())
    row["fp32_bytes"] = param_bytes(model)
    size = None if runs_at_native(model) else zoo.input_size(name)
    row["input"] = size or NATIVE
    in_channels = channels(data)
    if data and data != "fashion-mnist":
        row["data"] = data
    if in_channels != 1:
        model = build_model(ModelSpec(f"torchvision:{name}", 10, in_channels, size or NATIVE))
    ckpt = os.path.join(folder, "ckpt.pt")
    torch.save(model.state_dict(), ckpt)
    del model
    out = os.path.join(folder, "out")
    os.makedirs(out)
    search_cli(name, ckpt, size, out, row, data)
    if not os.path.isfile(os.path.join(out, "optuna.db")):
        return
    plan = study_checks(out, row)
    best = os.path.join(out, "best.acz")
    if plan is not None and os.path.isfile(best):
        artifact_checks(name, ckpt, row["input"], plan, best, folder, row, in_channels)


def work_folder(name: str) -> str:
    """The model's folder (checkpoint, search output, search.log), known to the parent too."""
    return os.path.join(tempfile.gettempdir(), f"zoo_search_{name}")


def run_one(name: str, keep: str | None, data: str | None = None) -> dict[str, Any]:
    """All of one model in this process (the child), as a row."""
    import torch

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name, "status": "ok"}
    t0 = time.perf_counter()
    folder = work_folder(name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    zoo.guarded(row, lambda: measure(name, folder, row, data))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_bytes"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    row["verdict"] = verdict(row)
    if keep:  # the log; for a failing model also its checkpoint and best artifact, to reproduce it
        files = ["search.log"] + (["ckpt.pt", "out/best.acz", "out/optuna.db"] if row["verdict"] != "ok" else [])
        for rel in files:
            if os.path.isfile(os.path.join(folder, rel)):
                dst = os.path.join(keep, name + ".log") if rel == "search.log" else os.path.join(keep, name, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(os.path.join(folder, rel), dst)
    shutil.rmtree(folder, ignore_errors=True)
    return row


# ---- the driver (parent) -------------------------------------------------------------------

def table(rows: list[dict[str, Any]], skipped: list[tuple[str, int | None]], meta: str,
          missing: list[str] | None = None) -> str:
    """The Markdown summary: one row per model, then the totals, the models not run, and the notes."""
    head = ("| model | params M | input | exit | complete | bytes = recorded | load (max diff) | deployable "
            "| search s | setup / sensitivity / trials / finalists / finish s | peak RSS GB | result |")
    lines = ["# torchvision zoo through `autocompress search`", "", meta, "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: r.get("params") or r.get("listed_params") or 0):
        v = r.get("verdict") or verdict(r)
        why = v if v == "ok" else f"**{v}**" + (f": {r['error']}" if r.get("error") else "") \
            + (f" (trials: {r['fail_reason']})" if r.get("fail_reason") and not r.get("complete") else "")
        load = zoo._yes(r.get("load_equal") and r.get("load_runs") and r.get("load_shapes_equal")) \
            if "load_equal" in r else "-"
        if "load_max_diff" in r:
            load += f" ({r['load_max_diff']:.1e})"
        rss = r.get("peak_rss_bytes")
        lines.append(" | ".join([
            f"| {r['model']}", zoo._mb(r.get("params")), str(r.get("input", "-")) + (" RGB folder" if "data" in r else ""), str(r.get("exit", "-")),
            f"{r['complete']}/{len(r['trial_states'])}" if "trial_states" in r else "-",
            zoo._yes(r["bytes_equal"] and r.get("replan_bytes_equal")) if "bytes_equal" in r else "-", load,
            str(r.get("deploy", "-")), str(r.get("search_s", r.get("seconds", "-"))), split(r),
            f"{rss / 1e9:.2f}" if rss else "-",
            why.replace("|", "/")]) + " |")
    ok = [r for r in rows if (r.get("verdict") or verdict(r)) == "ok"]
    times = [r.get("search_s", r.get("seconds", 0)) for r in rows]
    lines += ["", f"{len(ok)} of {len(rows)} models pass every check; search time {sum(times) / 60:.1f} min in all"
              + (f", slowest {max(rows, key=lambda r: r.get('search_s', r.get('seconds', 0)))['model']} "
                 f"({max(times):.0f} s)" if rows else "") + "."]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}, in scope but without a row): " + ", ".join(missing) + "."]
    if skipped:
        lines += ["", "Skipped (over the parameter cap): " + ", ".join(
            f"{n} ({(p or 0) / 1e6:.0f}M)" for n, p in skipped) + "."]
    notes = os.path.join(zoo.RESULTS, "zoo_search.notes.md")  # hand-written: what was not run, and why
    if os.path.isfile(notes):
        with open(notes) as f:
            lines += ["", f.read().rstrip()]
    return "\n".join(lines) + "\n"


def family(name: str) -> str:
    """'resnet' for resnet50, 'regnet_x' for regnet_x_8gf, 'efficientnet_v2' for efficientnet_v2_s."""
    return re.match(r"regnet_[xy]|[a-z]+(_v\d)?", name).group()


def split(r: dict[str, Any]) -> str:
    """'12 / 30 / 8 / 20 / 15' from a row's phases ('-' where a stage was not reached); the
    sensitivity is its own printed time where there is one."""
    keys = ("setup_s", "warm_start_s", "trials_wall_s", "finalists_s", "finish_s")
    vals = [r.get("sensitivity_s", r.get(k)) if k == "warm_start_s" else r.get(k) for k in keys]
    return " / ".join("-" if v is None else f"{v:.0f}" for v in vals) if any(v is not None for v in vals) else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names, run in this order (default: every torchvision "
                    "classifier, by parameters)")
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit per model (ulimit -v)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    ap.add_argument("--resume", action="store_true", help="keep rows already in zoo_search.jsonl, run the others")
    ap.add_argument("--results", default=zoo.RESULTS)
    ap.add_argument("--table", action="store_true", help="only rewrite zoo_search.md from zoo_search.jsonl")
    ap.add_argument("--jobs", type=int, default=1, help="models searched at once (one thread each)")
    ap.add_argument("--keep", help="copy each model's search output (NAME.log) to this folder")
    ap.add_argument("--exclude", help="comma-separated names to leave out")
    ap.add_argument("--families-first", action="store_true",
                    help="the smallest model of each family first, then the others (each by parameters)")
    ap.add_argument("--data", default="fashion-mnist", help="data every model searches: fashion-mnist (28 x 28, "
                    "resized where a model needs more), or e.g. imagefolder:DIR from bench/image_folder.py, searched "
                    "at 28 x 28 or the model's size with 16 images a batch")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.keep, a.data)), flush=True)
        return
    import torch
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    counts = {n: zoo.listed_params(n) for n in names}
    skipped = [(n, p) for n, p in counts.items() if p is not None and p > a.max_params]
    wanted = [n for n in (a.models.split(",") if a.models else names) if n not in (a.exclude or "").split(",")]
    todo = [n for n in wanted if (n, counts.get(n)) not in skipped]
    if not a.models:  # named models run in the order given
        todo.sort(key=lambda n: (counts.get(n) or 0, n))
    if a.families_first:
        firsts = {family(n): n for n in reversed(todo)}
        todo = sorted(todo, key=lambda n: firsts[family(n)] != n)
    os.makedirs(a.results, exist_ok=True)
    jsonl, md = os.path.join(a.results, "zoo_search.jsonl"), os.path.join(a.results, "zoo_search.md")
    rows = zoo.earlier_rows(jsonl, keep=a.resume or a.table)
    for r in rows:  # a killed model's row has no count of its own: order it by torchvision's
        r.setdefault("listed_params", counts.get(r["model"]))
    have = {r["model"] for r in rows}
    loads = [r["load_avg"] for r in rows if "load_avg" in r] or [os.getloadavg()[0]]
    meta = (f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared with other work: load average "
            f"{min(loads):.1f} to {max(loads):.1f} when the models started), 1 thread per search, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}. Random-weight checkpoint, `search {' '.join(SEARCH_ARGS)}` (input 28 x 28 "
            f"grey unless the model needs more: then `--image-size`, see the input column); address space capped at "
            f"{a.mem_gb:g} GiB, {a.timeout:.0f} s per model unless the notes say otherwise. `python bench/zoo_search.py` "
            "(ordered by parameters).")
    in_scope = sorted((n for n in names if (n, counts.get(n)) not in skipped), key=lambda n: (counts.get(n) or 0, n))
    missing = lambda: [n for n in in_scope if n not in {r["model"] for r in rows}]  # noqa: E731
    if a.table:
        todo = []
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    extra = (["--keep", os.path.abspath(a.keep)] if a.keep else []) + ["--data", a.data]
    pool = ThreadPoolExecutor(max(1, a.jobs))
    futures = [pool.submit(spawn, n, a.mem_gb, a.timeout, extra) for n in todo if n not in have]
    for future in futures:
        row = future.result()
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(md, "w") as f:
            f.write(table(rows, skipped, meta, missing()))
        print(f"{row['model']}: {row.get('verdict') or verdict(row)} exit={row.get('exit', '-')} "
              f"complete={row.get('complete', '-')} deploy={row.get('deploy', '-')} {row.get('seconds')} s"
              + (f" ({row['error']})" if row.get("error") else ""), flush=True)
    with open(md, "w") as f:
        f.write(table(rows, skipped, meta, missing()))


def spawn(name: str, mem_gb: float, timeout: float, extra: list[str]) -> dict[str, Any]:
    """zoo.spawn of this script for one model; the verdict filled in for rows the child could not write."""
    load = os.getloadavg()[0]
    row = zoo.spawn(name, 0, mem_gb, timeout, script=__file__, extra=extra)
    row.update(load_avg=round(load, 1), mem_gb=mem_gb, timeout_s=timeout)
    if "verdict" not in row:  # zoo.spawn's row for a child that wrote none (killed): say where its search was
        row.pop("input", None)
        row["error"] = last_line(os.path.join(work_folder(name), "search.log")) or row.get("error", "")
        row["verdict"] = verdict(row)
        shutil.rmtree(work_folder(name), ignore_errors=True)
    return row


if __name__ == "__main__":
    main()
