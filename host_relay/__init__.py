"""Host side: the asyncio relay forwarding framed NTP over vsock/Unix to allowlisted upstreams."""
