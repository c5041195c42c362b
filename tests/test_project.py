"""Project-level checks: import direction, lint, and docs that must match the code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_direction_is_enforced() -> None:
    """Core <- relay, guest <- sim; only timesyncd.cli imports every package."""
    exe = shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extra"
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_ruff_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean(tmp_path: Path) -> None:
    """The packages type-check (tests are not held to it); cache under tmp_path."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path),
                           "timesyncd", "guest_client", "host_relay", "sim"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    test_cmd = ci_lines[-1]
    assert "pytest" in test_cmd
    assert any(test_cmd in block.splitlines() for block in _readme_blocks()), (
        f"README has no code line identical to .ci/run's test command {test_cmd!r}")


@pytest.mark.parametrize("section", ["relay", "guest"])
def test_config_reference_matches_code(section: str) -> None:
    """docs/CONFIG.md is generated from the settings dataclasses; regenerate it if this fails
    (`python -m timesyncd.cli.config_reference > docs/CONFIG.md`)."""
    from timesyncd.cli.config_reference import render

    doc = (ROOT / "docs/CONFIG.md").read_text()
    assert doc == render(), "docs/CONFIG.md is stale: regenerate it"
