"""Throw-away certificate authorities for TLS tests (trustme): a server certificate for 127.0.0.1 and localhost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.redis_server import TlsFiles


@dataclass(frozen=True)
class Pki:
    server: TlsFiles  # the server's certificate and key, and the CA that signed them
    other_ca_file: str  # a CA that signed nothing the server presents


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: directory / f"{name}.pem" for name in ("ca", "other-ca", "server-cert", "server-key")}
    ca.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other-ca"])
    paths["server-cert"].write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(paths["server-key"])
    server = TlsFiles(cert_file=str(paths["server-cert"]), key_file=str(paths["server-key"]), ca_file=str(paths["ca"]))
    return Pki(server=server, other_ca_file=str(paths["other-ca"]))
