"""What a search prints while it runs: a progress bar over trials and one line per finished trial."""
from __future__ import annotations

from typing import Any, Callable

import optuna

from .plan import format_bytes
from .trials import Attr, accuracy, best_trial, trial_state

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over `total` trials, or None (disabled, or nothing to run)."""
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)


def trial_line(t: optuna.trial.FrozenTrial, original_bytes: int) -> str:
    """'trial   3 complete      val 0.9120   12.1 KB  34.9x    8.2s' (and why it failed)."""
    size = t.user_attrs.get(Attr.SIZE_BYTES)
    line = f"trial {t.number:3d} {trial_state(t):13s}"
    if t.values and not t.user_attrs.get(Attr.INFEASIBLE):
        line += f" val {accuracy(t):.4f}"
    if size:
        line += f"  {format_bytes(size):>9s} {original_bytes / size:6.1f}x"
    line += f"  {t.user_attrs.get(Attr.SECONDS, 0):5.1f}s"
    if Attr.FAIL_REASON in t.user_attrs:
        line += f"  ({t.user_attrs[Attr.FAIL_REASON]})"
    return line


def trial_printer(bar: Any, original_bytes: int) -> TrialCallback:
    """Optuna callback: print each finished trial's line (through the bar when there is one)."""
    def callback(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        line = trial_line(t, original_bytes)
        if bar is None:
            print(line)
            return
        bar.write(line)
        bar.update(1)
        best = best_trial(study)
        if best is not None:
            bar.set_postfix(best=f"{accuracy(best):.4f}", size=format_bytes(best.user_attrs[Attr.SIZE_BYTES]))
    return callback
