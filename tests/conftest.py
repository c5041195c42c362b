"""Suite-wide guard: tests keep their sockets under temp dirs, never in the system paths."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from guest_client.settings import DEFAULT_STATUS_SOCKET

SYSTEM_DIR = os.path.dirname(DEFAULT_STATUS_SOCKET)


@pytest.fixture(scope="session", autouse=True)
def no_test_writes_the_system_socket_dir() -> Iterator[None]:
    existed = os.path.exists(SYSTEM_DIR)
    yield
    if not existed:
        assert not os.path.exists(SYSTEM_DIR), (
            f"a test created {SYSTEM_DIR}: give its guest a status_socket under a temp dir")
