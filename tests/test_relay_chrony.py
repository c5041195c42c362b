"""The relay against a real chronyd on loopback (and the fixture that provides it)."""

from __future__ import annotations

import os

import ntplib
from chrony_fixture import chrony_server, chronyd  # noqa: F401 - pytest fixture


def test_fixture_serves_time_from_its_own_process(chrony_server):  # noqa: F811
    stats = ntplib.NTPClient().request(chrony_server.host, port=chrony_server.port, timeout=2)
    assert stats.stratum == chrony_server.stratum
    assert abs(stats.offset) < 0.05  # same host clock
    assert os.path.exists(f"/proc/{chrony_server.pid}")


def test_fixture_stops_chronyd_and_cleans_up():
    with chronyd(stratum=9) as server:
        stats = ntplib.NTPClient().request(server.host, port=server.port, timeout=2)
        assert stats.stratum == 9
        pid, workdir = server.pid, server.workdir
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    assert not workdir.exists()
