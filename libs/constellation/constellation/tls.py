"""TLS and mutual TLS from certificate files, for every gRPC server and client of the mesh.

Servers: :func:`server_credentials` (a certificate and key; with a CA and ``require_client_auth``, only
clients holding a certificate that CA signed get in: mTLS). Clients: one process-wide
:class:`ClientSecurity` (set once by a service's ``main`` from its config, or by a test) that
:func:`open_channel` reads, so every client built on :class:`~constellation.channel.ServiceClient`, and
the Triton client when ``triton`` is set, dials over TLS with the same CA and client certificate, and
sends the process's service key. :func:`make_dev_ca` writes a development CA with server and client
certificates (``constellation certs dev-ca DIR``); never use it in production.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from constellation import auth
from constellation.config import SecurityConfig


@dataclass(frozen=True)
class ClientSecurity:
    """How this process's clients dial the mesh.

    Attributes:
        ca: PEM file of the CA that signed the servers' certificates; empty: plain-text channels.
        cert: PEM certificate this process presents (mTLS); empty: none.
        key: PEM private key of ``cert``.
        server_name: Name checked against the servers' certificates instead of the dialled host.
        bearer: API key sent as ``authorization: Bearer`` on every call; empty: none.
        triton: Dial Triton over TLS as well (Triton started with ``--grpc-use-ssl``).
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""
    bearer: str = ""
    triton: bool = False


_CLIENTS = ClientSecurity()


def configure_clients(security: ClientSecurity) -> None:
    """Sets how every client made after this call dials (see the module doc)."""
    global _CLIENTS
    _CLIENTS = security


def from_config(security: SecurityConfig) -> ClientSecurity:
    """Client settings from a service's ``security`` table (its client certificate, or its server one)."""
    return ClientSecurity(
        ca=security.tls_ca,
        cert=security.tls_client_cert or (security.tls_cert if security.mtls else ""),
        key=security.tls_client_key or (security.tls_key if security.mtls else ""),
        server_name=security.tls_server_name,
        bearer=security.service_key,
        triton=security.triton_tls,
    )


def client_security() -> ClientSecurity:
    """The process-wide client settings."""
    return _CLIENTS


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(
    cert: str, key: str, ca: str = "", *, require_client_auth: bool = False
) -> grpc.ServerCredentials:
    """Server credentials from PEM files; ``require_client_auth`` (mTLS) needs ``ca``."""
    if require_client_auth and not ca:
        raise ValueError("mTLS needs the CA file that signed the clients' certificates")
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=_read(ca),
        require_client_auth=require_client_auth,
    )


def channel_credentials(security: ClientSecurity) -> grpc.ChannelCredentials | None:
    """Channel credentials for ``security``, or None for a plain-text channel."""
    if not security.ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.ca), private_key=_read(security.key), certificate_chain=_read(security.cert)
    )


def open_channel(
    address: str,
    options: Sequence[tuple[str, object]],
    interceptors: Sequence[grpc.aio.ClientInterceptor],
    security: ClientSecurity | None = None,
) -> grpc.aio.Channel:
    """A channel to ``address``: TLS when the settings name a CA, with the service key's interceptors."""
    chosen = security if security is not None else _CLIENTS
    all_interceptors = [*interceptors, *(auth.bearer_interceptors(chosen.bearer) if chosen.bearer else [])]
    credentials = channel_credentials(chosen)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=all_interceptors)
    full_options = [*options, *([("grpc.ssl_target_name_override", chosen.server_name)] if chosen.server_name else [])]
    return grpc.aio.secure_channel(address, credentials, options=full_options, interceptors=all_interceptors)


def blocking_channel(address: str) -> grpc.Channel:
    """A synchronous channel (health checks of supervisors and the CLI) with the process-wide TLS settings."""
    credentials = channel_credentials(_CLIENTS)
    if credentials is None:
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", _CLIENTS.server_name)] if _CLIENTS.server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def triton_credentials() -> grpc.ChannelCredentials | None:
    """Credentials for Triton's gRPC endpoint when the process-wide settings ask for TLS to Triton."""
    return channel_credentials(_CLIENTS) if _CLIENTS.triton else None


@dataclass(frozen=True)
class DevCerts:
    """Files written by :func:`make_dev_ca` (PEM)."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client(self, **overrides: object) -> ClientSecurity:
        """Client settings presenting the client certificate (mTLS)."""
        base = ClientSecurity(ca=str(self.ca), cert=str(self.client_cert), key=str(self.client_key))
        return replace(base, **overrides)  # type: ignore[arg-type]


def make_dev_ca(
    directory: Path | str, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"), days: int = 30
) -> DevCerts:
    """Writes a development CA and a server and a client certificate it signed into ``directory``.

    The server certificate names ``hosts`` (DNS names or IP addresses); the client certificate's
    common name is ``constellation-client``. Keys are EC P-256, files mode 0600. For development and
    tests only: the CA key sits beside the certificates.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _builder(name("Constellation dev CA"), name("Constellation dev CA"), ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(*_CA_USAGE), critical=True)
        .sign(ca_key, _sha256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    leaves = {}
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(name(f"constellation-{role}"), ca.subject, key.public_key(), now, days)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        leaves[role] = (builder.sign(ca_key, _sha256()), key)
    files = DevCerts(
        *(folder / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"))
    )
    _write_cert(files.ca, ca)
    _write_key(files.ca_key, ca_key)
    _write_cert(files.server_cert, leaves["server"][0])
    _write_key(files.server_key, leaves["server"][1])
    _write_cert(files.client_cert, leaves["client"][0])
    _write_key(files.client_key, leaves["client"][1])
    return files


# KeyUsage(digital_signature, content_commitment, key_encipherment, data_encipherment, key_agreement,
#          key_cert_sign, crl_sign, encipher_only, decipher_only)
_CA_USAGE = (True, False, False, False, False, True, True, False, False)


def _sha256():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _builder(subject, issuer, public_key, now, days):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _write_cert(path: Path, cert) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
