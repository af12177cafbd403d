"""Throwaway CAs and server certificates for 127.0.0.1/localhost, for HTTPS tests.

    ca = TestCA(directory)              # ca.crt (and its key) written there
    ca.issue(directory, "edge")         # edge.crt, edge.key, edge.pem (certificate + key)
    ca.issue(directory, intermediate="R11")  # signed by an intermediate CA, which follows it in .crt/.pem
    ca.client_context()                 # an ssl.SSLContext that trusts only this CA
    issue_server_cert(dir, ca_dir)      # another server certificate (new key, new serial) from that CA

The test upstream (tests/support/upstream.py) serves its edge, token service and
CDN with certificates of one such CA per test session; whoever talks to it
(the mirror, httpx, skopeo, curl) trusts that CA explicitly.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=2)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A CA of its own in ``directory`` (``ca.crt``, ``ca-key.pem``; loaded again if both exist)."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path | str, name: str = "hub-rewrite test CA"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = self.directory / "ca.crt"
        # not "*.key": the directory doubles as a certificate directory (skopeo --cert-dir,
        # docker certs.d), where a .key file is taken for a client key
        key_path = self.directory / "ca-key.pem"
        if self.cert_path.exists() and key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            # no path length: a certificate may come through an intermediate (a renewed chain, as
            # Let's Encrypt's intermediates change)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_path.write_bytes(_pem_key(self._key))
        key_path.chmod(0o600)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, directory: Path | str, name: str = "server", hosts=("localhost",),
              ips=("127.0.0.1",), intermediate: str = "") -> dict[str, Path]:
        """Write ``<name>.crt``, ``<name>.key`` and ``<name>.pem`` (both, for mitmproxy ``--certs``);
        with ``intermediate``, signed by an intermediate CA of that name, which follows the
        certificate in ``.crt`` and ``.pem`` (as in a certbot fullchain.pem)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        issuer, issuer_key, chain = self._cert, self._key, []
        if intermediate:
            issuer_key = ec.generate_private_key(ec.SECP256R1())
            issuer = self._intermediate(intermediate, issuer_key)
            chain = [issuer]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _server_cert(key, issuer, issuer_key, hosts, ips)
        cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain])
        key_pem = _pem_key(key)
        paths = {"cert": directory / f"{name}.crt", "key": directory / f"{name}.key", "pem": directory / f"{name}.pem"}
        paths["cert"].write_bytes(cert_pem)
        paths["key"].write_bytes(key_pem)
        paths["key"].chmod(0o600)
        paths["pem"].write_bytes(cert_pem + key_pem)
        return paths

    def _intermediate(self, name: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(f"hub-rewrite test intermediate {name}"))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only (and checks host names)."""
        return ssl.create_default_context(cafile=str(self.cert_path))


def _server_cert(key, issuer: x509.Certificate, issuer_key, hosts, ips) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else ips[0]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Python 3.13 verifies strictly (VERIFY_X509_STRICT): key identifiers are required
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def make_ca_and_server_cert(directory: Path, hosts=("localhost",), ips=("127.0.0.1",)) -> dict[str, Path]:
    """Write ca.crt, server.pem (certificate + key, for mitmproxy --certs) and server.crt/server.key."""
    ca = TestCA(directory)
    return {"ca": ca.cert_path, **ca.issue(directory, "server", hosts, ips)}


def issue_server_cert(directory: Path, ca_directory: Path, hosts=("localhost",), ips=("127.0.0.1",),
                      intermediate: str = "") -> dict[str, Path]:
    """Another server certificate (new key, new serial) from the CA in ``ca_directory``
    (``make_ca_and_server_cert``'s), as server.crt/.key/.pem in ``directory``."""
    ca = TestCA(ca_directory)
    return {"ca": ca.cert_path, **ca.issue(directory, "server", hosts, ips, intermediate)}


def serial_of(pem_or_der: bytes) -> int:
    """The serial number of the first certificate in PEM text or of a DER certificate."""
    if pem_or_der.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_certificates(pem_or_der)[0].serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number
