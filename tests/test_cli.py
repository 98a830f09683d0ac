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
