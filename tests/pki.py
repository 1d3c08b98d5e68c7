"""Certificates for the TLS tests, made with the openssl command line: a CA and certificates it signs."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")


def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: pathlib.Path, ca_name: str, subjects: dict[str, str]) -> pathlib.Path:
    """In ``d``: ca.pem/ca.key, and NAME.pem/NAME.key for each NAME → common name in ``subjects``. The one named
    "server" is valid for 127.0.0.1 and localhost."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", f"/CN={ca_name}", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, common_name in subjects.items():
        ext = ["-extfile", "server.ext"] if name == "server" else []
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={common_name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d
