"""Setting up a study: open or resume it in its storage with its sampler and early stopping, check
that a resumed study is the same search, clean up after a killed run, and the tracker it logs to."""
from __future__ import annotations

import json
import os
import warnings

import optuna

from .context import SearchContext
from .errors import UserError
from .heartbeat import StaleTrialCallback
from .settings import SearchSettings
from .space import BoundSpace
from .storage import default_tracking_uri, rdb_storage
from .tracking import Tracker
from .trials import TS, Attr, StudyAttr

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def tracking_uri(settings: SearchSettings) -> str:
    """--tracking-uri, else the SQLite MLflow store under OUT."""
    return settings.tracking_uri or default_tracking_uri(settings.out)


def make_tracker(settings: SearchSettings) -> Tracker:
    """The MLflow tracker of the study (experiment named after it, artifacts under OUT/mlartifacts)."""
    return Tracker(tracking_uri(settings), settings.study or "", os.path.join(settings.out, "mlartifacts"))


def open_study(settings: SearchSettings, create: bool = True) -> optuna.Study:
    """Create or resume the study in its RDB storage (heartbeats let a dead worker's trial be failed)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.storage is None:
        os.makedirs(settings.out, exist_ok=True)
    try:
        storage = rdb_storage(
            settings.storage_url, heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=StaleTrialCallback(tracking_uri(settings)))
    except Exception as e:  # unreachable server, bad URL
        raise UserError(f"cannot open study storage {settings.storage_url}: {str(e).splitlines()[0]}") from None
    sampler = make_sampler(settings, 0)
    pruner = early_stopper(settings.early_stopping, settings.epochs)
    directions = ["maximize"] + ["minimize"] * (len(settings.objectives) - 1)
    if not create:
        try:
            return optuna.load_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise UserError(f"no study named {settings.study!r} in {settings.storage_url}") from None
    return optuna.create_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner,
                               directions=directions, load_if_exists=True)


def early_stopper(kind: bool | str, epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's early stopping of hopeless trials on their per-epoch validation accuracy."""
    if kind in (True, "median"):
        return optuna.pruners.MedianPruner(n_startup_trials=4)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if kind in (False, "none"):
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown early stopping {kind!r}: use median, hyperband or none")


def make_sampler(settings: SearchSettings, trial_number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded with seed + trial number: a run repeats itself, and workers sharing a study
    (same --seed) still propose different plans. TPE keeps no state beyond its random generator.
    Multivariate (with groups, as the per-layer parameters are conditional): the layers' bits and
    sparsities trade against each other under one budget, which independent TPE cannot model."""
    return optuna.samplers.TPESampler(seed=settings.seed + trial_number, multivariate=True, group=True,
                                      n_startup_trials=min(8, max(settings.trials // 3, 2)))


def check_same_study(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, limit: int) -> None:
    """A resumed study must keep its budget, model and space: TPE assumes one fixed objective."""
    key = {"budget_bytes": limit, "model": ctx.spec.spec, "data": ctx.data.name,
           "params": ctx.space.param_names(), "objectives": list(settings.objectives)}
    if settings.latency_budget_ms is not None:
        key["latency_budget_ms"] = settings.latency_budget_ms
    old = study.user_attrs.get(StudyAttr.IDENTITY)
    if old is None:
        study.set_user_attr(StudyAttr.IDENTITY, key)
    elif old != key:
        diff = [k for k in key if old.get(k) != key[k]]
        raise UserError(f"study {settings.study!r} was created with a different {', '.join(diff)}; "
                        "use another --study name")


def resume_cleanup(study: optuna.Study, tracker: Tracker) -> int:
    """Fail trials whose worker died (no heartbeat) and close their MLflow runs."""
    optuna.storages.fail_stale_trials(study)
    dead = [t.user_attrs[Attr.MLFLOW_RUN_ID] for t in study.get_trials(deepcopy=False, states=(TS.FAIL,))
            if Attr.MLFLOW_RUN_ID in t.user_attrs]
    return tracker.close_stale(dead)


def space_json(space: BoundSpace) -> str:
    """The bound space's per-layer choices as JSON (logged to the parent run)."""
    return json.dumps({n: {k: c.to_obj() for k, c in ch.items()} for n, ch in space.layers.items()}, indent=1)
