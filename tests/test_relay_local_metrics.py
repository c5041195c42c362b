"""Host-clock mode reports its answers as the upstream "local": `status --relay` and the
per-upstream metrics must not show an idle upstream while guests are being answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay_helpers import Guest, client_packet

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.framing import FrameType


def test_local_answers_count_as_the_local_upstream(tmp_path: Path) -> None:
    async def main() -> None:
        sock = tmp_path / "r.sock"
        relay = RelayService(RelaySettings(listen=(f"unix:{sock}",)))
        await relay.start()
        try:
            guest = await Guest.connect(f"unix:{sock}")
            for rid in range(3):
                guest.request(rid, 0, client_packet())
                assert (await guest.recv()).type == FrameType.NTP_REPLY
            await guest.close()
            (local,) = relay.status()["upstreams"]
            assert local["name"] == "local"
            assert (local["requests"], local["replies"], local["timeouts"]) == (3, 3, 0)
            assert local["errors"] == {}
            assert local["mean_rtt_s"] is not None and 0 < local["mean_rtt_s"] < 0.1
            assert b'timesync_relay_upstream_requests_total{source_address="local"} 3.0' in \
                relay.render_metrics()
        finally:
            await relay.stop()

    asyncio.run(main())
