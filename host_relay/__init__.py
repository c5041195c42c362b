"""Host side: the asyncio relay that forwards framed NTP over vsock/Unix to allowlisted upstreams."""
