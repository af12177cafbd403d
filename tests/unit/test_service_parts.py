"""The parts that make the mirror a service: JSON log lines, the check's arguments and report,
certificate renewal (its decisions; the handshakes are in tests/unit/test_mitmseams_certificates.py and
tests/integration/test_service.py)."""

from __future__ import annotations

import json
import logging
import os
import ssl

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from hubrewrite import certificates
from hubrewrite.addon import HubRewrite
from hubrewrite.check import ADDON, arguments, listener_line
from hubrewrite.observe.logformat import HUB_FIELDS, JsonLines
from hubrewrite.observe.logline import pull_fields, pull_log_line
from tests.support.certs import issue_server_cert, make_ca_and_server_cert
from tests.unit.test_addon import with_core_addons


def record(message: str, **extra) -> logging.LogRecord:
    r = logging.LogRecord("hub_rewrite", logging.INFO, __file__, 1, message, (), None)
    r.__dict__.update(extra)
    return r


def test_a_pull_line_and_its_json_object_hold_the_same_facts():
    facts = ("10.0.0.7", "https://registry-1.docker.io", "GET", "blob", "library/nginx", "sha256:" + "a" * 64,
             200, 29126484, 0.4123, "hit")
    line = JsonLines().format(record(pull_log_line(*facts), **{HUB_FIELDS: pull_fields(*facts)}))
    entry = json.loads(line)
    assert entry["message"] == pull_log_line(*facts)
    assert {k: entry[k] for k in ("event", "client", "method", "kind", "repository", "status", "bytes", "cache")} == {
        "event": "pull", "client": "10.0.0.7", "method": "GET", "kind": "blob", "repository": "library/nginx",
        "status": 200, "bytes": 29126484, "cache": "hit"}
    assert entry["seconds"] == 0.412 and entry["level"] == "info" and entry["time"].endswith("Z")
    assert "\n" not in line


def test_json_lines_keep_mitmproxys_client_and_an_exception_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        exc = sys.exc_info()
    r = record("\x1b[31mclient connect\x1b[0m", client=("10.0.0.7", 40000))
    r.exc_info = exc
    entry = json.loads(JsonLines().format(r))
    assert entry["message"] == "client connect" and entry["client"] == "10.0.0.7:40000"
    assert "ValueError: boom" in entry["error"]


def test_the_check_runs_mitmdump_with_the_services_arguments_and_no_listener(tmp_path):
    given = ["--mode", "reverse:https://registry-1.docker.io@5000", "--set", "hub_cache_dir=/var/cache/x"]
    args = arguments(given, str(tmp_path))
    assert args[:2] == ["-s", str(ADDON)] and args[2:6] == given
    assert args[6:] == ["--set", "server=false", "--set", "hub_check=true", "--set", f"confdir={tmp_path}"]
    named = ["-s", "/opt/hub-rewrite/addons/hub_rewrite.py", *given]
    assert arguments(named, "d")[: len(named)] == named  # the addon the service names, not a second copy


def test_listener_lines():
    assert listener_line("reverse:https://registry-1.docker.io@5000", "", None, True) == (
        "would listen at *:5000 (HTTP and HTTPS): reverse proxy to https://registry-1.docker.io")
    assert listener_line("regular@127.0.0.1:8080", "", None, False) == "would listen at 127.0.0.1:8080: forward proxy"


def test_check_mode_builds_nothing_and_reports(tmp_path):
    hub = HubRewrite()
    with taddons.context(*with_core_addons(hub)) as tctx:
        tctx.configure(hub, hub_config="", server=False, hub_check=True, hub_cache_dir=str(tmp_path / "cache"))
    assert hub.mirror.cache is None and not (tmp_path / "cache").exists()
    assert any(line.startswith(f"cache: {tmp_path / 'cache'} (new cache") for line in hub.check_report)


def test_check_mode_reports_a_refused_cache_as_one_error(tmp_path, caplog):
    (tmp_path / "hub-rewrite-cache.json").write_text('{"layout": 99}')
    hub = HubRewrite()
    with taddons.context(*with_core_addons(hub)) as tctx:
        tctx.configure(hub, hub_config="", server=False, hub_check=True, hub_cache_dir=str(tmp_path))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "layout 99" in errors[0] and errors[0].startswith("hub_rewrite: check: ")


def test_hub_check_without_the_check_command_says_how(caplog):
    """Typed on mitmdump's own command line, mitmproxy has opened its listeners before the addon loads."""
    hub = HubRewrite()
    with taddons.context(*with_core_addons(hub)) as tctx:
        tctx.configure(hub, hub_config="", hub_check=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["hub_rewrite: check: hub_check: run python -m hubrewrite.check with the same arguments "
                      "(it adds --set server=false, so that nothing listens)"]


# ---------------------------------------------------------------- certificate renewal


@pytest.fixture
def served(tmp_path):
    paths = make_ca_and_server_cert(tmp_path / "ca")
    served = tmp_path / "mirror.pem"
    served.write_bytes(paths["pem"].read_bytes())
    renewal = certificates.CertificateRenewal()
    renewal.use([f"*={served}"], "")
    yield served, renewal, tmp_path
    renewal.done()


def renew(served, ca_dir, name):
    fresh = issue_server_cert(ca_dir.parent / name, ca_dir)
    tmp = served.with_suffix(".new")
    tmp.write_bytes(fresh["pem"].read_bytes())
    os.replace(tmp, served)  # as certbot does
    return fresh


def test_a_renewed_file_gives_the_listener_a_new_context(served, caplog):
    caplog.set_level(logging.INFO)
    served_path, renewal, tmp = served
    first = renewal.current
    assert renewal.listener is not first and renewal.listener.sni_callback is not None
    renew(served_path, tmp / "ca", "renewed")
    renewal.check(force=True)
    assert renewal.current is not first
    assert any("renewed: serial" in r.getMessage() for r in caplog.records)


def test_a_broken_file_keeps_the_previous_certificate_with_one_line(served, caplog):
    served_path, renewal, tmp = served
    first = renewal.current
    served_path.write_bytes(served_path.read_bytes()[:300])  # half written
    for _ in range(3):
        renewal.check(force=True)
    assert renewal.current is first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be used" in warnings[0] and "previous one" in warnings[0]
    renew(served_path, tmp / "ca", "whole")
    renewal.check(force=True)
    assert renewal.current is not first


def test_new_connections_look_at_most_once_a_second(served, monkeypatch):
    served_path, renewal, tmp = served
    looks = []
    monkeypatch.setattr(certificates, "_signature", lambda path: looks.append(path) or None)
    renewal.checked_at = 0.0
    for _ in range(5):
        renewal.client_connected(None)
    assert len(looks) == 1


def test_an_unreadable_certificate_stops_the_start(tmp_path):
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(exceptions.OptionsError, match="bad.pem"):
        certificates.CertificateRenewal().use([f"{tmp_path / 'bad.pem'}"], "")
    assert isinstance(certificates.server_context(make_ca_and_server_cert(tmp_path / "ok")["pem"], None),
                      ssl.SSLContext)
