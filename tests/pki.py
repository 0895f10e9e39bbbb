"""Throw-away certificates for the TLS tests, made by `cryptography`: an EC CA, a server certificate for
localhost and 127.0.0.1, a client certificate from the CA, and a client pair from an unrelated "rogue" CA."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server pair for localhost/127.0.0.1, a client pair from the CA, and a
    client pair from an unrelated "rogue" CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(common_name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None = None,
                 issuer_key: ec.EllipticCurvePrivateKey | None = None, usage: x509.ObjectIdentifier | None = None,
                 names: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer is None:  # a self-signed CA
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """Throw-away certificates for one test module (valid for a day)."""
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("digits test CA", ca_key)
    rogue_ca = _certificate("rogue CA", rogue_ca_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    server = _certificate("localhost", server_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                          ("localhost", "127.0.0.1"))
    client = _certificate("digits client", client_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate("digits client", rogue_key, rogue_ca, rogue_ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    rogue_ca_path, _ = _write(directory, "rogue-ca", rogue_ca, rogue_ca_key)
    server_cert, server_key_path = _write(directory, "server", server, server_key)
    client_cert, client_key_path = _write(directory, "client", client, client_key)
    rogue_cert, rogue_key_path = _write(directory, "rogue", rogue, rogue_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_ca_path, rogue_cert,
               rogue_key_path)


def spki_sha256(cert_path: Path) -> str:
    """base64 SHA-256 of a certificate's public key (Chromium's --ignore-certificate-errors-spki-list)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()
