"""A test CA and a SuperLink server certificate (``peel-fed deploy certs``).

For trials and CI on machines you control: the CA key stays next to the certificates, and the
server certificate names the hosts the SuperNodes and ``flwr run`` dial, plus ``127.0.0.1`` and
``localhost`` (the SuperLink's own SuperExec dials its runtime API there). For a public
deployment use certificates from your organisation's CA instead.

Made with ``cryptography`` (already a Flower dependency), so no ``openssl`` binary is needed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from peel_fed.atomic import write_atomic


@dataclass(frozen=True)
class Certificates:
    """Paths of a test CA and a SuperLink server certificate (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> Certificates:
        """The files ``make_test_certificates`` writes in ``folder`` (one-line error if absent)."""
        folder = Path(folder).expanduser().resolve()
        certs = cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
        for path in (certs.ca_cert, certs.server_cert, certs.server_key):
            if not path.is_file():
                raise FileNotFoundError(
                    f"TLS file missing: {path} (make them with: peel-fed deploy certs "
                    f"--out {folder} --host <superlink host>)"
                )
        return certs


_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")
"""What :func:`make_test_certificates` writes."""

_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _san(host: str):
    """A subjectAltName entry for an IP address or a DNS name (one-line error otherwise)."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_NAME.match(host):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return x509.DNSName(host)


def make_test_certificates(
    out_dir: str | Path,
    hosts: list[str] | tuple[str, ...] = (),
    days: int = 30,
    force: bool = False,
) -> Certificates:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` for ``hosts`` in ``out_dir``.

    Every host (an IP address or a DNS name) becomes a subjectAltName of the server certificate,
    with ``127.0.0.1`` and ``localhost`` always added. Keys are written with mode 0600. Files
    already there are a one-line ``FileExistsError`` unless ``force``: a new CA would orphan
    every certificate the old one signed.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, got {days}")
    names = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    sans = [_san(h) for h in names]
    out = Path(out_dir).expanduser().resolve()
    there = [n for n in _FILES if (out / n).exists()]
    if there and not force:
        raise FileExistsError(
            f"{out / there[0]} exists: a new test CA would replace it and orphan every "
            "certificate it signed; give --force to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peel-fed test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key),
        "server.pem": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": pem_key(key),
    }
    for name, data in files.items():
        mode = 0o600 if name.endswith(".key") else 0o644
        write_atomic(out / name, lambda fh, data=data: fh.write(data), mode=mode)
    return Certificates.in_dir(out)


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH files, EC P-384, as Flower expects)."""

    private_key: Path
    public_key: Path


def make_node_key(folder: str | Path, name: str) -> NodeKey:
    """Write ``<name>`` (private) and ``<name>.pub`` in ``folder``: the SuperNode starts with
    the private key (``--auth-supernode-private-key``); the SuperLink's operator registers the
    public one (``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder).expanduser().resolve()
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out = NodeKey(folder / name, folder / f"{name}.pub")
    out.private_key.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.private_key, lambda fh: fh.write(private), mode=0o600)
    write_atomic(out.public_key, lambda fh: fh.write(public + b"\n"))
    return out
