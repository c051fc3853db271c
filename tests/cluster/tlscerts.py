"""Certificates for the DICOM TLS tests: a CA, and server and client
certificates it signs (EC P-256, PEM files), made with the `cryptography`
package so a test can also make one that has expired.

    ca = make_ca(tmp / "ca")                       # ca.cert, ca.key
    srv = make_cert(ca, tmp / "server", "router", server=True)
    cli = make_cert(ca, tmp / "client", "modality1")
    old = make_cert(ca, tmp / "old", "old", expired=True)

Each returns a Cert with .cert and .key paths (the key unencrypted, 0600).
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Cert:
    cert: Path
    key: Path
    name: str
    _key_obj: object = None
    _cert_obj: object = None


def _write(prefix: Path, key, cert) -> Cert:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    key_path = Path(str(prefix) + ".key")
    cert_path = Path(str(prefix) + ".pem")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return Cert(cert_path, key_path, cn, key, cert)


def make_ca(prefix: Path, name: str = "ShardPACS test CA") -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ShardPACS tests"),
         x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write(prefix, key, cert)


def make_cert(ca: Cert, prefix: Path, cn: str, server: bool = False,
              expired: bool = False) -> Cert:
    """A leaf certificate signed by ca: for a server (names localhost and
    127.0.0.1) or a client; expired=True makes one that ended yesterday."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ShardPACS tests"),
             x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca._cert_obj.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if server else [ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca._key_obj, hashes.SHA256())
    return _write(prefix, key, cert)


def subject_of(c: Cert) -> str:
    """The RFC 2253 subject string the router reports (CN first)."""
    return c._cert_obj.subject.rfc4514_string()
