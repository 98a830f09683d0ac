"""bench/zoo.py's measurements on a small model (the full zoo is a benchmark, not a test)."""
from __future__ import annotations

import importlib.util
import os

import torch

from autocompress.compression import compress
from autocompress.models import ModelSpec
from autocompress.space import load_space
from tests.conftest_models import TinyResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("zoo", os.path.join(ROOT, "bench", "zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def test_channel_plan_round_trip_and_untouchable_bytes(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet(num_classes=10, in_channels=3, image_size=16).eval()
    example = torch.randn(2, 3, 16, 16)
    bound = load_space(None).bind(model)
    plan = zoo.channel_plan(bound)
    assert [n for n, lp in plan.layers.items() if lp.prune == "channel"] == list(bound.layers)[:-1]  # not fc
    cm = compress(model, plan, example, [(example, torch.zeros(2, dtype=torch.long))])
    spec = ModelSpec("tests/conftest_models.py:TinyResNet", 10, 3, 16)
    row = zoo.round_trip(cm, spec, example, str(tmp_path), "channel")
    assert row["channel_bytes_equal"] and row["channel_load_equal"] and row["channel_load_max_diff"] < 1e-5
    planned = {f"{n}.weight" for n in bound.layers}
    from autocompress.artifact import chunk_sizes, export, load, read_header
    from autocompress.cost import untouchable_bytes

    written = export(cm, tmp_path / "u.acz", spec)
    loaded = load(tmp_path / "u.acz", model)  # BatchNorm folded: Identity there, a bias in each conv
    floats = sum(t.numel() * 4 for k, t in loaded.state_dict().items() if t.is_floating_point() and k not in planned)
    entries = read_header(tmp_path / "u.acz")["entries"]
    assert sum(sum(chunk_sizes(e)) for e in entries if e["t"] == "f") == floats  # folded conv biases, fc bias
    planned_bytes = sum(sum(chunk_sizes(e)) for e in entries if e["t"] == "q")
    assert untouchable_bytes(cm, spec) == written - planned_bytes  # framing, header and those floats


def test_input_sizes_and_table():
    assert zoo.input_size("vit_b_16") == 224 and zoo.input_size("resnet18") == 64
    assert zoo.input_size("inception_v3") == 299
    row = {"model": "m", "input": 64, "status": "ok", "params": 2e6, "channel": "ok", "channel_shrunk": 3,
           "channel_layers": 3, "channel_bytes_equal": True, "floor_bytes_equal": False, "channel_load_equal": True,
           "deploy": "ok", "floor_ratio": 51.2, "untouchable_bytes": 1e5, "peak_rss_bytes": 3e9,
           "compress_peak_rss_bytes": 2.6e9, "rss_limit_bytes": 2.5e9}
    md = zoo.table([row], [("big", 300_000_000)], "meta")
    line = md.splitlines()[6]
    assert "| m | 2.0 | 64 | ok (3/3) | NO | yes | ok | 51.2x |" in line and "| 2.60, 3.00 (2.5) OVER |" in line
    assert "big (300M)" in md
    # OVER judges compressing and sizing (the bound's scope), not the whole child
    within = zoo.table([{**row, "compress_peak_rss_bytes": 2.0e9}], [], "meta").splitlines()[6]
    assert "| 2.00, 3.00 (2.5) |" in within and "OVER" not in within


def test_zoo_search_reads_stages_and_verdicts_from_a_search_log(tmp_path):
    """bench/zoo_search.py: the stage split from the time-stamped output, the error line without
    its stamp, and the first failing check as the verdict."""
    spec = importlib.util.spec_from_file_location("zoo_search", os.path.join(ROOT, "bench", "zoo_search.py"))
    zs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zs)
    stamped = [(2.0, "baseline: ..."), (10.0, "study s: 0 trials done"), (30.0, "sensitivity (19.5s, 9 settings x 2 layers on 128 images): a, b"),
               (31.0, "warm start: knapsack"), (45.0, "finalist trial   0: ..."), (60.0, "top trials (budget 1 KB)")]
    assert zs.phases(stamped, 75.0) == {"setup_s": 10.0, "warm_start_s": 21.0, "trials_wall_s": 14.0,
                                        "finalists_s": 15.0, "finish_s": 15.0}
    (tmp_path / "search.log").write_text("   10.0  study s\n  201.8  RuntimeError: out of memory\n\n")
    assert zs.last_line(str(tmp_path / "search.log")) == "RuntimeError: out of memory"
    ok = {"status": "ok", "exit": 0, "complete": 3, "bytes_equal": True, "replan_bytes_equal": True,
          "load_runs": True, "load_shapes_equal": True, "load_equal": True, "deploy": "ok"}
    assert zs.verdict(ok) == "ok"
    assert zs.verdict({**ok, "load_runs": False}) == "load runs"
    assert zs.verdict({**ok, "exit": 1}) == "exit 1"
    assert zs.verdict({**ok, "status": "timeout (420 s)"}) == "timeout (420 s)"
    assert zs.family("regnet_x_8gf") == "regnet_x" and zs.family("efficientnet_v2_s") == "efficientnet_v2"
    big = zs.search_args(224, "imagefolder:/data/small")  # a ViT searches the small folder at its own size
    assert big[big.index("--data") + 1] == "imagefolder:/data/small" and big[-4:] == ["--image-size", "224",
                                                                                   "--batch-size", "16"]
    assert zs.search_args(None, "imagefolder:/data/small")[-4:] == ["--image-size", "28", "--batch-size", "16"]
    assert zs.search_args(None, "fashion-mnist") == zs.SEARCH_ARGS
    assert zs.search_args(64, "fashion-mnist") == [*zs.SEARCH_ARGS, "--image-size", "64"]
    assert zs.channels("imagefolder:/data/small") == 3 and zs.channels("fashion-mnist") == 1
