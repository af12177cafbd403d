"""mitmseams/certificates.py against the installed mitmproxy: a failure names the seam.

Driven through mitmproxy's own tlsconfig addon and a TLS handshake in memory
(pyOpenSSL), as a client connecting to the mirror would see it: the leaf and
the chain it is sent.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from mitmproxy import connection, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.proxy import context
from mitmproxy.test import taddons

from hubrewrite.mitmseams import certificates
from tests.support.certs import issue_server_cert, make_ca_and_server_cert, serial_of
from tests.unit.seamcheck import seam


def handshake(addon: tlsconfig.TlsConfig, options) -> list[int]:
    """A client's TLS handshake with what mitmproxy's tlsconfig sets up: the serials it is sent."""
    client = connection.Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 5000), timestamp_start=0)
    data = tls.TlsData(client, context.Context(client, options))
    addon.tls_start_client(data)
    server = data.ssl_conn
    peer = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    peer.set_connect_state()
    for _ in range(10):
        for a, b in ((peer, server), (server, peer)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return [c.to_cryptography().serial_number for c in peer.get_peer_cert_chain()]


def test_a_replaced_certificate_is_sent_to_new_handshakes_with_its_own_chain(tmp_path):
    first = make_ca_and_server_cert(tmp_path / "a")
    via_b = issue_server_cert(tmp_path / "b", tmp_path / "a", intermediate="B")
    via_c = issue_server_cert(tmp_path / "c", tmp_path / "a", intermediate="C")
    served = tmp_path / "mirror.pem"
    served.write_bytes(via_b["pem"].read_bytes())
    addon = tlsconfig.TlsConfig()
    with taddons.context(addon) as tctx, seam("certificates.certificate_entry, certificates.replace_certificate"):
        tctx.configure(addon, confdir=str(tmp_path / "confdir"), certs=[f"*={served}"])
        before = handshake(addon, tctx.options)
        pem = via_c["pem"].read_bytes()
        served.write_bytes(pem)  # the same path, as certbot's renewal leaves it
        entry = certificates.certificate_entry(pem, None, via_c["cert"])
        certificates.replace_certificate(certificates.mitmproxy_certstore(), "*", entry)
        after = handshake(addon, tctx.options)
        chain_b = [serial_of(c.encode()) for c in _pems(via_b["cert"])]
        chain_c = [serial_of(c.encode()) for c in _pems(via_c["cert"])]
        assert before == chain_b and after == chain_c  # leaf and intermediate, both renewed
        assert serial_of(first["cert"].read_bytes()) not in after


def _pems(path) -> list[str]:
    text = path.read_text()
    return [part + "-----END CERTIFICATE-----\n" for part in text.split("-----END CERTIFICATE-----\n") if part.strip()]


def test_the_certificate_store_is_where_tlsconfig_keeps_it(tmp_path):
    addon = tlsconfig.TlsConfig()
    with taddons.context(addon) as tctx, seam("certificates.mitmproxy_certstore"):
        tctx.configure(addon, confdir=str(tmp_path))
        assert certificates.mitmproxy_certstore() is addon.certstore


@pytest.mark.parametrize("broken", [b"", b"-----BEGIN CERTIFICATE-----\nMIIB", "half"])
def test_a_broken_file_is_refused_before_anything_is_replaced(tmp_path, broken):
    paths = make_ca_and_server_cert(tmp_path)
    pem = paths["pem"].read_bytes()
    if broken == "half":
        broken = pem[: len(pem) * 3 // 4]  # the certificate whole, the key cut
    other = make_ca_and_server_cert(tmp_path / "other")
    with seam("certificates.certificate_entry (ValueError for what mitmproxy's loaders refuse)"):
        with pytest.raises(ValueError):
            certificates.certificate_entry(broken, None, tmp_path / "chain.pem")
        with pytest.raises(ValueError, match="not the certificate's"):
            certificates.certificate_entry(paths["cert"].read_bytes() + other["key"].read_bytes(), None,
                                           tmp_path / "c.pem")
