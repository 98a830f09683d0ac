"""Bad input: one clear line, exit code 2, nothing created."""
from __future__ import annotations

import subprocess
import sys

import pytest

from autocompress.cli import main


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def _run(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_unparsable_budget_exits_2_with_one_line_via_the_real_entry_point(out):
    p = subprocess.run([sys.executable, "-m", "autocompress", "search", "--budget", "5 parsecs", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "budget" in lines[0] and "50KB" in lines[0]
    assert not out.exists()


SPACES = {"space_unknown_key": "layer:\n  prune: [none]\n  bits: [4]\n  colour: [red]\n",
          "space_empty_choice": "layer:\n  prune: [none]\n  bits: []\n"}

# Wrong invocations of `search`: each one line on stderr, exit code 2, nothing trained or written.
# {name} in an argument is a file made by the test (see _files).
BAD = [
    (["--budget", "50QB"], "unknown budget unit"),
    (["--budget", "50"], "no unit"),
    (["--budget=-3MB"], "budget must be positive"),
    (["--budget", "0KB"], "budget must be positive"),
    (["--budget", "0.5x"], "above 1x"),
    (["--budget", "100B"], "below the smallest artifact"),
    (["--budget", "20x", "--model", "nosuchmodel"], "unknown model"),
    (["--budget", "20x", "--data", "nosuchdata"], "unknown data"),
    (["--budget", "20x", "--weights", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    (["--budget", "20x", "--weights", "{corrupt_ckpt}"], "corrupt"),
    (["--budget", "20x", "--space", "{space_unknown_key}"], "unknown key(s) colour"),
    (["--budget", "20x", "--space", "{space_empty_choice}"], "empty choice"),
    (["--budget", "20x", "--space", "/nonexistent/space.yaml"], "space"),
    (["--budget", "20x", "--timeout", "soon"], "duration"),
    (["--budget", "20x", "--trials", "0"], "--trials"),
    (["--budget", "20x", "--epochs", "-1"], "--epochs"),
    (["--budget", "20x", "--final-distill", "1.5"], "--final-distill"),
    (["--budget", "20x", "--workers", "0"], "--workers"),
    (["--budget", "20x", "--storage", "postgresql://nobody@127.0.0.1:1/x"], "cannot reach study storage"),
    (["--budget", "20x", "--storage", "no url at all"], "cannot parse study storage"),
    (["--budget", "20x", "--storage", "sqlite:////nonexistent/dir/optuna.db"], "does not exist"),
    (["--budget", "20x", "--tracking-uri", "http://127.0.0.1:1"], "cannot reach mlflow tracking server"),
]


def _files(tmp_path, args):
    (tmp_path / "corrupt_ckpt").write_bytes(b"this is not a checkpoint")
    for name, text in SPACES.items():
        (tmp_path / name).write_text(text)
    return [a.format(**{n: tmp_path / n for n in ("corrupt_ckpt", *SPACES)}) for a in args]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_created(capsys, out, tmp_path, args, needle):
    code = main(["search", "--out", str(out), "--data", "digits", *_files(tmp_path, args)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("autocompress: error:") and needle in err[0].lower(), err
    assert "baseline" not in captured.out  # refused before any training
    assert not out.exists()


def test_budget_floor_is_stated(capsys, out):
    code, err = _run(capsys, "search", "--out", str(out), "--budget", "100B", "--data", "digits")
    assert code == 2 and "bytes" in err[0] and "x)" in err[0]


def test_report_and_export_without_a_study(capsys, out):
    code, err = _run(capsys, "report", "--out", str(out))
    assert code == 2 and "no study database" in err[0]
    code, err = _run(capsys, "export", "--runs", str(out), "--out", str(out / "x.acz"))
    assert code == 2 and not out.exists()


@pytest.mark.slow  # trains a baseline and runs the analysis end to end
def test_sensitivity_command_prints_one_row_per_layer_and_caches(capsys, tmp_path):
    args = ["sensitivity", "--data", "digits", "--out", str(tmp_path), "--baseline-epochs", "2",
            "--amounts", "0.5,0.9", "--bits", "2,4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in
            ("conv1", "conv2", "fc1", "fc2")]
    assert sorted(rows) == ["conv1", "conv2", "fc1", "fc2"]
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 1
    assert main(args) == 0 and "(cached)" in capsys.readouterr().out


@pytest.mark.slow  # trains a baseline and runs the analysis end to end
def test_sensitivity_command_with_the_grid_sized_to_its_time(capsys, tmp_path):
    """No --amounts or --bits: the grid is sized to --seconds (it crashed logging them to MLflow)."""
    args = ["sensitivity", "--data", "digits", "--out", str(tmp_path), "--baseline-epochs", "1", "--seconds", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    layers = ["conv1", "conv2", "fc1", "fc2"]
    assert sorted(line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in layers) == layers


def test_a_negative_budget_is_one_line_not_the_usage_via_the_real_entry_point(out):
    p = subprocess.run([sys.executable, "-m", "autocompress", "search", "--budget", "-5MB", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "autocompress: error: budget must be positive, got '-5MB': use a size like 50KB, 1.5MB, 200KiB, 2000B or "
        "a ratio like 20x"]
    assert not out.exists()


def test_a_wrong_command_line_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--budget", "20x", "--no-such-flag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "unrecognized arguments: --no-such-flag" in err[0]


def test_header_says_when_the_fp32_model_already_fits():
    from autocompress.orchestrate import budget_ratio

    assert budget_ratio(50_000_000, 1_724_000) == "(the 1.72 MB fp32 model already fits)"
    assert budget_ratio(50_000, 1_724_000) == "(34.5x of 1.72 MB fp32)"


@pytest.mark.slow
def test_a_budget_above_the_fp32_size_says_the_model_fits_and_searches_within_it(capsys, out):
    code = main(["search", "--budget", "50MB", "--data", "digits", "--out", str(out), "--trials", "1",
                 "--baseline-epochs", "1", "--max-batches", "2", "--no-warm-start", "--final-top", "0",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "already fits uncompressed" in printed and "most accurate plan within the budget" in printed
    assert "0.0x" not in printed and "(the " in printed and "fp32 model already fits)" in printed


def test_evaluate_latency_prints_the_deployed_and_the_fp32_median(capsys, tmp_path):
    import re

    from autocompress.api import load_inputs
    from autocompress.artifact import export
    from autocompress.compression import compress
    from autocompress.plan import CompressionPlan, LayerPlan

    spec, bundle, net = load_inputs("lenet5", "digits", None, None, 0, None, 0.1)
    plan = CompressionPlan(layers={n: LayerPlan(prune="unstructured", amount=0.5, bits=8)
                                   for n in ("conv1", "conv2", "fc1", "fc2")})
    path = tmp_path / "m.acz"
    export(compress(net, plan, bundle.train.x[:2], [(bundle.train.x[:64], bundle.train.y[:64])]), path, spec)
    assert main(["evaluate", str(path), "--latency"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"latency on cpu at batch 1, \d+ threads: deployed ([0-9.]+) ms, fp32 original ([0-9.]+) ms "
                     r"\(median of 100 runs; [0-9.]+x\)", line)
    assert m, line
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
