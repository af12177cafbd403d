"""The certificates mitmproxy serves for ``--certs``, replaced when their files are renewed.

Relies on: the tlsconfig addon's ``certstore`` (the ``CertStore`` it picks
client-facing certificates from), the store's ``certs`` table (host pattern or
name -> ``CertStoreEntry``) and the fields it was made with, and
``CertStoreEntry(cert, privatekey, chain_file, chain_certs)``.
Why: mitmproxy reads ``--certs`` files once, when the option is set; setting the
option again to the same value changes nothing, and there is no call to load a
renewed file (certificates.py watches the files).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from mitmproxy import certs, ctx


def mitmproxy_certstore() -> certs.CertStore | None:
    """The store mitmproxy's tlsconfig addon picks client-facing certificates from."""
    master = getattr(ctx, "master", None)
    tlsconfig = master.addons.get("tlsconfig") if master is not None else None
    return getattr(tlsconfig, "certstore", None)


def certificate_entry(pem: bytes, passphrase: bytes | None, chain_file: Path) -> certs.CertStoreEntry:
    """A ``--certs`` file's contents as mitmproxy's store keeps them (``CertStore.add_cert_file``
    reads the same from a path): the certificate, its private key and the chain, whose
    certificates are also in ``chain_file`` (mitmproxy hands that file to OpenSSL to send the
    chain). Raises ValueError unless ``pem`` holds a certificate and its own private key."""
    cert = certs.Cert.from_pem(pem)
    key = certs.load_pem_private_key(pem, passphrase)
    if cert.public_key() != key.public_key():
        raise ValueError("the private key is not the certificate's")
    chain = [certs.Cert(c) for c in x509.load_pem_x509_certificates(pem)]
    return certs.CertStoreEntry(cert, key, chain_file, chain)


def replace_certificate(store: certs.CertStore, spec: str, entry: certs.CertStoreEntry) -> None:
    """Serve ``entry`` for ``spec`` (the host pattern of ``--certs spec=path``) from now on, in place
    of what was served for it. Connections already open keep their certificate; new handshakes
    get the new one (mitmproxy's TLS contexts are cached per chain file, so ``entry`` names a new one)."""
    old = store.certs.get(spec)
    scratch = certs.CertStore(store.default_privatekey, store.default_ca, None, store.default_crl, store.dhparams)
    scratch.add_cert(entry, spec)  # the names mitmproxy files it under: its CN, its SANs, the spec
    fresh = {name: e for name, e in store.certs.items() if old is None or e is not old}
    fresh.update(scratch.certs)
    store.certs = fresh  # one assignment: a handshake sees the old entries or the new ones
