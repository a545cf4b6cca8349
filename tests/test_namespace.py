"""pdserve imports as ``pdserve.*`` only, and nothing in the repository shadows a third-party package.

The suite runs as ``python -m pytest`` from the repository root, so the root is on
``sys.path`` here: exactly the situation in which a top-level ``kernels/`` package of
ours once hid PyPI's ``kernels`` from transformers.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The only importable top-level names in the repository: ours, and the test package.
TOP_LEVEL = {"pdserve", "tests"}
OLD_IMPORT = re.compile(r"^\s*(from|import)\s+(services|kernels|bench|proto)\b", re.M)


def test_root_is_on_sys_path() -> None:
    # Otherwise the checks below prove nothing about running from the repository root.
    assert any(Path(p or ".").resolve() == ROOT for p in sys.path)


def test_only_pdserve_and_tests_are_packages_at_the_root() -> None:
    importable = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    importable |= {p.stem for p in ROOT.glob("*.py")}
    assert importable == TOP_LEVEL


def test_transformers_gets_pypi_kernels() -> None:
    for name in ("transformers.activations", "transformers.integrations.hub_kernels"):
        importlib.import_module(name)
    kernels = importlib.import_module("kernels")  # PyPI's, which transformers uses
    assert kernels.__file__ is not None and "site-packages" in Path(kernels.__file__).parts, kernels.__path__


def test_no_module_imports_an_old_top_level_name() -> None:
    offenders = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue  # .venv and other tool folders
        if OLD_IMPORT.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import pdserve.* instead: {offenders}"


def test_module_run_from_root_converts_the_gguf_tokenizer(tmp_path: Path) -> None:
    """``python -m pdserve.common.tokenizer`` from the root: transformers' GGUF conversion imports ``kernels``."""
    from pdserve.common.model_source import resolve_model

    gguf = resolve_model("smollm2").path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pdserve.common.tokenizer", "gguf", gguf, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("argv", [["-m", "pdserve", "--help"], ["-m", "pdserve.cli", "--help"]])
def test_pdserve_command_runs_as_a_module(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: pdserve" in proc.stdout, proc.stderr
