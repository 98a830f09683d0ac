"""Bad input: one clear line, exit code 2, nothing created."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("args,needle", [
    (["--budget", "100B", "--data", "digits"], "below the smallest artifact"),
    (["--budget", "20x", "--model", "nosuchmodel", "--data", "digits"], "unknown model"),
    (["--budget", "20x", "--data", "nosuchdata"], "unknown data"),
    (["--budget", "20x", "--data", "digits", "--weights", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    (["--budget=-3MB", "--data", "digits"], "budget"),
    (["--budget", "0KB", "--data", "digits"], "budget"),
    (["--budget", "20x", "--data", "digits", "--timeout", "soon"], "duration"),
])
def test_bad_input_one_line_exit_2_nothing_created(capsys, out, args, needle):
    code, err = _run(capsys, "search", "--out", str(out), *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("autocompress: error:") and needle in err[0].lower()
    assert not out.exists()


def test_budget_floor_is_stated(capsys, out):
    code, err = _run(capsys, "search", "--out", str(out), "--budget", "100B", "--data", "digits")
    assert code == 2 and "bytes" in err[0] and "x)" in err[0]


def test_corrupt_checkpoint_and_bad_space(capsys, out, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    code, err = _run(capsys, "search", "--out", str(out), "--budget", "20x", "--data", "digits", "--weights", str(bad))
    assert code == 2 and "corrupt" in err[0] and not out.exists()
    space = tmp_path / "s.yaml"
    space.write_text("layer:\n  prune: [none]\n  bits: [4]\n  colour: [red]\n")
    code, err = _run(capsys, "search", "--out", str(out), "--budget", "20x", "--data", "digits", "--space", str(space))
    assert code == 2 and "colour" in err[0] and not out.exists()
    space.write_text("layer:\n  prune: [none]\n  bits: []\n")
    code, err = _run(capsys, "search", "--out", str(out), "--budget", "20x", "--data", "digits", "--space", str(space))
    assert code == 2 and "empty choice" in err[0] and not out.exists()


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
