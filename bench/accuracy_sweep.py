"""Benchmark (issue 16): accuracy at every poll interval against chronyd 4.3 and the reference.

Run: ``python bench/accuracy_sweep.py [--seeds 1-30] [--default-seeds 1-10] [--base REV]``.

1. chrony's simulation model (``--scenario lan-reference``) at fixed polls of 16, 32, 64, 256 and
   1024 s and at minpoll 6 / maxpoll 10, plus the noisy path (``--scenario lan-noisy``):
   median RMS offset, 95th percentile and worst of the per-seed max |offset|, the model-aware
   reference estimator's median RMS (sim/reference_estimator.py) and the smallest share of
   seconds whose true offset lay within the guest's error bound, beside chronyd's figures
   measured on the same model (issue 16's table).
2. The default drift-sim week at --maxpoll 6, 8 and 10: max |offset| and wrongly rejected JWTs
   at leeway 0 (and at the default leeway).
3. With ``--base REV``: the default week's wall time, new code against REV's code (a
   ``git archive`` of it), interleaved in this invocation so that load on the machine cancels
   out.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim import lan_reference  # noqa: E402
from sim.scenario import Scenario, parse_seeds  # noqa: E402

#: chronyd 4.3 on the same model (issue 16): median RMS offset and worst max, us.
CHRONY = {"16 s": (10.7, None), "32 s": (13.9, None), "64 s": (23.0, None),
          "256 s": (50.8, None), "1024 s": (107.0, 392.0), "6/10": (97.8, 336.0),
          "noisy 16 s": (154.0, None)}
INTERVALS = [("16 s", 4, 4, False), ("32 s", 5, 5, False), ("64 s", 6, 6, False),
             ("256 s", 8, 8, False), ("1024 s", 10, 10, False), ("6/10", 6, 10, False),
             ("noisy 16 s", 4, 4, True)]


def lan_table(seeds: list[int]) -> None:
    print("| poll | guest median RMS | chronyd median RMS | guest / chrony | p95 max | worst max "
          "| chronyd worst max | reference median RMS | guest / reference | min bound coverage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, lo, hi, noisy in INTERVALS:
        path = lan_reference.NOISY_PATH if noisy else lan_reference.LAN_PATH
        rs = [lan_reference.run(s, minpoll=lo, maxpoll=hi, path=path) for s in seeds]
        sm = lan_reference.summary(rs)
        med = float(sm["median_rms_offset_s"] or 0) * 1e6
        ref = float(sm["ref_median_rms_offset_s"] or 0) * 1e6
        chrony, chrony_max = CHRONY[name]
        print(f"| {name} | {med:.1f} us | {chrony:g} us | {med / chrony:.2f} | "
              f"{float(sm['p95_max_abs_offset_s'] or 0) * 1e6:.0f} us | "
              f"{float(sm['worst_max_abs_offset_s'] or 0) * 1e6:.0f} us | "
              f"{'-' if chrony_max is None else f'{chrony_max:g} us'} | {ref:.1f} us | "
              f"{med / ref:.2f} | {sm['min_bound_coverage']:.4f} |", flush=True)


def default_table(seeds: list[int]) -> None:
    from sim.runner import run_scenario

    print("\n| --maxpoll | max abs offset, seeds (ms) | worst | JWT rejected, leeway 0 | "
          "JWT rejected, default leeway | max true/bound |")
    print("|---|---|---:|---:|---:|---:|")
    for maxpoll in (6, 8, 10):
        maxes, rej0, rej, ratio = [], 0, 0, 0.0
        for s in seeds:
            base = Scenario(seed=s, strategies=("discipline",), maxpoll=maxpoll)
            m = run_scenario(base)["discipline"].to_json()
            maxes.append(m["max_abs_offset_s"] * 1e3)
            rej += m["rejected"]["jwt"]
            ratio = max(ratio, m.get("max_true_over_bound", 0.0))
            tok = replace(base.tokens, jwt_leeway_s=0.0)
            z = run_scenario(Scenario(seed=s, strategies=("discipline",), maxpoll=maxpoll,
                                      tokens=tok))["discipline"].to_json()
            rej0 += z["rejected"]["jwt"]
        print(f"| {maxpoll} | {' / '.join(f'{v:.2f}' for v in maxes)} | {max(maxes):.2f} | "
              f"{rej0} | {rej} | {ratio:.3f} |", flush=True)


def week_ab(base_rev: str, repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git -C {ROOT} archive {base_rev} | tar -x -C {tmp}", shell=True,
                       check=True)
        code = ("import time,sys;from sim.runner import run_scenario;from sim.scenario import "
                "Scenario;t=time.perf_counter();run_scenario(Scenario());"
                "print(time.perf_counter()-t)")
        times: dict[str, list[float]] = {"base": [], "new": []}
        for _ in range(repeats):
            for label, path in (("base", tmp), ("new", str(ROOT))):
                out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": path},
                                     capture_output=True, text=True, check=True, cwd=path)
                times[label].append(float(out.stdout.strip()))
        b, n = statistics.median(times["base"]), statistics.median(times["new"])
        print(f"\ndefault drift-sim week (all strategies), median of {repeats} interleaved: "
              f"{base_rev} {b:.2f} s, new {n:.2f} s, ratio {n / b:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1-30")
    parser.add_argument("--default-seeds", default="1-10", help="'' to skip")
    parser.add_argument("--base", default=None, help="git revision to time the week against")
    args = parser.parse_args()
    t0 = time.perf_counter()
    lan_table(parse_seeds(args.seeds))
    if args.default_seeds:
        default_table(parse_seeds(args.default_seeds))
    if args.base:
        week_ab(args.base)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
