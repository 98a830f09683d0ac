"""Every option of a search, declared once: type, default, help text and range check.

`SearchSettings` is the one declaration. `api.search(budget, **options)` builds it with
`SearchSettings.from_options`, the CLI's `search` parser is generated from its fields
(`add_arguments`), and worker processes receive `options()` back as JSON. Adding an option is
one field here plus the code that uses it.

This module imports no torch, Optuna or MLflow at import time, so `--help` answers at once.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

from .errors import UserError
from .plan import Budget, parse_budget

EARLY_STOPPING = ("median", "hyperband", "none")
OBJECTIVES = ("accuracy", "size", "latency")
DEFAULT_BASELINE_EPOCHS = {"lenet5": 8, "mlp": 8, "resnet18": 15}
OTHER_BASELINE_EPOCHS = 5


def parse_duration(text: str | float | None) -> float | None:
    """'30m', '90s', '1.5h', '45' (seconds) -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return float(text) if text is not None else None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h|min|sec)?\s*", str(text))
    if not m:
        raise UserError(f"cannot parse duration {text!r}: use e.g. 90s, 30m or 1.5h")
    value = float(m.group(1))
    return value * {"h": 3600, "m": 60, "min": 60}.get(m.group(2) or "s", 1)


def parse_objectives(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'accuracy,size' -> ('accuracy', 'size'): accuracy first, then size and/or latency."""
    items = text.split(",") if isinstance(text, str) else list(text)
    objs = tuple(o.strip() for o in items if o.strip())
    if not objs or objs[0] != "accuracy" or not set(objs) <= set(OBJECTIVES) or len(set(objs)) != len(objs):
        raise UserError(f"--objectives {text!r}: use accuracy, optionally followed by size and/or latency "
                        "(e.g. accuracy,size,latency)")
    return objs


def parse_early_stopping(kind: bool | str) -> str:
    """median | hyperband | none (True means median, False none, as the API once took)."""
    kind = {True: "median", False: "none"}.get(kind, kind) if isinstance(kind, bool) else kind
    if kind not in EARLY_STOPPING:
        raise UserError(f"--early-stopping {kind!r}: use median, hyperband or none")
    return kind


def parse_latency_ms(text: str | float) -> float:
    """'2ms', '500us', '0.01s', '3' (ms) -> milliseconds (cost.latency.parse_latency)."""
    from .cost.latency import parse_latency

    return parse_latency(text)


def _database_url(url: str | None) -> str | None:
    from .storage import database_url

    return database_url(url)


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"at least {low:g}"


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0), "positive"


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False
            ) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    return ok, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def option(default: Any, help: str, *, check: tuple[Callable[[Any], bool], str] | None = None,
           parse: Callable[[Any], Any] | None = None, flags: tuple[str, ...] = (), cli: bool = True,
           metavar: str | None = None) -> Any:
    """A SearchSettings field: its default, help text, range check (predicate, wording), parser
    (from the CLI's text or the API's value; types are converted from the annotation otherwise),
    extra CLI flags, and whether the CLI offers it."""
    meta = {"help": help, "check": check, "parse": parse, "flags": flags, "cli": cli, "metavar": metavar,
            "required": default is MISSING}
    return field(default=default, metadata=meta)


def _internal(factory: Callable[[], Any]) -> Any:
    """A setting that is not a user option (read from the environment)."""
    return field(default_factory=factory, metadata={"internal": True})


def _heartbeat(i: int) -> int:
    from .heartbeat import heartbeat_defaults

    return heartbeat_defaults()[i]


@dataclass
class SearchSettings:
    """What the user chose for a search: every CLI flag of `search` and keyword of `api.search`."""

    budget: Budget = option(MISSING, "artifact size: 50KB, 1.5MB, 200KiB, ... or a ratio of the fp32 parameter "
                            "bytes: 20x", parse=parse_budget)
    # what to compress, on what data
    model: str = option("lenet5", "lenet5 | mlp | resnet18 | torchvision:NAME | module:callable | "
                        "path/file.py:callable | saved module file")
    weights: str | None = option(None, "state dict to load into the model (else the baseline is trained and cached)")
    data: str | None = option(None, "fashion-mnist | digits | imagefolder:DIR | torchvision:NAME | module:callable "
                              "(default: fashion-mnist, else digits)")
    data_dir: str | None = option(None, "where to look for the data set files")
    image_size: int | None = option(None, "side in pixels the images are resized to (default: image folders at the "
                                    "model's natural size, other data at their own)", check=at_least(1))
    limit: int | None = option(None, "use at most this many training samples (quick runs)", check=at_least(1))
    val_fraction: float = option(0.1, "share of the training data held out as the validation split",
                                 check=between(0, 1, low_open=True, high_open=True))
    val_data: str | None = option(None, "held-out validation data, in the forms --data takes (all of its samples are "
                                  "used): pass it when --weights were trained on the whole training set, whose "
                                  "carved validation split the model has then already seen")
    space: str | None = option(None, "bundled search space by name (default, full, quantize-only) or a YAML file path (default: default)")
    # where results go
    out: str = option("runs", "output folder of the search: study DB, MLflow store, artifacts", flags=("--runs",))
    study: str | None = option(None, "study name (default: MODEL-DATA-BUDGET)")
    storage: str | None = option(None, "Optuna storage URL (default: sqlite:///OUT/optuna.db)", parse=_database_url)
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: sqlite:///OUT/mlflow.db)",
                                      parse=_database_url)
    register: str | None = option(None, "also register the best model in MLflow's model registry", metavar="NAME")
    # how long
    trials: int = option(12, "total finished trials wanted in the study", check=at_least(1))
    workers: int = option(1, "worker processes on this machine sharing the study; for several machines run the "
                          "same command on each with a shared --storage and --tracking-uri", check=at_least(1))
    timeout: float | None = option(None, "stop starting trials after this long: 90s, 30m, 1h", parse=parse_duration,
                                   check=positive())
    time_budget: float | None = option(None, "wall-clock time for the whole search (10m, 1h): --explore-share of it "
                                       "screens plans with short fine-tunes (sized to fit --trials in it), the rest "
                                       "fine-tunes the best of them (see --time-finalists)", parse=parse_duration,
                                       check=positive())
    explore_share: float = option(0.3, "with --time-budget: the share spent exploring plans",
                                  check=between(0, 1, low_open=True, high_open=True))
    trial_seconds: float | None = option(None, "fine-tune each trial for this long instead of --epochs (--time-budget "
                                         "sets it)", check=positive(), cli=False)
    # each trial
    epochs: int = option(1, "fine-tune epochs per trial", check=at_least(0))
    baseline_epochs: int | None = option(None, "epochs to train the baseline when no --weights (default: "
                                         + ", ".join(f"{e} for {m}" for m, e in DEFAULT_BASELINE_EPOCHS.items())
                                         + f", else {OTHER_BASELINE_EPOCHS})", check=at_least(0))
    lr: float = option(0.01, "fine-tune learning rate", check=positive())
    batch_size: int = option(128, "fine-tune batch size", check=at_least(1))
    max_batches: int | None = option(None, "cap on fine-tune batches per epoch (faster, noisier trials)",
                                     check=at_least(1))
    seed: int = option(0, "random seed of the data split, the sampler and the fine-tunes")
    split_seed: int | None = option(None, "seed of the train / validation split and of the baseline trained on it "
                                    "(default: --seed): vary --seed alone to repeat a search on the same split")
    device: str = option("cpu", "cpu | cuda")
    early_stopping: str = option("median", "stop hopeless trials on their per-epoch val accuracy (with --epochs > 1): "
                                 "median | hyperband | none", parse=parse_early_stopping)
    repair: bool = option(True, "tighten over-budget proposals into the budget (more pruning, then fewer bits) "
                          "instead of recording them infeasible")
    warm_start: bool = option(True, "run the sensitivity analysis and try the uniform/channel/knapsack plans first")
    stop_at_baseline: bool = option(True, "stop exploring once a trial matches the baseline's validation accuracy, "
                                    "within its standard error (no plan can be more accurate): the best trial alone "
                                    "is then fine-tuned for the finalists' epochs and those of the trials left, or "
                                    "for the rest of --time-budget (single-objective searches)")
    sensitivity_seconds: float = option(50.0, "time the sensitivity analysis aims at: past it, it measures fewer "
                                        "settings, then fewer images (with --time-budget: at most a tenth of it)",
                                        parse=parse_duration, check=positive())
    objectives: tuple[str, ...] = option(("accuracy",), "accuracy, or accuracy plus size and/or latency "
                                         "(accuracy,size,latency): a multi-objective search returning the Pareto "
                                         "front", parse=parse_objectives)
    # the final phase
    final_top: int = option(3, "plans re-fine-tuned longer at the end (0: none)", check=at_least(0))
    final_epochs: int = option(2, "fine-tune epochs for those finalists", check=at_least(0))
    time_finalists: int = option(1, "with --time-budget: the best trials that first share 30 percent of the final "
                                 "phase before the best of them goes on (1: the best trial takes all of it)",
                                 check=at_least(1))
    final_distill: float = option(0.5, "distillation weight (at least) for the finalists' fine-tune",
                                  check=between(0, 1, high_open=True))
    # latency
    latency_budget: float | None = option(None, "latency of the deployed model on --device: 2ms, 500us, 0.01s "
                                          "(kept in ms)", parse=parse_latency_ms)
    latency_batch_size: int = option(1, "batch size the latency is for", check=at_least(1))
    latency_threads: int | None = option(None, "CPU threads for latency (default: torch's current)",
                                         check=at_least(1))
    latency_plans: int | None = option(None, "plans timed to fit the latency predictor (default 48: "
                                       "cost.latency.PLANS)", check=at_least(1))
    progress: bool = option(True, "progress bars")
    calib_batches: int = option(4, "training batches that calibrate a compressed model (BN statistics, "
                                "activation ranges)", check=at_least(1), cli=False)
    heartbeat_interval: int = _internal(lambda: _heartbeat(0))
    grace_period: int = _internal(lambda: _heartbeat(1))

    def __post_init__(self) -> None:
        self.early_stopping = parse_early_stopping(self.early_stopping)
        for f in option_fields():
            value, check = getattr(self, f.name), f.metadata.get("check")
            if check is not None and value is not None and not check[0](value):
                raise UserError(f"{flag(f.name)} must be {check[1]}, got {value}")

    @classmethod
    def from_options(cls, budget: Any, **options: Any) -> SearchSettings:
        """Settings from the API's or the CLI's values: each parsed (strings such as '30m' or
        '2ms' accepted), type-checked and range-checked; one UserError line for the first bad one."""
        known = {f.name: f for f in option_fields()}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)}: see autocompress.settings.SearchSettings")
        if budget is None:
            raise UserError("a budget is required: e.g. --budget 50KB or --budget 20x")
        values = {name: _parse(known[name], value) for name, value in {"budget": budget, **options}.items()
                  if value is not None}  # None: the default
        return cls(**values)

    @property
    def baseline_epochs_or_default(self) -> int:
        """--baseline-epochs, else the model's default (DEFAULT_BASELINE_EPOCHS)."""
        if self.baseline_epochs is not None:
            return self.baseline_epochs
        return DEFAULT_BASELINE_EPOCHS.get(self.model, OTHER_BASELINE_EPOCHS)

    def options(self) -> dict[str, Any]:
        """The options as plain JSON values that `from_options` reads back (worker processes)."""
        out: dict[str, Any] = {}
        for f in option_fields():
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Budget) else list(value) if isinstance(value, tuple) \
                else value
        return out

    @property
    def has_final_phase(self) -> bool:
        """The finalists are fine-tuned again after the trials: --final-top > 0, for
        --final-epochs, or for what is left of --time-budget."""
        return self.final_top > 0 and (self.final_epochs > 0 or self.time_budget is not None)

    @property
    def data_seed(self) -> int:
        """--split-seed, else --seed."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def latency_budget_ms(self) -> float | None:
        return self.latency_budget

    @property
    def storage_url(self) -> str:
        from .storage import default_storage_url

        return self.storage or default_storage_url(self.out)

    @property
    def artifact_dir(self) -> str:
        return os.path.join(self.out, "artifacts", self.study or "autocompress")


def option_fields() -> list[dataclasses.Field]:
    """The user options of SearchSettings, in declaration order."""
    return [f for f in dataclasses.fields(SearchSettings) if not f.metadata.get("internal")]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse(f: dataclasses.Field, value: Any) -> Any:
    """One option's value from the API (typed) or the CLI (text)."""
    if value is None:
        return None
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse(value)
    kind = str(f.type).replace(" | None", "")
    try:
        if kind == "bool":
            if isinstance(value, str):
                return {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer() or isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{flag(f.name)} takes {'a whole number' if kind == 'int' else 'a number' if kind == 'float' else kind}"
                        f", got {value!r}") from None


def add_arguments(parser: Any) -> None:
    """The CLI's `search` flags, one per option. Every value is read as text and converted by
    `from_options`, so a bad one gives the same one-line error as the API; a flag not given is
    left out (None) and takes the field's default."""
    for f in option_fields():
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        name = flag(f.name)
        if str(f.type) == "bool":
            on = f.default is True
            parser.add_argument(f"--no-{f.name.replace('_', '-')}" if on else name, dest=f.name,
                                action="store_false" if on else "store_true", default=None,
                                help=("turn off: " if on else "") + meta["help"])
            continue
        default = "" if f.default in (None, MISSING) else \
            f" (default {','.join(f.default) if isinstance(f.default, tuple) else f.default})"
        parser.add_argument(name, *meta.get("flags", ()), dest=f.name, default=None, metavar=meta.get("metavar"),
                            required=bool(meta.get("required")), help=meta["help"] + default)


def cli_options(namespace: Any) -> dict[str, Any]:
    """The options a parsed `search` command line gave (those not given are left out)."""
    return {f.name: getattr(namespace, f.name) for f in option_fields()
            if f.metadata.get("cli", True) and getattr(namespace, f.name, None) is not None}


def options_doc() -> str:
    """The options as a docstring section (appended to api.search's)."""
    lines = ["", "Options (SearchSettings; the CLI's flags are the same names with dashes):"]
    for f in option_fields()[1:]:
        default = "" if f.default is MISSING else f" = {f.default!r}"
        lines.append(f"    {f.name}{default}: {f.metadata['help']}")
    return "\n".join(lines) + "\n"
