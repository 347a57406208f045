"""The layering contract of docs/architecture.md ("Layers"), checked on the real import graph."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold() -> None:
    # import-linter reads the contracts from pyproject.toml: layers point down only, and
    # crypto, protocol and broker never import torch, not even through another module.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_light_packages_load_without_torch() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "for top in ('crypto', 'protocol', 'broker'):\n"
        "    pkg = importlib.import_module(top)\n"
        "    for mod in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        importlib.import_module(mod.name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
