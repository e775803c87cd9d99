"""Mutual TLS for every channel (coordinator <-> peer and peer <-> peer), and dev certificates.

`fedmoe certs DIR` writes a run CA (ca.crt, ca.key) and, per node, NAME.crt and NAME.key signed by
it. Every server requires a client certificate signed by the same CA, and every client checks the
server's, so only holders of the run's certificates can register, fetch or serve.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedmoe.common.atomic import atomic_write_bytes
from fedmoe.common.logsafe import clip

# A node name becomes a file name (NAME.crt) and a certificate's common name: nothing that could
# leave the directory ("../x", "/etc/x") or confuse a shell or a log.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes


def check_node_name(name: str) -> str:
    """A node name that is safe as a file name in the certificate directory, or ValueError."""
    if not _NODE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"node name {clip(name)} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The common name of the client's certificate, from `ServicerContext.auth_context()`.

    With mutual TLS, gRPC puts the verified client certificate's subject CN under
    "x509_common_name" (a list of one bytes value). None on an insecure call, or when the
    certificate has no single, valid node name as its CN: the caller then knows nobody.
    """
    values = auth_context.get("x509_common_name") or []
    if len(values) != 1:
        return None
    try:
        name = bytes(values[0]).decode("utf-8")
        return check_node_name(name)
    except (UnicodeDecodeError, ValueError):
        return None


def load_tls(certs_dir: str | Path, name: str) -> TlsFiles:
    check_node_name(name)
    d = Path(certs_dir)
    paths = [d / "ca.crt", d / f"{name}.crt", d / f"{name}.key"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"TLS: missing {', '.join(missing)} (make them with `fedmoe certs {d}`)")
    return TlsFiles(*(p.read_bytes() for p in paths))


def server_credentials(tls: TlsFiles, more: Sequence[TlsFiles] = ()) -> grpc.ServerCredentials:
    """`tls` first (presented by default), then `more`: gRPC presents the one whose names match
    the name the client asks for (SNI), so one endpoint can answer as each peer it hosts."""
    pairs = [(t.key, t.cert) for t in (tls, *more)]
    return grpc.ssl_server_credentials(pairs, root_certificates=tls.ca, require_client_auth=True)


def channel(
    address: str, tls: TlsFiles | None, options: list, server_name: str | None = None
) -> grpc.Channel:
    """With `server_name`, the server's certificate must be valid for that name (every
    certificate of `fedmoe certs` carries its node name) instead of the host in `address`: a
    peer checks that the endpoint it fetches from is the node it expects, whatever address
    (e.g. a container's IP, unknown when the certificates were made) that node advertised."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    if server_name is not None:
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, creds, options=options)


def add_port(
    server: grpc.Server, listen: str, tls: TlsFiles | None, more: Sequence[TlsFiles] = ()
) -> int:
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, server_credentials(tls, more))


def make_certs(out: Path, nodes: list[str], hosts: list[str], days: int = 30) -> list[Path]:
    """A CA and one certificate per node, valid for `hosts` (DNS names or IPs) and the node name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    for node in nodes:  # every name checked before anything is written
        check_node_name(node)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    written: list[Path] = []

    def write(path: Path, data: bytes, private: bool) -> None:
        atomic_write_bytes(path, data, mode=0o600 if private else 0o644)
        written.append(path)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe run CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    write(out / "ca.key", pem_key(ca_key), private=True)

    for node in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys([node, *hosts]):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(out / f"{node}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
        write(out / f"{node}.key", pem_key(key), private=True)
    return written
