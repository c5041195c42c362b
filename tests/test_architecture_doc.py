"""docs/ARCHITECTURE.md's module table stays true: every module of the four packages is named
in it (the subpackages ``nts/`` and ``transport/`` are described as a whole)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("timesyncd", "host_relay", "guest_client", "sim")
DESCRIBED_AS_A_WHOLE = ("timesyncd/nts", "timesyncd/transport")


def test_every_module_is_in_the_architecture_table() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [
        str(path.relative_to(ROOT)) for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
        if path.name != "__init__.py"
        and not str(path.relative_to(ROOT)).startswith(DESCRIBED_AS_A_WHOLE)
        and f"`{path.name}`" not in doc]
    assert not missing, f"add these modules to docs/ARCHITECTURE.md's table: {missing}"
