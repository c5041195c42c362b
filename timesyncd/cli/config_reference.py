"""Render docs/CONFIG.md from the settings dataclasses (a test keeps the two identical)."""

from __future__ import annotations

from guest_client.settings import GuestSettings
from host_relay.settings import RelaySettings
from timesyncd.config import reference_markdown

HEADER = """# Configuration reference

Generated from the code by `python -m timesyncd.cli.config_reference > docs/CONFIG.md`;
`tests/test_project.py` fails when this file and the code disagree.

Both services read TOML (`--config FILE`): keys go in a `[relay]` or `[guest]` table (or at
the top level). Every key is also a flag; a flag given on the command line wins over the file.
Unknown keys and bad values are refused with the key's name and the accepted values.

"""


def render() -> str:
    return (HEADER + reference_markdown("Relay", RelaySettings, "relay") + "\n"
            + reference_markdown("Guest", GuestSettings, "guest"))


if __name__ == "__main__":
    print(render(), end="")
