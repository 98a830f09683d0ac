"""Command line: search, report, export, evaluate, ui. torch and friends are imported inside handlers
so `--help` and input errors answer at once."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import NoReturn, Sequence

from .settings import DEFAULT_BASELINE_EPOCHS, OTHER_BASELINE_EPOCHS, add_arguments, cli_options


class Parser(argparse.ArgumentParser):
    """argparse, but a wrong command line is one line on stderr and exit code 2, as for any other
    bad input (argparse's own error prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autocompress: error: {message} (see: {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser, out_flag: bool = True) -> None:
    flags = ("--out", "--runs") if out_flag else ("--runs",)
    p.add_argument(*flags, dest="out", default="runs",
                   help="output folder of the search: study DB, MLflow store, artifacts (default: runs)")
    p.add_argument("--study", help="study name (default: MODEL-DATA-BUDGET for search; the only study for others)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/optuna.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="autocompress", description=(
        "Search per-layer pruning, mixed-precision and low-rank plans for a PyTorch model under a size "
        "budget; every trial is fine-tuned, scored on a validation split and logged to MLflow."))
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run (or resume) a compression search")
    add_arguments(s)  # one flag per SearchSettings field

    z = sub.add_parser("sensitivity", help="per-layer accuracy drop under pruning and quantisation")
    z.add_argument("--model", default="lenet5")
    z.add_argument("--weights")
    z.add_argument("--data")
    z.add_argument("--data-dir")
    z.add_argument("--image-size", type=int, help="resize images to N x N (image folders: default the model's size)")
    z.add_argument("--baseline-epochs", type=int)
    z.add_argument("--amounts", help="pruning amounts to test (default: sensitivity.AMOUNTS, 0.5 to 0.99, or fewer "
                   "to fit --seconds)")
    z.add_argument("--bits", help="weight bit widths to test (default: sensitivity.BITS, 2 to 6, or fewer to fit "
                   "--seconds)")
    z.add_argument("--samples", type=int, help="validation samples used (default: sensitivity.SAMPLES, 128)")
    z.add_argument("--seconds", type=float, default=None, help="time the default grid aims at (default: "
                   "sensitivity.SECONDS, 50)")
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
    v.add_argument("--latency", action="store_true",
                   help="also time the deployed model and the uncompressed fp32 original (median, same process)")
    v.add_argument("--batch-size", type=int, default=1, help="batch size for --latency (default 1)")
    v.add_argument("--threads", type=int, help="CPU threads for --latency (default: torch's current)")
    return parser


def _cmd_search(a: argparse.Namespace) -> int:
    from .api import search
    from .settings import SearchSettings

    options = cli_options(a)
    outcome = search(options.pop("budget"), **options)
    if outcome.best is not None:
        if a.tracking_uri is None:
            out = a.out if a.out is not None else SearchSettings.__dataclass_fields__["out"].default
            print(f"review in MLflow: autocompress ui --out {out}")
        elif a.tracking_uri.startswith(("http:", "https:")):
            print(f"review in MLflow: {a.tracking_uri}")
        else:
            print(f"review in MLflow: mlflow ui --backend-store-uri {a.tracking_uri}")
    return 0


def _cmd_sensitivity(a: argparse.Namespace) -> int:
    from .api import load_inputs
    from .errors import UserError
    from .plots import sensitivity_heatmap
    from .sensitivity import SAMPLES, SECONDS, cached_analyse, format_table
    from .tracking import Tracker, default_tracking_uri
    from .train import baseline
    from .trials import TrialState

    a.samples = a.samples or SAMPLES
    try:
        amounts = tuple(float(v) for v in a.amounts.split(",")) if a.amounts else None
        bits = tuple(int(v) for v in a.bits.split(",")) if a.bits else None
    except ValueError:
        raise UserError("--amounts and --bits take comma-separated numbers, e.g. --amounts 0.5,0.9 --bits 2,4") from None
    spec, bundle, _ = load_inputs(a.model, a.data, a.weights, a.data_dir, a.seed, None, 0.1, a.image_size)
    epochs = a.baseline_epochs if a.baseline_epochs is not None else DEFAULT_BASELINE_EPOCHS.get(a.model, OTHER_BASELINE_EPOCHS)
    net, val_acc = baseline(spec, bundle, epochs=epochs, seed=a.seed, device=a.device, weights=a.weights)
    sens, path, cached = cached_analyse(net.to(a.device), bundle.val.to(a.device), bundle.train.x[:2].to(a.device),
                                        os.path.join(a.out, "sensitivity"), device=a.device, progress=True,
                                        amounts=amounts, bits=bits, samples=a.samples, seconds=a.seconds or SECONDS)
    print(f"{a.model} on {bundle.name}: val accuracy {sens.baseline_accuracy:.4f} on "
          f"{sens.samples or min(a.samples, len(bundle.val))} validation samples; "
          f"accuracy drop in points when only that layer is compressed{' (cached)' if cached else ''}; "
          f"measured: {sens.describe()}")
    print(format_table(sens))
    tracker = Tracker(a.tracking_uri or default_tracking_uri(a.out), "sensitivity", os.path.join(a.out, "mlartifacts"))
    timed = "sized to --seconds"
    grid = {"amounts": a.amounts or timed, "bits": a.bits or timed, "measured": sens.describe()}
    run = tracker.start_parent(f"{a.model}-{bundle.name}", {"model": a.model, "data": bundle.name, **grid})
    tracker.log_file(run, path)
    tracker.log_text(run, format_table(sens), "sensitivity.txt")
    tracker.log_file(run, sensitivity_heatmap(sens.table(), os.path.splitext(path)[0] + ".png"))
    tracker.end(run, TrialState.COMPLETE)
    print(f"saved {path}; logged to MLflow experiment 'sensitivity'")
    return 0


def _open(a: argparse.Namespace):  # -> optuna.Study
    import optuna

    from .errors import UserError
    from .plan import Budget
    from .settings import SearchSettings
    from .storage import database_url
    from .study import open_study

    if a.storage is None and not os.path.exists(os.path.join(a.out, "optuna.db")):
        raise UserError(f"no study database in {a.out}/ (run `autocompress search` first or pass --out/--storage)")

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
    from .trials import StudyAttr

    study = _open(a)
    rows = trial_rows(study)
    print(rows_json(rows) if a.format == "json" else f"study {study.study_name}\n{format_table(rows, a.top)}")
    if a.format != "json" and StudyAttr.UNTOUCHABLE in study.user_attrs:
        print(f"{format_bytes(study.user_attrs[StudyAttr.UNTOUCHABLE])} of every artifact no plan can touch "
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
    from .trials import Attr, best_final, best_trial

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
    src = t.user_attrs.get(Attr.ARTIFACT)
    if src and not os.path.isfile(src):
        raise UserError(f"trial {t.number}'s artifact {src} is not on this machine: it ran on "
                        f"{t.user_attrs.get(Attr.WORKER, 'another machine')}; export it there")
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
    bundle = load_data(data_spec, data_dir=a.data_dir, image_size=spec.get("image_size"))
    acc = evaluate(model, bundle.test.to(a.device), device=a.device)
    size = os.path.getsize(a.artifact)
    print(f"{a.artifact}: test accuracy {acc:.4f} on {bundle.name} ({len(bundle.test)} samples), {size} bytes")
    if a.latency:
        print(_latency_line(a, header, bundle.test.x))
    return 0


def _latency_line(a: argparse.Namespace, header: dict, inputs) -> str:  # inputs: torch.Tensor
    """Median latency of the deployed artifact next to the fp32 original's (the architecture
    rebuilt from the artifact's spec), both timed here, on the same input, device and threads."""
    from .cost.latency import measure_latency
    from .deploy import deployable
    from .errors import UserError
    from .models import ModelSpec, build_model

    if a.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {a.batch_size}")
    example = inputs[:1].to(a.device)
    deployed = deployable(a.artifact, device=a.device, calib=inputs[:256], batch_size=a.batch_size,
                          threads=a.threads)
    original = build_model(ModelSpec(**header["spec"])).eval().to(a.device)
    timed = [measure_latency(m, example, device=a.device, batch_size=a.batch_size, threads=a.threads,
                             warmup=10, repeats=100) for m in (deployed, original)]
    fast, fp32 = timed
    threads = f", {fast.threads} threads" if a.device == "cpu" else ""
    return (f"latency on {a.device} at batch {a.batch_size}{threads}: deployed {fast.median_ms:.3f} ms, "
            f"fp32 original {fp32.median_ms:.3f} ms (median of {len(fast.timings_ms)} runs; "
            f"{fp32.median_ms / fast.median_ms:.2f}x)")


def _attach_dash_values(argv: list[str]) -> list[str]:
    """`--budget -5MB` -> `--budget=-5MB`: argparse takes a value starting with a dash for a flag
    and answers "expected one argument"; attached, the value reaches its own check ("budget must
    be positive")."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-[0-9.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line and exit code 2 for bad input."""
    from .errors import UserError
    from .plan import PlanError

    args = build_parser().parse_args(_attach_dash_values(list(sys.argv[1:] if argv is None else argv)))
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
