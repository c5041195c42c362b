"""The guest daemon's import footprint: it must fit small enclaves (RSS budget 40 MB).

numpy (~13 MiB) is the simulator's; cryptography and pyOpenSSL (~15 MiB together) load only
once an NTS source actually runs a key exchange.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    probe = (f"{code}; import sys; "
             f"print(' '.join(m for m in {modules!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, timeout=60,
                         capture_output=True, text=True).stdout
    return out.split()


def test_guest_daemon_does_not_import_numpy() -> None:
    code = "import guest_client.daemon, sys; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_nts_crypto_loads_only_when_an_nts_source_is_used() -> None:
    heavy = ("numpy", "cryptography", "OpenSSL")
    assert _loaded_after("import guest_client.daemon", heavy) == []
    # a key-exchange result arrives: the NTS state needs AES-SIV, so the import happens then
    ke = ("import types, guest_client.daemon as d; from guest_client import nts_source as n; "
          "src = n.NtsSource(n.parse_nts_server('localhost@127.0.0.1')); "
          "r = types.SimpleNamespace(aead_id=15, c2s_key=bytes(32), s2c_key=bytes(32), "
          "cookies=(bytes(64),), server='127.0.0.1', port=123, validity_unchecked=False); "
          "assert src.on_ke_result(r, {'udp:127.0.0.1:123': 0}) and src.ready")
    assert "cryptography" in _loaded_after(ke, heavy)
