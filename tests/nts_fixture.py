"""A real chronyd serving NTS on loopback, with a throwaway self-signed certificate.

chronyd runs with ``-x`` (never touches the clock), ``-u root`` (so it can read the key in our
temp dir without dropping to ``_chrony``), ``cmdport 0`` and free ports picked at run time.
Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHRONYD = "/usr/sbin/chronyd"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class NtsServer:
    """A running chronyd: where to do NTS-KE (TCP) and NTP (UDP), and the CA to trust."""

    host: str
    ke_port: int
    ntp_port: int
    cafile: Path
    pid: int


def free_port(kind: int) -> int:
    """A currently free loopback port of socket type ``kind`` (SOCK_STREAM or SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def make_cert(
    directory: Path,
    *,
    name: str = "localhost",
    not_before: dt.datetime | None = None,
    days: int = 30,
    stem: str = "server",
) -> CertFiles:
    """Write a self-signed EC certificate for ``name`` (plus SAN 127.0.0.1) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass(frozen=True)
class Authority:
    """A test CA: its certificate file (the guest's ``nts_ca_file``) and signing key."""

    cert_file: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_ca(directory: Path, stem: str = "ca") -> Authority:
    """A self-signed CA valid for ten years around now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"timesync test CA {stem}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=3650))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{stem}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(path, cert, key)


def issue_cert(ca: Authority, directory: Path, *, name: str = "localhost",
               not_before: dt.datetime | None = None, days: int = 30,
               stem: str = "server") -> CertFiles:
    """A server certificate for ``name`` (and 127.0.0.1) signed by ``ca``, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


def _wait_for_tcp(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chronyd exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"chronyd NTS-KE port {port} not accepting after {timeout_s} s")


@contextlib.contextmanager
def chronyd_nts(directory: Path, cert: CertFiles | None = None, *,
                cafile: Path | None = None,
                ports: tuple[int, int] | None = None) -> Iterator[NtsServer]:
    """Run chronyd with NTS in ``directory`` until the context exits; raise with its log if not.

    ``cafile``: what clients trust (default: the self-signed ``cert`` itself); ``ports``: the
    (KE, NTP) ports of a server being restarted (a fresh ``directory`` means new keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = cert or make_cert(directory)
    ke_port, ntp_port = ports or (free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM))
    pidfile = directory / "chronyd.pid"
    conf = directory / "chrony.conf"
    conf.write_text(
        "\n".join(
            [
                "local stratum 5",
                f"port {ntp_port}",
                f"ntsport {ke_port}",
                f"bindaddress {HOST}",
                "cmdport 0",
                f"allow {HOST}",
                f"pidfile {pidfile}",
                f"driftfile {directory / 'drift'}",
                f"ntsdumpdir {directory}",
                f"ntsservercert {cert.cert}",
                f"ntsserverkey {cert.key}",
                "ntsprocesses 0",
                "",
            ]
        )
    )
    log = directory / "chronyd.log"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            [CHRONYD, "-x", "-d", "-u", "root", "-f", str(conf)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        try:
            _wait_for_tcp(ke_port, proc, timeout_s=10.0)
            _check_pidfile(pidfile, proc.pid)
        except Exception as exc:
            raise RuntimeError(f"{exc}; chronyd log:\n{log.read_text(errors='replace')}") from exc
        yield NtsServer(HOST, ke_port, ntp_port, cafile or cert.cert, proc.pid)
    finally:
        _stop(proc)


def _check_pidfile(pidfile: Path, pid: int) -> None:
    """Make sure the chronyd answering is ours, not a stray one on a reused port."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if int(pidfile.read_text().strip()) == pid:
                return
        time.sleep(0.05)
    raise RuntimeError(f"pidfile {pidfile} does not name our chronyd (pid {pid})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
