"""The review's plots, on fixed rows: axes, Pareto front, history, per-layer bars, whole PNGs."""
from __future__ import annotations

import csv
import io
import os
import struct

import pytest
import torch

from autocompress import plots
from autocompress.plantable import granularity_mix, plan_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


ROWS = [dict(trial=0, state="complete", val_accuracy=0.80, size_bytes=5_000),
        dict(trial=1, state="infeasible", val_accuracy=None, size_bytes=90_000),
        dict(trial=2, state="complete", val_accuracy=0.90, size_bytes=8_000),
        dict(trial=3, state="complete", val_accuracy=0.85, size_bytes=9_000),
        dict(trial=4, state="failed", val_accuracy=None, size_bytes=None),
        dict(trial=5, state="complete", val_accuracy=0.93, size_bytes=20_000),
        dict(trial=6, state="early-stopped", val_accuracy=None, size_bytes=3_000, last_val=0.95)]


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    g = torch.Generator().manual_seed(0)
    points = [(float(s), float(a)) for s, a in zip(torch.randint(1, 50, (200,), generator=g),
                                                     torch.rand(200, generator=g).round(decimals=2))]
    front = plots.pareto_front(points)

    def dominated(p):
        return any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)
    assert set(front) == {p for p in points if not dominated(p)}
    assert front == sorted(front) and [a for _, a in front] == sorted(a for _, a in front)
    assert plots.pareto_front([]) == [] and plots.pareto_front([(1, 0.5), (1, 0.5)]) == [(1, 0.5)]


def test_accuracy_vs_size_axes_cover_the_data_with_budget_and_front():
    fig = plots.accuracy_size_figure(ROWS, 10_000, baseline=(60_000, 0.95))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lo, hi = ax.get_xlim()
    assert lo < 3_000 and hi > 90_000  # every trial, the over-budget one and the baseline
    lo, hi = ax.get_ylim()
    assert lo < 0.80 and hi > 0.95
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(zip(*lines["Pareto front"].get_data())) == [(5_000, 0.80), (8_000, 0.90), (20_000, 0.93)]
    assert list(lines["budget 10.00 KB"].get_xdata()) == [10_000, 10_000]
    assert list(lines["over budget (not trained)"].get_xdata()) == [90_000]
    stopped = [c for c in ax.collections if c.get_label() == "early-stopped (last val)"][0]
    assert stopped.get_offsets().tolist() == [[3_000, 0.95]]  # shown, but not on the front
    assert ax.get_xlabel() == "artifact size (bytes)" and ax.get_ylabel() == "validation accuracy"


def test_history_best_so_far_rises_to_the_best_trial():
    ax = plots.history_figure(ROWS).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    xs, ys = lines["best so far"].get_data()
    assert list(ys) == sorted(ys) and ys[-1] == 0.93 and xs[-1] == 6
    assert sorted(lines["no score (infeasible / failed)"].get_xdata()) == [1, 4]
    assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= 6


def test_plan_chart_bars_are_the_bits_and_sparsity_per_layer():
    plan = {"layers": {
        "conv1": {"prune": "nm", "n": 2, "m": 4, "amount": 0.0, "bits": 4, "rank_ratio": 1.0, "act_bits": 32},
        "fc1": {"prune": "unstructured", "amount": 0.9, "bits": 2, "rank_ratio": 0.5, "act_bits": 8},
        "fc2": {"prune": "none", "amount": 0.0, "bits": 32}}}
    top, bottom = plots.plan_figure(plan).axes
    assert [p.get_height() for p in top.patches] == [4, 2, 32]
    assert [p.get_height() for p in bottom.patches] == pytest.approx([0.5, 0.9, 0.0])
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["conv1", "fc1", "fc2"]
    assert top.get_ylim()[1] > 32 and bottom.get_ylim() == (0, 1.1)
    rows = list(csv.DictReader(io.StringIO(plan_csv(plan))))
    assert [(r["layer"], r["nm"], r["sparsity"], r["bits"]) for r in rows] == [
        ("conv1", "2:4", "0.5", "4"), ("fc1", "", "0.9", "2"), ("fc2", "", "0.0", "32")]
    assert granularity_mix(plan) == "unstructured+nm"
    assert granularity_mix({"layers": {"a": {"prune": "none"}}}) == "none"


def _png_size(path: str) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pngs_are_written_whole(tmp_path):
    table = {"conv1": {"2b": 0.10, "4b": 0.01}, "fc1": {"2b": 0.30, "u90%": 0.05}}
    image = plots.sensitivity_figure(table).axes[0].get_images()[0].get_array()
    assert image.shape == (2, 3) and bool(image.mask[0, 2])  # conv1 has no u90% value
    paths = [plots.accuracy_vs_size(ROWS, 10_000, str(tmp_path / "a.png")),
             plots.history(ROWS, str(tmp_path / "h.png")),
             plots.plan_layers({"layers": {"fc": {"prune": "none", "bits": 8}}}, str(tmp_path / "p.png")),
             plots.sensitivity_heatmap(table, str(tmp_path / "deep" / "s.png"))]
    for path in paths:
        width, height = _png_size(path)
        assert width >= 400 and height >= 300 and os.path.getsize(path) > 10_000
    assert _png_size(paths[0]) == (700, 450)  # figsize 7 x 4.5 at 100 dpi
