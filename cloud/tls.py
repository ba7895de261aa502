"""A self-signed TLS pair for a guide's first run (``edgezo guide cert``), made with the ``openssl`` command.

The certificate is its own CA: edges pass it as ``--ca``. Names and IPs the edges connect to go into the
subjectAltName (Python's ssl checks the host name against it). For production, use a certificate from your CA.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path


class TLSError(RuntimeError):
    """The pair could not be made; the message names why."""


def _san(hosts: list[str]) -> str:
    out = []
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            out.append(f"IP:{h}")
        except ValueError:
            out.append(f"DNS:{h}")
    return ",".join(out)


def self_signed_pair(folder: str | os.PathLike, *, hosts: list[str], days: int = 365) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``folder``: EC P-256, valid ``days``, for ``hosts``; the key is mode 0600."""
    if not hosts:
        raise TLSError("give at least one host name or IP")
    if days < 1:
        raise TLSError(f"--days must be >= 1, got {days}")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TLSError("the openssl command is not installed (apt install openssl), or bring your own PEM pair")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TLSError(f"cannot create {folder}: {e}") from e
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.exists() or key.exists():
        raise TLSError(f"{cert} or {key} exists already; remove them or pick another --out")
    cmd = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-days", str(days), "-subj", f"/CN={hosts[0]}", "-addext", f"subjectAltName={_san(hosts)}",
           "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(key), "-out", str(cert)]
    old = os.umask(0o077)  # the key must never be world-readable, not even for an instant
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.umask(old)
    if p.returncode != 0:
        raise TLSError(f"openssl failed: {p.stderr.strip().splitlines()[-1:]}")
    cert.chmod(0o644)
    return cert, key
