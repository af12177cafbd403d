"""Docker Hub-like token service (auth.docker.io imitation).

Run:  python -m tests.support.token_server --key K --cert C --config users.json \
          --ready-file F [--port 0] [--log L] [--service S] [--issuer I] [--expires-in 300] \
          [--tls-cert CRT --tls-key KEY]

With ``--tls-cert``/``--tls-key`` it serves HTTPS only (HTTP/1.1 by ALPN), as
auth.docker.io does.

``--key``/``--cert`` are created (RSA 2048 + self-signed X.509) if missing;
distribution verifies tokens through the ``x5c`` header against that cert
(its ``auth.token.rootcertbundle``).

Endpoints
---------
``GET /token?service=&scope=(repeated, each may hold space-separated scopes)
&offline_token=true&client_id=&account=`` with optional ``Authorization: Basic``.

``POST /token`` form: ``grant_type=password`` (``username``, ``password``) or
``grant_type=refresh_token`` (``refresh_token``); ``client_id``,
``access_type=offline``, ``scope`` (space-joined), ``service``.

Responses: ``{"token", "access_token", "expires_in", "issued_at"[, "refresh_token"]}``,
Docker Hub's shape for GET and POST alike (it never answers ``scope``).  The log
record of an answer lists the sha256 of each secret it issued (``issued_sha256``:
the JWT's signature, the refresh token), so tests can tell whether one shows up
anywhere without the log holding it.  Bad credentials: 401 ``{"details": "incorrect
username or password"}``.  Scopes the caller may not have are silently left
out of the grant (200), like Docker Hub.

Fault injection (not part of Docker Hub; loopback clients only, never logged):
``POST /_token/fault?mode=status500|hang|close[&times=N][&seconds=S]`` makes the
next ``N`` (default 1; 0 = until cleared) ``/token`` requests answer 500
(``{"details": "internal server error"}``), hang (no answer until the client
goes away or ``seconds``, default 60, pass), or close the connection without
an answer; ``mode=none`` clears, ``GET /_token/fault`` reads the state.  The
log record of a faulted request has ``"fault": "<mode>"``.

Config JSON: ``{"users": {"name": "password"}, "acl": [rule, ...]}``; a rule is
``{"account": "*"|"name", "type": "repository"|"*", "name": glob,
"exclude": [glob...], "actions": [...]}`` (``"*"`` in actions = whatever was
asked).  ``account "*"`` matches everyone, anonymous included.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.common import (FaultSwitch, JsonLog, add_tls_args, auth_summary, fault_control,
                                  hang_until_disconnect, install_term_handler, is_loopback, serve, tls_from_args,
                                  watch_parent)

TOKEN_FAULT_MODES = frozenset({"status500", "hang", "close"})
DEFAULT_SERVICE = "registry.docker.io"
DEFAULT_ISSUER = "auth.docker.io"

DEFAULT_ACL: list[dict[str, Any]] = [
    # anonymous (and everyone): pull anything outside private/
    {"account": "*", "type": "repository", "name": "*", "exclude": ["private/*"], "actions": ["pull"]},
    {"account": "alice", "type": "repository", "name": "*", "actions": ["pull"]},
    {"account": "admin", "type": "*", "name": "*", "actions": ["*"]},
]


# ---------------------------------------------------------------- keys / JWT


def ensure_signing_cert(key_path: Path, cert_path: Path, common_name: str = "hub-rewrite test token signer") -> None:
    """Create an RSA key and a self-signed cert for it, unless both exist."""
    key_path, cert_path = Path(key_path), Path(cert_path)
    if key_path.exists() and cert_path.exists():
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtSigner:
    def __init__(self, key_path: Path, cert_path: Path):
        self.key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": self.x5c}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)


def issued_sha256(answer: dict[str, Any]) -> list[str]:
    """sha256 (hex) of the secrets in a token answer: the JWT's signature (what makes it usable)
    and the refresh token."""
    secrets_issued = [answer["token"].rsplit(".", 1)[1], answer.get("refresh_token")]
    return [hashlib.sha256(s.encode()).hexdigest() for s in secrets_issued if s]


def decode_jwt_unverified(token: str) -> tuple[dict, dict]:
    """(header, claims) of a JWT, without verification.  For tests."""
    def part(s: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    h, c, _ = token.split(".")
    return part(h), part(c)


# ---------------------------------------------------------------- scopes / ACL


def parse_scopes(values: list[str]) -> list[tuple[str, str, list[str]]]:
    """``repository:library/alpine:pull,push`` -> (type, name, actions).

    Each value may hold several space-separated scopes.  The resource type
    may carry a class (``repository(plugin)``); names never contain ':' after
    the type, but the action list is after the *last* ':'.
    """
    out = []
    for value in values:
        for item in value.split():
            if item.count(":") < 2:
                continue
            rtype, rest = item.split(":", 1)
            name, actions = rest.rsplit(":", 1)
            if "(" in rtype:
                rtype = rtype.split("(", 1)[0]
            acts = [a for a in actions.split(",") if a]
            out.append((rtype, name, acts))
    return out


class Acl:
    def __init__(self, rules: list[dict[str, Any]]):
        self.rules = rules

    def allowed(self, account: str | None, rtype: str, name: str, requested: list[str]) -> list[str]:
        granted: set[str] = set()
        for rule in self.rules:
            acc = rule.get("account", "*")
            if acc != "*" and acc != account:
                continue
            if rule.get("type", "*") not in ("*", rtype):
                continue
            if not fnmatch.fnmatchcase(name, rule.get("name", "*")):
                continue
            if any(fnmatch.fnmatchcase(name, ex) for ex in rule.get("exclude", [])):
                continue
            acts = rule.get("actions", [])
            if "*" in acts:
                granted.update(requested)
            else:
                granted.update(a for a in requested if a in acts)
        return [a for a in requested if a in granted]


# ---------------------------------------------------------------- server


class TokenService:
    def __init__(self, signer: JwtSigner, users: dict[str, str], acl: Acl, service: str, issuer: str,
                 expires_in: int, log: JsonLog):
        self.signer = signer
        self.users = users
        self.acl = acl
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.log = log
        self._refresh: dict[str, str] = {}  # refresh token -> account
        self._lock = threading.Lock()

    def check_password(self, username: str, password: str) -> bool:
        want = self.users.get(username)
        # compare anyway to keep timing uniform
        ok = hmac.compare_digest((want or "\0invalid").encode(), password.encode())
        return want is not None and ok

    def new_refresh_token(self, account: str) -> str:
        tok = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh[tok] = account
        return tok

    def account_for_refresh(self, tok: str) -> str | None:
        with self._lock:
            return self._refresh.get(tok)

    def issue(self, account: str | None, service: str, scopes: list[str]) -> tuple[str, list[dict], str]:
        access = []
        for rtype, name, acts in parse_scopes(scopes):
            granted = self.acl.allowed(account, rtype, name, acts)
            # Docker Hub keeps the entry with an empty action list when nothing is granted
            for entry in access:
                if entry["type"] == rtype and entry["name"] == name:
                    entry["actions"] = list(dict.fromkeys(entry["actions"] + granted))
                    break
            else:
                access.append({"type": rtype, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        issued_at = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return self.signer.sign(claims), access, issued_at


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as Docker Hub's servers and CDNs have it: with Nagle on, a body written
    # after its headers waits for a keep-alive client's delayed ACK (40 ms per answer)
    disable_nagle_algorithm = True
    server_version = "fake-auth.docker.io"
    timeout = 120
    svc: TokenService  # set on subclass
    faults: FaultSwitch  # set on subclass

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    # -- helpers
    def _send_json(self, status: int, obj: dict, extra_headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self, **rec: Any) -> None:
        self.svc.log.write({
            "method": self.command,
            "path": urlsplit(self.path).path,
            **auth_summary(self.headers.get("Authorization")),
            **rec,
        })

    def _basic_credentials(self) -> tuple[str, str] | None | bool:
        """None = no Basic auth, False = malformed, else (user, password)."""
        value = self.headers.get("Authorization")
        if not value:
            return None
        scheme, _, param = value.partition(" ")
        if scheme.lower() != "basic":
            return None  # e.g. a stray Bearer: treated as anonymous, like Hub
        try:
            user, _, pw = base64.b64decode(param.strip(), validate=True).decode().partition(":")
        except Exception:
            return False
        return user, pw

    # -- fault injection
    def _control(self) -> None:
        url = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= 1 << 20:
            self.rfile.read(n)
        elif n:
            self.close_connection = True
        if not is_loopback(self.client_address[0]):
            status, obj = 403, {"error": "control endpoint is loopback-only"}
        elif url.path == "/_token/fault":
            status, obj = fault_control(self.faults, self.command, url.query)
        else:
            status, obj = 404, {"error": "not found"}
        self._send_json(status, obj)

    def _fault(self) -> bool:
        """Apply an armed fault to this /token request; True if one was applied."""
        if urlsplit(self.path).path != "/token":
            return False
        fault = self.faults.take()
        if fault is None:
            return False
        mode = fault["mode"]
        if self.command == "POST":
            n = int(self.headers.get("Content-Length") or 0)
            if 0 < n <= 1 << 20:
                self.rfile.read(n)
            elif n:
                self.close_connection = True
        if mode == "status500":
            self._record(status=500, fault=mode)
            self._send_json(500, {"details": "internal server error"})
            return True
        self._record(status=None, fault=mode)
        if mode == "hang":
            hang_until_disconnect(self.connection, fault.get("seconds"))
        self.close_connection = True
        return True

    def do_GET(self) -> None:
        if self.path.startswith("/_token/"):
            self._control()
        elif not self._fault():
            self._get()

    def do_POST(self) -> None:
        if self.path.startswith("/_token/"):
            self._control()
        elif not self._fault():
            self._post()

    # -- GET /token
    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/token":
            self._record(status=404, query_keys=[])
            self._send_json(404, {"details": "not found"})
            return
        q = parse_qs(url.query, keep_blank_values=True)
        query_keys = sorted(q)
        service = q.get("service", [self.svc.service])[0]
        scopes = q.get("scope", [])
        creds = self._basic_credentials()
        account = None
        if creds is False or (creds and not self.svc.check_password(*creds)):
            self._record(status=401, query_keys=query_keys, account=None, scopes_requested=scopes)
            self._send_json(401, {"details": "incorrect username or password"})
            return
        if creds:
            account = creds[0]
        token, access, issued_at = self.svc.issue(account, service, scopes)
        resp = {"token": token, "access_token": token, "expires_in": self.svc.expires_in, "issued_at": issued_at}
        offline = q.get("offline_token", ["false"])[0].lower() == "true"
        if offline and account:
            resp["refresh_token"] = self.svc.new_refresh_token(account)
        self._record(status=200, query_keys=query_keys, account=account, service=service,
                     client_id=q.get("client_id", [None])[0], scopes_requested=scopes, access=access,
                     refresh_token_issued="refresh_token" in resp, issued_sha256=issued_sha256(resp))
        self._send_json(200, resp)

    # -- POST /token (OAuth2)
    def _post(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            self._record(status=413)
            self._send_json(413, {"error": "request too large"})
            self.close_connection = True
            return
        raw = self.rfile.read(length) if length else b""
        if url.path != "/token":
            self._record(status=404)
            self._send_json(404, {"details": "not found"})
            return
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        form_keys = sorted(form)
        f = {k: v[0] for k, v in form.items()}
        grant = f.get("grant_type", "")
        service = f.get("service", self.svc.service)
        scopes = [f["scope"]] if f.get("scope") else []
        base = dict(form_keys=form_keys, grant_type=grant, client_id=f.get("client_id"), service=service,
                    scopes_requested=scopes)
        if grant == "password":
            user, pw = f.get("username", ""), f.get("password", "")
            if not self.svc.check_password(user, pw):
                self._record(status=401, account=None, **base)
                self._send_json(401, {"details": "incorrect username or password"})
                return
            account = user
        elif grant == "refresh_token":
            account = self.svc.account_for_refresh(f.get("refresh_token", ""))
            if account is None:
                self._record(status=401, account=None, **base)
                self._send_json(401, {"error": "invalid_grant", "details": "invalid refresh token"})
                return
        else:
            self._record(status=400, account=None, **base)
            self._send_json(400, {"error": "unsupported_grant_type",
                                  "details": f"unsupported grant_type {grant!r}"})
            return
        token, access, issued_at = self.svc.issue(account, service, scopes)
        resp = {"token": token, "access_token": token, "expires_in": self.svc.expires_in, "issued_at": issued_at}
        if grant == "password" and f.get("access_type") == "offline":
            resp["refresh_token"] = self.svc.new_refresh_token(account)
        elif grant == "refresh_token":
            resp["refresh_token"] = f["refresh_token"]
        self._record(status=200, account=account, access=access,
                     refresh_token_issued="refresh_token" in resp and grant == "password",
                     issued_sha256=issued_sha256(resp), **base)
        self._send_json(200, resp)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--key", required=True, type=Path)
    ap.add_argument("--cert", required=True, type=Path)
    ap.add_argument("--config", type=Path, help="JSON with users and acl")
    ap.add_argument("--service", default=DEFAULT_SERVICE)
    ap.add_argument("--issuer", default=DEFAULT_ISSUER)
    ap.add_argument("--expires-in", type=int, default=300)
    ap.add_argument("--log", type=Path)
    ap.add_argument("--ready-file", type=Path)
    add_tls_args(ap)
    args = ap.parse_args(argv)

    install_term_handler()
    watch_parent()
    ensure_signing_cert(args.key, args.cert)
    users: dict[str, str] = {}
    acl = DEFAULT_ACL
    if args.config:
        cfg = json.loads(args.config.read_text())
        users = dict(cfg.get("users", {}))
        acl = cfg.get("acl") or DEFAULT_ACL
    svc = TokenService(JwtSigner(args.key, args.cert), users, Acl(acl), args.service, args.issuer,
                       args.expires_in, JsonLog(args.log))
    handler = type("BoundHandler", (Handler,), {"svc": svc, "faults": FaultSwitch(TOKEN_FAULT_MODES)})
    serve(handler, args.host, args.port, args.ready_file, "/token", tls=tls_from_args(args))


if __name__ == "__main__":
    main()
