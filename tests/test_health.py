"""Health report schema, strict parsing, pacing, and the guest-side reporter."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from virtual_time import VirtualTimeLoop, run_virtual

from guest_client.health import HealthReporter
from timesyncd.framing import FrameType
from timesyncd.health import (
    MAX_REASONS,
    HealthError,
    HealthPacer,
    HealthReport,
    bound_reasons,
    parse_health,
)
from timesyncd.status_report import StatusReport

S = 1_000_000_000
STATUS = {"state": "synchronised", "offset_s": -2.5e-6, "frequency_ppm": 12.75,
          "root_distance_s": 3e-4, "poll_s": 32.0, "last_update": 1.7e9, "steps": 1,
          "refused_jumps": 0, "rejected": {"bad_delay": 3}, "holdover_s": 0.0,
          "sources": [{"name": "relay:x#y"}]}


def test_report_round_trips_through_a_health_frame() -> None:
    report = HealthReport.from_status(STATUS)
    frame = report.frame()
    assert frame.type == FrameType.HEALTH and frame.request_id == 0
    assert len(frame.payload) < 400  # small: sent every few seconds by every guest
    assert "sources" not in json.loads(frame.payload)
    assert parse_health(frame.payload) == report
    assert report.offset_s == -2.5e-6 and report.frequency_ppm == 12.75


@pytest.mark.parametrize("payload,reason", [
    (b"\xff", "bad_json"),
    (b"[" * 5000, "bad_json"),
    (b"[]", "bad_schema"),
    (b'{"state":"synchronised"}', "bad_version"),
    (b'{"version":2,"state":"synchronised"}', "bad_version"),
    (b'{"version":1,"state":"fine"}', "bad_state"),
    (b'{"version":1,"state":"holdover","offset_s":"1"}', "bad_field"),
    (b'{"version":1,"state":"holdover","offset_s":Infinity}', "bad_field"),
    (b'{"version":1,"state":"holdover","poll_s":true}', "bad_field"),
    (b'{"version":1,"state":"holdover","steps":-1}', "bad_field"),
    (b'{"version":1,"state":"holdover","rejected":[1]}', "bad_field"),
])
def test_untrusted_reports_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(HealthError) as info:
        parse_health(payload)
    assert info.value.reason == reason


def test_rejection_reasons_are_bounded_and_sanitised() -> None:
    many = {f"r{i:03d}": i for i in range(100)}
    many.update({'evil"} 1\n': 5, "x" * 200: 7, "neg": -3, "flag": True})
    out = bound_reasons(many)
    assert len(out) == MAX_REASONS
    assert out["r099"] == 99 and "r000" not in out
    folded = sum(range(100 - MAX_REASONS + 1)) + 5 + 7
    assert out["other"] == folded
    assert sum(out.values()) == sum(range(100)) + 12


def test_pacer_reports_on_interval_and_on_state_change_but_never_faster_than_min() -> None:
    pacer = HealthPacer(interval_s=10, min_interval_s=1)
    assert pacer.due(0, "unsynchronised")
    pacer.sent(0, "unsynchronised")
    assert not pacer.due(5 * S, "unsynchronised")
    assert not pacer.due(S // 2, "synchronised")  # changed, but within min interval
    assert pacer.due(S, "synchronised")
    pacer.sent(S, "synchronised")
    assert pacer.due(11 * S, "synchronised")
    pacer.reset()
    assert pacer.due(S + 1, "synchronised")
    with pytest.raises(ValueError):
        HealthPacer(0)


class FakeLink:
    def __init__(self) -> None:
        self.up = True
        self.frames: list[Any] = []

    def send(self, frame: Any) -> bool:
        if self.up:
            self.frames.append(frame)
        return self.up


def test_reporter_sends_at_a_bounded_rate_and_skips_while_down() -> None:
    link = FakeLink()
    now = [0]
    status = dict(STATUS)
    rep = HealthReporter(link.send, lambda: StatusReport.from_json(status), interval_s=10,
                         clock=lambda: now[0])
    sent_at = []
    for t in range(0, 60 * S, S // 4):  # one minute, checked four times a second
        now[0] = t
        if t == 25 * S:
            status["state"] = "holdover"
        if t == 40 * S:
            link.up = False
        if rep.tick():
            sent_at.append(t / S)
    assert sent_at == [0, 10, 20, 25, 35]  # interval, early on the state change, none when down
    assert rep.counters["not_connected"] > 0
    link.up = True
    rep.link_up()
    now[0] += 1
    assert rep.tick()  # a reconnected relay hears at once
    assert parse_health(link.frames[-1].payload).state == "holdover"


def test_reporter_task_runs_and_stops() -> None:
    """In virtual time: one report per interval, exactly, and none after stop()."""
    sent_at: list[float] = []

    async def main(loop: VirtualTimeLoop) -> None:
        link = FakeLink()

        def send(frame: Any) -> bool:
            sent_at.append(round(loop.time(), 6))
            return link.send(frame)

        rep = HealthReporter(send, lambda: StatusReport.from_json(STATUS), interval_s=0.05,
                             min_interval_s=0.01,
                             clock=loop.clock_ns)
        await rep.start()
        await asyncio.sleep(0.32)
        await rep.stop()
        n = len(link.frames)
        await asyncio.sleep(1.0)
        assert len(link.frames) == n

    run_virtual(main)
    assert sent_at == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]


@pytest.mark.parametrize("spins", [0, 1, 2, 3])
def test_reporter_cancel_right_after_link_up_is_not_swallowed(spins: int) -> None:
    """A relay (re)connecting just as the daemon stops: link_up() wakes the reporter, then the
    cancel lands. asyncio.wait_for on 3.11 swallowed it, so a single cancel (and stop()) hung."""

    async def main() -> None:
        link = FakeLink()
        rep = HealthReporter(link.send, lambda: StatusReport.from_json(STATUS), interval_s=10.0)
        await rep.start()
        task = rep._task
        assert task is not None
        await asyncio.sleep(0.05)  # waiting for its next check
        rep.link_up()
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        assert done, f"one cancel, {spins} loop iterations after link_up(), was swallowed"
        assert task.cancelled()
        await asyncio.wait_for(rep.stop(), 2.0)

        again = HealthReporter(link.send, lambda: StatusReport.from_json(STATUS), interval_s=10.0)
        await again.start()
        await asyncio.sleep(0.05)
        again.link_up()
        for _ in range(spins):
            await asyncio.sleep(0)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(again.stop(), 2.0)
        assert asyncio.get_running_loop().time() - started < 0.5
        assert again._task is None

    asyncio.run(main())


def test_error_bound_fields_round_trip_and_old_reports_still_parse() -> None:
    """The bound and state reason ride in version 1 reports as optional fields: a report
    from an older guest (without them) still parses, with None; an unknown reason is folded
    into "other" (it becomes a label value on the host); unknown keys are ignored, which is
    what lets an older relay read a newer guest's report."""
    status = {**STATUS, "error_bound_s": 1.5e-3, "state_reason": "tracking",
              "bound_verified": False, "holdover_since": None, "disagreement_s": 0.0}
    report = HealthReport.from_status(status)
    parsed = parse_health(report.frame().payload)
    assert parsed == report and parsed.error_bound_s == 1.5e-3
    assert parsed.state_reason == "tracking" and parsed.bound_verified is False
    old = parse_health(json.dumps({"version": 1, "state": "holdover", "holdover_s": 5.0,
                                   "some_future_field": [1, 2]}).encode())
    assert old.error_bound_s is None and old.state_reason is None
    odd = parse_health(json.dumps({"version": 1, "state": "holdover",
                                   "state_reason": "x\nINJECTED"}).encode())
    assert odd.state_reason == "other"
    with pytest.raises(HealthError) as err:
        parse_health(json.dumps({"version": 1, "state": "holdover",
                                 "bound_verified": "yes"}).encode())
    assert err.value.reason == "bad_field"
    with pytest.raises(HealthError):
        parse_health(json.dumps({"version": 1, "state": "holdover",
                                 "error_bound_s": "NaN"}).encode())
