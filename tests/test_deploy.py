"""Deployment examples agree with the code: units verify, every command line parses with the
real CLI, configs load, and the Firecracker `_PORT` listener is where Firecracker looks.
No service is started here except a relay on a temporary Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from relay_helpers import Guest

from host_relay.service import RelayService
from host_relay.settings import RelaySettings
from timesyncd.addresses import parse_address
from timesyncd.cli import main as cli_main
from timesyncd.config import load_settings, read_toml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RELAY_UNIT = DEPLOY / "systemd/timesync-relay.service"


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and key.strip() == key and section, f"not KEY=VALUE in a section: {raw!r}"
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def parse_cli(argv: list[str]) -> tuple[str, click.Context]:
    """Parse a `timesync ...` command line with the real CLI, without running anything."""
    assert Path(argv[0]).name == "timesync", argv
    ctx = cli_main.make_context("timesync", argv[1:], resilient_parsing=False)
    rest = [*ctx._protected_args, *ctx.args]
    cmd = cli_main.get_command(ctx, rest[0])
    assert cmd is not None, rest
    return rest[0], cmd.make_context(rest[0], rest[1:], parent=ctx)


def test_relay_unit_is_hardened() -> None:
    e = unit_entries(RELAY_UNIT)
    s = {k.removeprefix("Service."): v[-1] for k, v in e.items() if k.startswith("Service.")}
    assert s["NoNewPrivileges"] == "yes" and s["DynamicUser"] == "yes"
    assert s["ProtectSystem"] == "strict" and s["ProtectClock"] == "yes"
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_VSOCK", "AF_UNIX", "AF_INET",
                                                         "AF_INET6"}
    assert "/etc/timesync" in s["ReadOnlyPaths"]
    assert s["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"  # vsock port 123 is < 1024
    assert "@clock" in e["Service.SystemCallFilter"][-1]
    assert e["Install.WantedBy"] == ["multi-user.target"]


def test_unit_command_lines_parse_with_the_cli_and_their_config_loads() -> None:
    e = unit_entries(RELAY_UNIT)
    name, ctx = parse_cli(shlex.split(e["Service.ExecStart"][-1]))
    assert name == "relay" and ctx.params["config"] == "/etc/timesync/relay.toml"
    settings = load_settings(RelaySettings, read_toml(DEPLOY / "systemd/relay.toml", "relay"))
    assert settings.metrics == "tcp:127.0.0.1:9123"
    assert parse_address(settings.metrics).host == "127.0.0.1"  # loopback by default
    assert settings.listen == ("vsock:any:123",)

    dropin = unit_entries(DEPLOY / "firecracker/timesync-relay-firecracker.conf")
    assert dropin["Service.ExecStart"][0] == ""  # resets the main unit's command
    name, ctx = parse_cli(shlex.split(dropin["Service.ExecStart"][-1]))
    assert name == "relay"
    (listen,) = ctx.params["listen"]
    vm = json.loads((DEPLOY / "firecracker/vm-config.json").read_text())
    fc = parse_address(listen)
    assert fc.kind == "fc" and fc.path == vm["vsock"]["uds_path"]
    assert dropin["Service.ReadWritePaths"] == [str(Path(fc.path).parent)]

    guest_unit = unit_entries(DEPLOY / "firecracker/timesync-guest.service")
    name, ctx = parse_cli(shlex.split(guest_unit["Service.ExecStart"][-1]))
    assert name == "guest" and ctx.params["relay"] == f"vsock:2:{fc.port}"  # host is CID 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
@pytest.mark.parametrize("unit", ["systemd/timesync-relay.service",
                                  "firecracker/timesync-guest.service"])
def test_units_pass_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at a stand-in (nothing is started)
    stand_in = tmp_path / "timesync"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = (DEPLOY / unit).read_text().replace("/usr/local/bin/timesync", str(stand_in))
    copy = tmp_path / Path(unit).name
    copy.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if Path(unit).name in ln or "Unknown" in ln]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    if unit.startswith("systemd/"):
        sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(copy)],
                             capture_output=True, text=True, timeout=60)
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout + sec.stderr)
        if level is not None:  # older systemd has no --offline
            assert float(level.group(1)) <= 3.0, sec.stdout


def test_enclave_entrypoint_waits_for_sync_then_execs_the_app() -> None:
    script = DEPLOY / "nitro-enclave/entrypoint.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)
    text = script.read_text()
    # join continuation lines, substitute the variables, parse each timesync call
    joined = re.sub(r"\\\n\s*", " ", text)
    calls = [ln.strip().removeprefix("if ! ").rstrip("&; ").removesuffix("; then").strip()
             for ln in joined.splitlines() if re.match(r"\s*(if ! )?timesync ", ln)]
    env = {"$RELAY": "vsock:3:123", "$NAME": "e", "$STATUS_SOCKET": "/run/timesync/g.sock",
           "$MAX_OFFSET": "0.005", "$WAIT_S": "120"}
    names = []
    for call in calls:
        for var, val in env.items():
            call = call.replace(f'"{var}"', val)
        name, ctx = parse_cli(shlex.split(call.removesuffix("; then")))
        names.append(name)
        if name == "guest":
            assert ctx.params["clock"] == "system" and ctx.params["relay"] == "vsock:3:123"
        if name == "wait-sync":
            assert ctx.params["max_offset"] == 0.005
    assert names == ["guest", "wait-sync"]
    assert text.index("wait-sync") < text.index('exec "$@"')


def test_enclave_dockerfile_copies_what_exists_and_uses_the_entrypoint() -> None:
    lines = (DEPLOY / "nitro-enclave/Dockerfile").read_text().splitlines()
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} missing (context is repo root)"
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")][0]
    assert json.loads(entry.split(None, 1)[1]) == ["/usr/local/bin/timesync-entrypoint"]
    assert any("entrypoint.sh /usr/local/bin/timesync-entrypoint" in ln for ln in lines)
    assert lines[0].startswith("#") and any(ln.startswith("FROM ") for ln in lines)


def test_firecracker_port_listener_is_where_firecracker_connects(tmp_path: Path) -> None:
    """A relay on fc:UDS:PORT accepts a plain Unix connection on UDS_PORT, as Firecracker
    makes it for a guest connecting to host port PORT."""
    vm = json.loads((DEPLOY / "firecracker/vm-config.json").read_text())
    assert vm["vsock"]["guest_cid"] >= 3
    uds = tmp_path / "vsock.sock"

    async def main() -> None:
        relay = RelayService(RelaySettings(listen=(f"fc:{uds}:123",)))
        await relay.start()
        try:
            assert (tmp_path / "vsock.sock_123").is_socket()
            g = await Guest.connect(f"unix:{tmp_path}/vsock.sock_123", name="vm1")
            assert g.hello["upstreams"][0]["index"] == 0
            await g.close()
        finally:
            await relay.stop()

    asyncio.run(main())


def test_deployment_doc_names_every_deploy_file() -> None:
    doc = (ROOT / "docs/DEPLOYMENT.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert path.name in doc, f"docs/DEPLOYMENT.md does not mention {path.name}"


def _readme_commands() -> list[list[str]]:
    """Every `timesync ...` command in the README's shell blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|&(?!&)", line.split("#")[0]):
                argv = shlex.split(part)
                if argv and argv[0] == "timesync":
                    commands.append(argv)
    return commands


def test_readme_commands_parse_with_the_real_cli() -> None:
    commands = _readme_commands()
    assert len(commands) >= 7, commands  # demo, drift-sim, relay x2, guest x2, wait-sync, status
    for argv in commands:
        name, ctx = parse_cli(argv)
        ctx.close()
        assert name in {"demo", "drift-sim", "relay", "guest", "wait-sync", "status"}, argv
