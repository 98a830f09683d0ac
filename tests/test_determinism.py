"""With --seed and one CPU worker, two fresh runs give the same trials and the same numbers."""
from __future__ import annotations

import pytest

from autocompress.api import search

pytestmark = pytest.mark.slow  # end-to-end searches


def _facts(outcome):
    return [(t.number, t.state.name, t.params, t.value, t.user_attrs.get("size_bytes"), t.intermediate_values)
            for t in outcome.study.trials]


def test_two_fresh_runs_with_one_seed_agree(tmp_path, monkeypatch):
    runs = []
    for i in range(2):
        monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / f"cache{i}"))  # the baseline is trained twice too
        runs.append(search("8x", model="lenet5", data="digits", out=str(tmp_path / f"run{i}"), study="d", trials=3,
                           epochs=1, baseline_epochs=1, max_batches=3, progress=False, seed=7,
                           warm_start=False, final_top=0, stop_at_baseline=False))  # 3 trials: 1-epoch baseline
    a, b = runs
    assert _facts(a) == _facts(b)
    assert len({str(t.params) for t in a.study.trials}) == 3
    assert a.test_accuracy == pytest.approx(b.test_accuracy, abs=0) and a.best.number == b.best.number
