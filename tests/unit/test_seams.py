"""hubrewrite/seams.py against the installed mitmproxy: each test fails loudly when an upgrade moves a seam.

The certificate seam is driven through mitmproxy's own tlsconfig addon and a
TLS handshake in memory (pyOpenSSL), as a client connecting to the mirror
would see it: the leaf and the chain it is sent.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from OpenSSL import SSL
from mitmproxy import connection, tls
from mitmproxy.addons import dumper, tlsconfig
from mitmproxy.addons.termlog import TermLogHandler
from mitmproxy.proxy import context
from mitmproxy.test import taddons, tflow

from hubrewrite import seams
from hubrewrite.observe.logformat import JsonLines
from tests.support.certs import issue_server_cert, make_ca_and_server_cert, serial_of


def test_the_terminal_log_takes_a_formatter_and_gives_it_back():
    out = io.StringIO()
    handler = TermLogHandler(out)
    handler.install()
    try:
        seams.set_termlog_formatter(JsonLines())
        logging.getLogger("hub_rewrite").warning("as json")
        seams.set_termlog_formatter(None)
        logging.getLogger("hub_rewrite").warning("as text")
    finally:
        handler.uninstall()
    json_line, text_line = out.getvalue().splitlines()[-2:]
    assert json.loads(json_line)["message"] == "as json"
    assert text_line.startswith("[") and text_line.endswith("] as text")


def test_mitmdumps_flow_lines_go_through_the_replacement_and_back():
    out = io.StringIO()
    printer = dumper.Dumper(out)
    with taddons.context(printer) as tctx:
        tctx.configure(printer, flow_detail=1)
        seams.replace_dumper_echo(lambda text: "R:" + text.strip())
        printer.response(tflow.tflow(resp=True))
        replaced = out.getvalue().splitlines()
        seams.replace_dumper_echo(None)
        printer.response(tflow.tflow(resp=True))
    assert replaced and all(line.startswith("R:") for line in replaced)
    assert "GET" in replaced[0] and "<< 200" in replaced[-1]
    restored = out.getvalue().splitlines()[len(replaced):]
    assert restored and not any(line.startswith("R:") for line in restored)


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
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(tmp_path / "confdir"), certs=[f"*={served}"])
        before = handshake(addon, tctx.options)
        pem = via_c["pem"].read_bytes()
        served.write_bytes(pem)  # the same path, as certbot's renewal leaves it
        entry = seams.certificate_entry(pem, None, via_c["cert"])
        seams.replace_certificate(seams.mitmproxy_certstore(), "*", entry)
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
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(tmp_path))
        assert seams.mitmproxy_certstore() is addon.certstore


@pytest.mark.parametrize("broken", [b"", b"-----BEGIN CERTIFICATE-----\nMIIB", "half"])
def test_a_broken_file_is_refused_before_anything_is_replaced(tmp_path, broken):
    paths = make_ca_and_server_cert(tmp_path)
    pem = paths["pem"].read_bytes()
    if broken == "half":
        broken = pem[: len(pem) * 3 // 4]  # the certificate whole, the key cut
    with pytest.raises(ValueError):
        seams.certificate_entry(broken, None, tmp_path / "chain.pem")
    other = make_ca_and_server_cert(tmp_path / "other")
    with pytest.raises(ValueError, match="not the certificate's"):
        seams.certificate_entry(paths["cert"].read_bytes() + other["key"].read_bytes(), None, tmp_path / "c.pem")
