"""Error-bound coverage of ``discipline`` over seeds, for the four scenarios of issue 9.

Run: ``python bench/bound_coverage.py [--seeds 1-10]``. Each scenario is what
``timesync drift-sim --strategies discipline --seeds A-B --json`` (and ``--scenario
lan-reference``) computes; this collects, per scenario: the worst ``bound_coverage`` (share of
10 s samples with |true offset| <= error bound), the worst ``max_true_over_bound``, the worst
``bound_over_target`` (median bound / (median round trip / 2 + poll x 1 ppm)), the largest
``max_freq_error_ppm`` (what ``max_clock_error_ppm`` must cover) and the max |offset| per
seed (accuracy must not regress). Targets: coverage >= 0.999, ratio never over 2, median
bound <= 2x the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.runner import run_lan_reference, run_scenario  # noqa: E402
from sim.scenario import NetworkParams, Scenario, parse_outage, parse_seeds  # noqa: E402

SCENARIOS: dict[str, NetworkParams] = {
    "default": NetworkParams(),
    "outage 2d:6h": NetworkParams(outages=(parse_outage("2d:6h"),)),
    "loss 0.2": NetworkParams(loss=0.2),
}


def run(seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, net in SCENARIOS.items():
        rows = []
        for s in seeds:
            r = run_scenario(Scenario(seed=s, strategies=("discipline",), network=net))
            rows.append(r["discipline"].to_json())
        out[name] = summarise(rows)
    lan = [run_lan_reference(s)["strategies"]["discipline"] for s in seeds]  # type: ignore[index]
    out["lan-reference"] = summarise(lan)
    out["lan-reference"]["median_rms_offset_s"] = statistics.median(
        r["rms_offset_s"] for r in lan)
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def worst(key: str, fn: Any = max) -> Any:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return fn(vals) if vals else None

    return {"min_bound_coverage": worst("bound_coverage", min),
            "max_true_over_bound": worst("max_true_over_bound"),
            "max_bound_over_target": worst("bound_over_target"),
            "median_bound_s": [r["median_bound_s"] for r in rows],
            "max_freq_error_ppm": worst("max_freq_error_ppm"),
            "max_abs_offset_s": [r["max_abs_offset_s"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1-10")
    args = p.parse_args()
    print(json.dumps(run(parse_seeds(args.seeds)), indent=2))


if __name__ == "__main__":
    main()
