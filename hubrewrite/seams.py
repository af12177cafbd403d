"""Where the mirror reaches into mitmproxy beyond its addon API, in one place.

Each function here depends on how mitmproxy 12 is built inside, not on a
documented interface; ``tests/unit/test_seams.py`` checks each against the
installed mitmproxy and fails loudly when an upgrade moves something.

* the terminal log's formatter (``hub_log_format: json``);
* mitmdump's flow printer (``hub_log_format: json``);
* the certificate ``--certs`` loaded, replaced when the file is renewed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography import x509
from mitmproxy import certs, ctx
from mitmproxy import log as mitmlog
from mitmproxy.addons import dumper as dumper_addon
from mitmproxy.addons import termlog


def set_termlog_formatter(formatter: logging.Formatter | None) -> None:
    """Put ``formatter`` on mitmproxy's terminal log (mitmdump, mitmweb); None: mitmproxy's own."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, termlog.TermLogHandler):
            handler.setFormatter(formatter or mitmlog.MitmFormatter(handler.has_vt_codes))


def replace_dumper_echo(render) -> None:
    """Print each of mitmdump's flow lines as ``render(text)`` instead; None: as mitmdump does.

    The dumper prints everything through its ``echo`` method; an instance
    attribute of that name takes its place (and removing it restores it)."""
    master = getattr(ctx, "master", None)
    dumper = master.addons.get("dumper") if master is not None else None
    if dumper is None:
        return  # mitmweb: no flow lines
    if render is None:
        dumper.__dict__.pop("echo", None)
        return

    def echo(text: str, ident=None, **style) -> None:
        if ident:
            text = dumper_addon.indent(ident, text)
        print(render(text), file=dumper.outfp)

    dumper.echo = echo


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
