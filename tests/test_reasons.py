"""One registry of reason names (timesyncd.reasons): the code counts and rejects only with
registered names, the core modules use its members, and the docs and the Prometheus alert
rules name only real reasons (a renamed reason cannot leave a dead alert or a stale doc)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from guest_client.settings import GuestSettings
from host_relay.settings import RelaySettings
from timesyncd import health
from timesyncd.reasons import FAMILIES, StateReason, all_reasons, is_reason

ROOT = Path(__file__).resolve().parent.parent
#: calls whose first argument is a reason, and containers indexed by reason
REASON_CALLS = {"_count", "Rejection", "NtsRejection", "NtsError", "RelayFailure", "_error"}
SECOND_ARG_CALLS = {"_source_error", "on_source_error"}
REASON_MAPS = {"counters", "errors", "rejected"}
#: core modules that must name reasons through the registry, not string literals
CORE = ("timesyncd/exchange.py", "timesyncd/filter.py", "timesyncd/trust.py")
#: backticked names in the docs that look like reasons but are not (HELLO fields)
NOT_REASONS = {"nts_ke"}


def _reason_sites(path: Path) -> list[tuple[int, ast.expr]]:
    """(line, expression) of every place ``path`` names a reason."""
    sites: list[tuple[int, ast.expr]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript):
            base = node.value
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name in REASON_MAPS:
                sites.append((node.lineno, node.slice))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in REASON_CALLS and node.args:
                sites.append((node.lineno, node.args[0]))
            elif name in SECOND_ARG_CALLS and len(node.args) > 1:
                sites.append((node.lineno, node.args[1]))
            elif (name == "count" and isinstance(f, ast.Attribute)
                  and getattr(f.value, "id", None) == "self" and node.args):
                sites.append((node.lineno, node.args[0]))
    return sites


def _modules() -> list[Path]:
    return [p for pkg in ("timesyncd", "guest_client", "host_relay")
            for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_code_names_only_registered_reasons() -> None:
    bad = []
    for path in _modules():
        for line, expr in _reason_sites(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
                if not is_reason(expr.value):
                    bad.append(f"{where}: {expr.value!r}")
            elif isinstance(expr, ast.JoinedStr):
                head = expr.values[0]
                prefix = head.value if isinstance(head, ast.Constant) else ""
                if prefix not in FAMILIES:
                    bad.append(f"{where}: f-string reason without a registered family")
    assert not bad, "register these in timesyncd/reasons.py:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", CORE)
def test_core_modules_use_the_registry_members(module: str) -> None:
    literals = [f"{module}:{line}" for line, expr in _reason_sites(ROOT / module)
                if isinstance(expr, ast.Constant)]
    text = (ROOT / module).read_text()
    assert not literals and "timesyncd.reasons" in text, literals


def test_health_reports_and_the_guest_share_the_state_reasons() -> None:
    from guest_client.sync_state import Reason

    assert Reason is StateReason
    assert set(health.REASONS) == {str(r) for r in StateReason}


def _doc_files() -> list[Path]:
    return ([*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
            + sorted((ROOT / "deploy").rglob("*.yml")))


def _expand(pattern: str) -> list[str]:
    """``nts_ke_cert_(expired|not_yet_valid)`` -> its alternatives; ``health_<why>`` -> a
    member of the family."""
    pattern = re.sub(r"<[a-z_]+>|\.[*+]", "x", pattern)
    m = re.fullmatch(r"([a-z0-9_:]*)\(([a-z0-9_|]+)\)([a-z0-9_]*)", pattern)
    if m:
        return [m[1] + alt + m[3] for alt in m[2].split("|")]
    return pattern.split("|")


def _config_keys() -> set[str]:
    return {f.name for cls in (GuestSettings, RelaySettings) for f in dataclasses.fields(cls)}


def test_docs_and_alert_rules_name_only_real_reasons() -> None:
    keys = _config_keys() | NOT_REASONS
    bad, seen = [], 0
    for path in _doc_files():
        text = path.read_text()
        names: list[str] = []
        for pattern in re.findall(r'reason=~?\\?"([^"\\]+)\\?"', text):
            names += _expand(pattern)
        # the status view's "rejected: a=1, b=2" lines (transcripts)
        for listing in re.findall(r"(?:rejected|Rejected\s*):\s*((?:[a-z0-9_:]+=\d+,?\s?)+)",
                                  text):
            names += re.findall(r"([a-z0-9_:]+)=\d+", listing)
        names += [t for t in re.findall(r"`((?:nts|kod)_[a-z0-9_]+)`", text) if t not in keys]
        seen += len(names)
        bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if not is_reason(n)]
    assert seen >= 10, seen  # the patterns still find the docs' reasons
    assert not bad, "not a registered reason:\n" + "\n".join(bad)


def test_alert_rules_name_only_real_states_and_reasons() -> None:
    rules = (ROOT / "deploy" / "prometheus" / "timesync-alerts.yml").read_text()
    states = re.findall(r'\bstate="([^"]+)"', rules)
    assert states and set(states) <= set(health.STATES), states
    assert all(is_reason(r) for p in re.findall(r'reason=~?"([^"]+)"', rules)
               for r in _expand(p))


def test_registry_has_no_accidental_overlap_with_families() -> None:
    """A registered name is not also an unrelated family member by accident of spelling
    (families are for names built at run time)."""
    assert all(r == r.strip() and re.fullmatch(r"[a-z0-9_:]+", r) for r in all_reasons())
    assert not is_reason("no_such_reason") and not is_reason("hello_Bad Name")
