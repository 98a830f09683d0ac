"""The wheel: every package and the bundled search spaces ship, and the installed package finds them.

The full proof, a search run from the installed wheel outside the checkout, is .ci/wheel (CI runs it
before the tests); these checks are the fast part of it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "autocompress").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert "autocompress.search_spaces" in listed


@pytest.mark.slow
def test_installed_wheel_reads_its_bundled_spaces(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    for name in ("autocompress", "search_spaces"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # No PYTHONPATH anywhere: with the checkout importable, pip and Python would both see it instead.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, text=True,  # noqa: E731
                                            **{"env": env, **kw})
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-w", str(tmp_path / "dist"), str(src))
    (wheel,) = (tmp_path / "dist").glob("autocompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    yamls = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert sorted(n.rpartition("/")[2] for n in names if n.startswith("autocompress/search_spaces/")
                  and n.endswith(".yaml")) == yamls
    assert not any(n.startswith("search_spaces/") for n in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    python = str(venv / "bin" / "python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
        "--force-reinstall", str(wheel))
    probe = ("import autocompress, sys\n"
             "from autocompress.space import bundled_space_names, load_space\n"
             "print(autocompress.__file__)\n"
             "print(','.join(bundled_space_names()))\n"
             "print(load_space('full').source, load_space(None).source)\n")
    out = run(python, "-c", probe, cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(venv)), out[0]
    assert out[1] == ",".join(p[:-len(".yaml")] for p in yamls)
    assert out[2] == "full.yaml default.yaml"
