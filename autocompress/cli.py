"""Command line: search, report, export, evaluate, ui. torch and friends are imported inside handlers
so `--help` and input errors answer at once."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence


def _add_common(p: argparse.ArgumentParser, out_flag: bool = True) -> None:
    flags = ("--out", "--runs") if out_flag else ("--runs",)
    p.add_argument(*flags, dest="out", default="runs",
                   help="output folder of the search: study DB, MLflow store, artifacts (default: runs)")
    p.add_argument("--study", help="study name (default: MODEL-DATA-BUDGET for search; the only study for others)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/optuna.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autocompress", description=(
        "Search per-layer pruning, mixed-precision and low-rank plans for a PyTorch model under a size "
        "budget; every trial is fine-tuned, scored on a validation split and logged to MLflow."))
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run (or resume) a compression search")
    s.add_argument("--budget", required=True, help="artifact size: 50KB, 1.5MB, 200KiB, ... or a ratio: 20x")
    s.add_argument("--model", default="lenet5", help="lenet5 | mlp | resnet18 | torchvision:NAME | module:callable | "
                   "path/file.py:callable | saved module file (default: lenet5)")
    s.add_argument("--weights", help="state dict to load into the model (else the baseline is trained and cached)")
    s.add_argument("--data", help="fashion-mnist | digits | imagefolder:DIR | torchvision:NAME | module:callable "
                   "(default: fashion-mnist, else digits)")
    s.add_argument("--data-dir", help="where to look for the data set files")
    s.add_argument("--space", help="search-space YAML (default: search_spaces/default.yaml)")
    s.add_argument("--trials", type=int, default=12, help="total finished trials wanted in the study (default 12)")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine sharing the study (default 1); for several machines "
                   "run the same command on each with a shared --storage and --tracking-uri")
    s.add_argument("--timeout", help="stop starting trials after this long: 90s, 30m, 1h")
    s.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per trial (default 1)")
    s.add_argument("--baseline-epochs", type=int, help="epochs to train the baseline when no --weights")
    s.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate (default 0.01)")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--max-batches", type=int, help="cap on fine-tune batches per epoch (faster, noisier trials)")
    s.add_argument("--limit", type=int, help="use at most this many training samples (quick runs)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    s.add_argument("--register", metavar="NAME", help="also register the best model in MLflow's model registry")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu | cuda")
    s.add_argument("--early-stopping", default="median", choices=("median", "hyperband", "none"),
                   help="stop hopeless trials on their per-epoch val accuracy (with --epochs > 1; default median)")
    s.add_argument("--no-repair", action="store_true",
                   help="record over-budget proposals as infeasible instead of tightening them into the budget")
    s.add_argument("--no-warm-start", action="store_true",
                   help="skip the sensitivity analysis and the uniform/channel/knapsack plans tried first")
    s.add_argument("--final-top", type=int, default=3, help="plans re-fine-tuned longer at the end (default 3; 0: none)")
    s.add_argument("--final-epochs", type=int, default=2, help="fine-tune epochs for those finalists (default 2)")
    s.add_argument("--final-distill", type=float, default=0.5,
                   help="distillation weight (at least) for the finalists' fine-tune, 0 to 1 (default 0.5)")
    s.add_argument("--objectives", default="accuracy",
                   help="accuracy (default), or accuracy plus size and/or latency (accuracy,size,latency): a "
                   "multi-objective search returning the Pareto front")
    s.add_argument("--latency-budget", help="latency of the deployed model on --device: 2ms, 500us, 0.01s")
    s.add_argument("--latency-batch-size", type=int, default=1, help="batch size the latency is for (default 1)")
    s.add_argument("--latency-threads", type=int, help="CPU threads for latency (default: torch's current)")
    s.add_argument("--latency-plans", type=int,
                   help="plans timed to fit the latency predictor (default 48: cost.latency.PLANS)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_common(s)

    z = sub.add_parser("sensitivity", help="per-layer accuracy drop under pruning and quantisation")
    z.add_argument("--model", default="lenet5")
    z.add_argument("--weights")
    z.add_argument("--data")
    z.add_argument("--data-dir")
    z.add_argument("--baseline-epochs", type=int)
    z.add_argument("--amounts", help="pruning amounts to test (default: sensitivity.AMOUNTS, 0.5 to 0.99)")
    z.add_argument("--bits", help="weight bit widths to test (default: sensitivity.BITS, 2 to 6)")
    z.add_argument("--samples", type=int, default=2000, help="validation samples used (default 2000)")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--device", default="cpu")
    z.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    z.add_argument("--out", default="runs", help="output folder (results cached in OUT/sensitivity/)")

    r = sub.add_parser("report", help="table of a study's trials")
    r.add_argument("--format", choices=("table", "json"), default="table")
    r.add_argument("--top", type=int, default=10)
    r.add_argument("--plots", metavar="DIR", help="folder for the PNG plots (default: OUT/plots/STUDY)")
    r.add_argument("--no-plots", action="store_true", help="print the table only")
    _add_common(r)

    u = sub.add_parser("ui", help="start the MLflow UI on a search's tracking store")
    u.add_argument("--out", default="runs", help="output folder of the search, holding mlflow.db (default: runs)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")

    e = sub.add_parser("export", help="write a trial's compressed artifact (default: the best)")
    e.add_argument("--trial", type=int, help="trial number (default: the best feasible trial)")
    e.add_argument("--out", dest="to", required=True, help="destination file, e.g. best.acz")
    _add_common(e, out_flag=False)

    v = sub.add_parser("evaluate", help="load an artifact and print its test accuracy and size")
    v.add_argument("artifact")
    v.add_argument("--data", help="data spec (default: the one the model was compressed on)")
    v.add_argument("--data-dir")
    v.add_argument("--device", default="cpu")
    return parser


def _cmd_search(a: argparse.Namespace) -> int:
    from .api import search

    outcome = search(a.budget, model=a.model, data=a.data, weights=a.weights, data_dir=a.data_dir, space=a.space,
                     out=a.out, study=a.study, storage=a.storage, tracking_uri=a.tracking_uri, trials=a.trials,
                     timeout=a.timeout, epochs=a.epochs, baseline_epochs=a.baseline_epochs, lr=a.lr,
                     batch_size=a.batch_size, max_batches=a.max_batches, seed=a.seed, device=a.device,
                     limit=a.limit, early_stopping=a.early_stopping, repair=not a.no_repair,
                     warm_start=not a.no_warm_start, final_top=a.final_top, final_epochs=a.final_epochs,
                     final_distill=a.final_distill,
                     objectives=a.objectives, latency_budget=a.latency_budget,
                     latency_batch_size=a.latency_batch_size, latency_threads=a.latency_threads,
                     latency_plans=a.latency_plans, progress=not a.no_progress,
                     register=a.register, workers=a.workers)
    if outcome.best is not None:
        if a.tracking_uri is None:
            print(f"review in MLflow: autocompress ui --out {a.out}")
        elif a.tracking_uri.startswith(("http:", "https:")):
            print(f"review in MLflow: {a.tracking_uri}")
        else:
            print(f"review in MLflow: mlflow ui --backend-store-uri {a.tracking_uri}")
    return 0


def _cmd_sensitivity(a: argparse.Namespace) -> int:
    from .api import DEFAULT_BASELINE_EPOCHS, load_inputs
    from .errors import UserError
    from .plots import sensitivity_heatmap
    from .sensitivity import AMOUNTS, BITS, cached_analyse, format_table
    from .tracking import Tracker, default_tracking_uri
    from .train import baseline

    try:
        amounts = tuple(float(v) for v in a.amounts.split(",")) if a.amounts else AMOUNTS
        bits = tuple(int(v) for v in a.bits.split(",")) if a.bits else BITS
    except ValueError:
        raise UserError("--amounts and --bits take comma-separated numbers, e.g. --amounts 0.5,0.9 --bits 2,4") from None
    spec, bundle, _ = load_inputs(a.model, a.data, a.weights, a.data_dir, a.seed, None, 0.1)
    epochs = a.baseline_epochs if a.baseline_epochs is not None else DEFAULT_BASELINE_EPOCHS.get(a.model, 5)
    net, val_acc = baseline(spec, bundle, epochs=epochs, seed=a.seed, device=a.device, weights=a.weights)
    sens, path, cached = cached_analyse(net.to(a.device), bundle.val.to(a.device), bundle.train.x[:2].to(a.device),
                                        os.path.join(a.out, "sensitivity"), device=a.device, progress=True,
                                        amounts=amounts, bits=bits, samples=a.samples)
    print(f"{a.model} on {bundle.name}: val accuracy {sens.baseline_accuracy:.4f} on "
          f"{min(a.samples, len(bundle.val))} validation samples; "
          f"accuracy drop in points when only that layer is compressed{' (cached)' if cached else ''}")
    print(format_table(sens))
    tracker = Tracker(a.tracking_uri or default_tracking_uri(a.out), "sensitivity", os.path.join(a.out, "mlartifacts"))
    run = tracker.start_parent(f"{a.model}-{bundle.name}", {"model": a.model, "data": bundle.name,
                                                             "amounts": ",".join(map(str, amounts)),
                                                             "bits": ",".join(map(str, bits))})
    tracker.log_file(run, path)
    tracker.log_text(run, format_table(sens), "sensitivity.txt")
    tracker.log_file(run, sensitivity_heatmap(sens.table(), os.path.splitext(path)[0] + ".png"))
    tracker.end(run, "complete")
    print(f"saved {path}; logged to MLflow experiment 'sensitivity'")
    return 0


def _open(a: argparse.Namespace):  # -> optuna.Study
    import optuna

    from .errors import UserError
    from .plan import Budget
    from .search import SearchSettings, open_study

    if a.storage is None and not os.path.exists(os.path.join(a.out, "optuna.db")):
        raise UserError(f"no study database in {a.out}/ (run `autocompress search` first or pass --out/--storage)")
    from .workers import database_url

    settings = SearchSettings(budget=Budget(bytes=1), out=a.out, storage=database_url(a.storage), study=a.study or "")
    if not a.study:
        names = optuna.get_all_study_names(settings.storage_url)
        if len(names) != 1:
            raise UserError(f"{len(names)} studies in {settings.storage_url}: pick one with --study "
                            f"({', '.join(names) or 'none'})")
        settings.study = names[0]
    return open_study(settings, create=False)


def _cmd_report(a: argparse.Namespace) -> int:
    from .plan import format_bytes
    from .report import format_table, rows_json, trial_rows

    study = _open(a)
    rows = trial_rows(study)
    print(rows_json(rows) if a.format == "json" else f"study {study.study_name}\n{format_table(rows, a.top)}")
    if a.format != "json" and "untouchable_bytes" in study.user_attrs:
        print(f"{format_bytes(study.user_attrs['untouchable_bytes'])} of every artifact no plan can touch "
              "(header, float tensors outside the planned weights)")
    if not a.no_plots:
        from .review import write_plots

        paths = write_plots(study, a.plots or os.path.join(a.out, "plots", study.study_name))
        print(f"plots: {', '.join(paths)}", file=sys.stderr if a.format == "json" else sys.stdout)
    return 0


def _cmd_ui(a: argparse.Namespace) -> int:
    import subprocess

    from .errors import UserError

    db = os.path.abspath(os.path.join(a.out, "mlflow.db"))
    if not os.path.isfile(db):
        raise UserError(f"no MLflow store in {a.out}/ (no mlflow.db): run `autocompress search` first or pass --out")
    host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    print(f"MLflow UI on {db}: http://{host}:{a.port}  (Ctrl-C stops it)", flush=True)
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
                            "--host", a.host, "--port", str(a.port)])


def _cmd_export(a: argparse.Namespace) -> int:
    from .errors import UserError
    from .refine import best_final
    from .search import best_trial

    study = _open(a)
    final = best_final(study)
    if a.trial is None and final is not None:
        number, info = final
        src, label = info["artifact"], f"trial {number} (refined for {info['epochs']} epochs)"
        return _copy_artifact(src, a.to, label)
    if a.trial is None:
        t = best_trial(study)
        if t is None:
            raise UserError(f"study {study.study_name} has no feasible completed trial to export")
    else:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == a.trial]
        if not match:
            raise UserError(f"study {study.study_name} has no trial {a.trial}")
        t = match[0]
    src = t.user_attrs.get("artifact")
    if src and not os.path.isfile(src):
        raise UserError(f"trial {t.number}'s artifact {src} is not on this machine: it ran on "
                        f"{t.user_attrs.get('worker', 'another machine')}; export it there")
    if not src:
        raise UserError(f"trial {t.number} has no artifact (state {t.state.name.lower()}); pick a completed trial")
    return _copy_artifact(src, a.to, f"trial {t.number}")


def _copy_artifact(src: str, dst: str, label: str) -> int:
    from .errors import UserError

    if not os.path.isfile(src):
        raise UserError(f"{label}: artifact {src} is missing")
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    print(f"{label}: {os.path.getsize(dst)} bytes -> {dst}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .data import load_data
    from .errors import UserError
    from .artifact import load, read_header
    from .train import evaluate

    if not os.path.isfile(a.artifact):
        raise UserError(f"artifact not found: {a.artifact}")
    header = read_header(a.artifact)
    spec = header.get("spec", {})
    data_spec = a.data or spec.get("data")
    if not data_spec:
        raise UserError("the artifact does not say which data it was compressed on: pass --data")
    model = load(a.artifact).to(a.device)
    bundle = load_data(data_spec, data_dir=a.data_dir)
    acc = evaluate(model, bundle.test.to(a.device), device=a.device)
    size = os.path.getsize(a.artifact)
    print(f"{a.artifact}: test accuracy {acc:.4f} on {bundle.name} ({len(bundle.test)} samples), {size} bytes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line and exit code 2 for bad input."""
    from .errors import UserError
    from .plan import PlanError

    args = build_parser().parse_args(argv)
    handler = {"search": _cmd_search, "report": _cmd_report, "export": _cmd_export, "evaluate": _cmd_evaluate,
               "sensitivity": _cmd_sensitivity, "ui": _cmd_ui}
    try:
        return handler[args.command](args)
    except (UserError, PlanError) as e:
        print(f"autocompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
