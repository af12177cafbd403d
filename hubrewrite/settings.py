"""The mirror's options: declared as a table, read once per change into a frozen ``Settings``.

mitmproxy style: the addon declares them in ``load()`` and turns them into
ready objects in ``configure()``, raising ``OptionsError`` for anything wrong.
Request paths read ``Settings``, never ``ctx.options``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import exceptions, optmanager
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import human

from .access.accounts import AccountsError, MirrorAccounts
from .access.credentials import CREDENTIALS_ENV_PREFIX, UpstreamCredentials, source_key
from .access.rules import PolicyError, RepositoryRules
from .cache.bucket_config import BucketConfig, BucketConfigError
from .clientconn import DEFAULT_PRIVATE_NETWORKS, PrivateNetworks, loopback_address, validate_public_url
from .config_file import DEFAULT_CONFIG
from .mitmseams import tools
from .prefetch.listfile import PrefetchSettings, prefetch_settings
from .registry import registries
from .registry.names import NAME_RE, REGISTRY_HOST_RE
from .registry.registries import DEFAULT_UPSTREAMS, Registries
from .sources import source_of


@dataclass(frozen=True)
class Option:
    name: str
    type: object
    default: object
    help: str
    choices: Sequence[str] | None = None


OPTIONS = (
    Option("hub_config", str, str(DEFAULT_CONFIG), """
        YAML file of options (same keys as --set) applied at startup.
        Precedence: defaults < this file < command line. Empty: none."""),
    Option("hub_public_url", str, "", """
        The mirror's URL as clients reach it (e.g. https://mirror.example.com); token realms in
        auth challenges point here. Empty: derived from each client's connection (TLS server
        name or local address and port)."""),
    Option("hub_official_prefix", str, "library", """
        Namespace of official images on the upstream: a one-segment name such as "nginx" becomes
        "library/nginx" in paths and token scopes. Empty: off."""),
    Option("hub_registry_name", str, "docker.io", """
        The default registry: requests that name no registry (by ?ns=, host name or path prefix)
        go to it, and the official-image prefix applies to it. In reverse mode the listener's
        target is its API."""),
    Option("hub_upstreams", Sequence[str], list(DEFAULT_UPSTREAMS), """
        The registries this mirror serves: "name" (API at https://name) or "name=URL[,URL...]" (e.g.
        docker.io=https://registry-1.docker.io,https://mirror.example.org: several URLs in order of
        preference, each with its own token service). Nothing outside this table is contacted on a
        client's behalf."""),
    Option("hub_source_backoff", int, 30, """
        Seconds a registry URL that failed (no connection, TLS, timeout, 429, 5xx) is skipped before
        it is tried again; doubled with each failure in a row, up to 8 times this."""),
    Option("hub_host_map", Sequence[str], [], """
        Client-facing host names that select a registry, as "host=registry" (e.g.
        ghcr.mirror.example=ghcr.io), matched against the request's Host header or TLS server name."""),
    Option("hub_proxy_passthrough", bool, True, """
        Forward-proxy (regular) mode: pass traffic for hosts outside hub_upstreams through
        untouched (TLS not intercepted), for clients in hub_private_networks (any client with
        proxyauth set). Off: refuse it for everyone."""),
    Option("hub_private_networks", Sequence[str], list(DEFAULT_PRIVATE_NETWORKS), """
        Client networks (CIDR, e.g. 10.0.0.0/8, fd00::/8) that forward-proxy pass-through is for.
        Default: loopback, RFC 1918, link-local and unique local addresses; not 6to4, Teredo or
        carrier-grade NAT (100.64.0.0/10), whose clients may be anyone. An IPv4-mapped IPv6
        client address is matched as its IPv4 address. Empty: no client is private."""),
    Option("hub_users_file", str, "", """
        Mirror accounts: htpasswd-style file of "user:hash" lines (bcrypt or argon2; python -m
        hubrewrite.access.accounts USER prints one). When set, /v2/ needs a token from the
        mirror's /token, which checks Basic credentials "user" /
        "password[:upstream-user:upstream-password]". Read again when it changes: a removed
        user or a changed password ends that user's tokens."""),
    Option("hub_allow", Sequence[str], [], """
        If set, only repositories matching one of these patterns on "registry/repository" are
        served (e.g. docker.io/library/*); others get DENIED."""),
    Option("hub_deny", Sequence[str], [],
           'Repositories matching any of these "registry/repository" patterns get DENIED.'),
    Option("hub_upstream_credentials", str, "", f"""
        File of the operator's upstream accounts, "<registry> <user> <password>" per line (also
        from {CREDENTIALS_ENV_PREFIX}<REGISTRY>=user:password in the environment, e.g.
        {CREDENTIALS_ENV_PREFIX}DOCKER_IO). Used for token requests of clients that bring no
        upstream credentials."""),
    Option("hub_allow_push", bool, False, """
        Pass PUT/POST/PATCH/DELETE under /v2/ to the upstream. Off: the mirror is read-only and
        answers them with 405 UNSUPPORTED."""),
    Option("hub_upstream_timeout", int, 30,
           "Seconds to wait for the upstream to connect or send data before answering 504."),
    Option("hub_max_buffered_body", int, 16 * 1024 * 1024, """
        Largest non-blob answer (manifest, tag list, token, error) the mirror buffers, in bytes;
        larger ones get 502. Blobs are always streamed."""),
    Option("hub_max_connections", int, 1000, """
        Client connections served at once on each port (the main one and the blob listener),
        also bounded by the open-file limit; more are closed at once (one log line per minute
        says how many)."""),
    Option("hub_head_timeout", int, 30, """
        Seconds a client may take to send a request head (and an idle connection may wait for
        the next one; on the blob listener, with the TLS handshake); then the connection is
        closed. Both ports."""),
    Option("hub_max_head_bytes", int, 65536, """
        Largest request head (request line and headers) read from a client, in bytes; a larger
        one is answered 431 and the connection closed. Both ports."""),
    Option("hub_cache_dir", str, "", """
        Directory of the pull-through cache (blobs and manifests, verified by digest; several
        mirror processes may share it). Empty: no cache."""),
    Option("hub_cache_max_size", str, "20g", """
        Size limit of cached blobs (e.g. 500m, 20g); least recently used blobs are evicted beyond
        it. 0: no limit."""),
    Option("hub_cache_max_files", int, 200_000, """
        Most files the cache keeps (a blob or a manifest is two, a tag or membership record
        one): beyond it the least recently used entries of any kind are removed. Bounds the
        inodes requests can make the mirror use (tiny blobs, records). 0: no limit."""),
    Option("hub_cache_stale", int, 3600, """
        Seconds for which cached content is still served while the upstream is unreachable or
        answers 429/5xx (marked with a Warning header)."""),
    Option("hub_cache_stale_grace", int, 0, """
        In stale mode, seconds an expired token still opens private content it was confirmed
        for. 0: an expired token opens nothing private; anonymous content stays available."""),
    Option("hub_cache_auth_ttl", int, 60, """
        Seconds a client's upstream-confirmed access to a repository is remembered when its
        token's lifetime cannot be read."""),
    Option("hub_fetch_ahead", bool, True, """
        With the cache: once a client got an image manifest, fetch its config and layers into the
        cache ahead of it, in parallel, with its own credentials (from registries that announce
        no pull rate limit, also an index's platform manifests); bounded in parallel downloads,
        bytes and per client. Off: only what clients ask for is fetched."""),
    Option("hub_prefetch", str, "", """
        File of images kept warm in the cache, "[registry/]name[:tag|@digest] [os/arch[/variant],...]"
        per line: pulled at start, checked every hub_prefetch_interval. Needs hub_cache_dir. Empty: none."""),
    Option("hub_prefetch_interval", int, 3600,
           "Seconds between two checks of the hub_prefetch images (tags with HEAD; new digests fetched)."),
    Option("hub_blob_listen", str, "", """
        host:port of the blob listener: cached blobs are answered with a 307 to a signed URL
        there, served with sendfile. Needs hub_cache_dir. Empty: blobs stream through mitmproxy."""),
    Option("hub_blob_url", str, "", """
        Base URL clients are redirected to for the blob listener (e.g. the https URL of a TLS
        terminator forwarding to it). Empty: the mirror's host as the client reached it, with
        the listener's port."""),
    Option("hub_blob_secret", str, "", """
        File holding the key that signs blob listener URLs. Empty: a key generated once in the
        cache directory (mirror processes sharing the cache share it)."""),
    Option("hub_side_flows", str, "auto", """
        Show the mirror's own upstream exchanges (token requests, blob probes, access and tag
        HEADs, downloads) as flows of their own, linked to the client flow they served, in
        mitmweb and saved flows. auto: on in mitmweb, off in mitmdump.""", ["auto", "on", "off"]),
    Option("hub_show_secrets", bool, False, """
        Show credentials (Authorization, passwords, tokens, signed URLs) in full in the log,
        mitmweb and saved flows, instead of fingerprints. For local debugging only."""),
    Option("hub_store_url", str, "", """
        A bucket shared by several mirror processes behind the local cache (hub_cache_dir, then
        the local tier): s3://bucket[/prefix]. Blobs, manifests, tag records and repository
        membership are kept there; the mirror's blob-URL and token key too. Empty: none."""),
    Option("hub_store_endpoint", str, "", """
        The S3-compatible server's URL (e.g. http://127.0.0.1:7480 for Ceph RGW, MinIO, R2).
        Empty: AWS S3."""),
    Option("hub_store_region", str, "", "The bucket's region. Empty: AWS_REGION, AWS_DEFAULT_REGION or us-east-1."),
    Option("hub_store_addressing", str, "auto", """
        S3 addressing: path (endpoint/bucket/key), virtual (bucket.endpoint/key) or auto.""",
           ["auto", "path", "virtual"]),
    Option("hub_store_credentials", str, "", """
        An INI file like ~/.aws/credentials with the bucket's keys. Empty: the AWS
        environment variables, AWS_PROFILE, ~/.aws or an instance role."""),
    Option("hub_store_presign", bool, False, """
        A blob in the bucket is answered with a 307 to a short-lived presigned URL of the
        object, so the object store (or a CDN in front of it) sends the bytes, not the mirror."""),
    Option("hub_metrics_listen", str, "", """
        Also serve the metrics on this loopback address (e.g. 127.0.0.1:9464), for a local
        Prometheus. Empty: only at /_hub/metrics on the mirror."""),
    Option("hub_metrics_auth", bool, False, """
        /_hub/metrics on the mirror needs a mirror account (Basic auth, hub_users_file). The
        loopback metrics listener is not affected."""),
    Option("hub_log_format", str, "text", """
        text: one line per pull step, as mitmdump prints. json: every line mitmdump prints as one
        JSON object (time, level, logger, message; a pull step's facts as fields), for journald
        or a log shipper; the same redaction.""", ["text", "json"]),
    Option("hub_check", bool, False, """
        Check the configuration and exit: validate every option (and mitm.conf), the certificate
        and the cache directory, print what the mirror would serve, exit 0 or 1. Set by python -m
        hubrewrite.check, which also keeps mitmproxy from listening (--set server=false)."""),
)


def declare(loader) -> None:
    for option in OPTIONS:
        loader.add_option(option.name, option.type, option.default, " ".join(option.help.split()), option.choices)


@dataclass(frozen=True)
class CacheSettings:
    directory: Path
    max_bytes: int
    max_files: int
    stale_seconds: int
    stale_grace: int
    auth_ttl: int
    blob_listen: tuple[str, int] | None
    blob_url: str
    blob_secret: Path | None
    store: BucketConfig | None  # the shared bucket behind the local tier
    presign: bool
    fetch_ahead: bool = True  # what a served manifest names, fetched ahead of its client


@dataclass(frozen=True)
class ClientSettings:
    """What the mirror's own HTTP client depends on: a change means a new client."""

    timeout: int
    max_body: int
    ssl_insecure: bool
    ca_file: str | None
    ca_dir: str | None


@dataclass(frozen=True)
class Limits:
    max_connections: int
    head_timeout: int
    max_head_bytes: int
    stall_timeout: int  # mitmproxy's tcp_timeout: how long the blob listener's client may leave its answer unread


@dataclass(frozen=True)
class Settings:
    public_url: str
    registries: Registries
    source_backoff: int  # seconds a failed registry URL is skipped (sources.py)
    proxy_passthrough: bool
    private_networks: PrivateNetworks  # clients the pass-through is for
    proxy_guarded: bool  # mitmproxy's proxyauth is set
    accounts: MirrorAccounts | None
    rules: RepositoryRules
    upstream_credentials: UpstreamCredentials
    allow_push: bool
    client: ClientSettings
    limits: Limits
    cache: CacheSettings | None
    metrics_listen: tuple[str, int] | None
    metrics_auth: bool
    show_secrets: bool
    side_flows: bool
    # something keeps flows for people to read (mitmweb, mitmproxy's console, save_stream_file/-w):
    # answers carrying credentials are then streamed, so that their record can be redacted
    records_flows: bool
    log_format: str  # "text" or "json"
    check: bool  # validate, print, exit: nothing served, nothing written
    prefetch: PrefetchSettings | None = None  # images kept warm (prefetch/)


def read_settings(o: optmanager.OptManager) -> Settings:
    """Every hub_* option (and the mitmproxy options the mirror depends on), checked."""
    _check_modes(o.mode)
    accounts = _accounts(o.hub_users_file)
    if o.hub_metrics_auth and accounts is None:
        raise exceptions.OptionsError("hub_metrics_auth needs mirror accounts (hub_users_file)")
    if o.hub_upstream_timeout < 1:
        raise exceptions.OptionsError("hub_upstream_timeout must be at least 1 second")
    if o.hub_max_buffered_body < 65536 or o.hub_source_backoff < 1:
        raise exceptions.OptionsError("hub_max_buffered_body must be at least 65536 bytes, hub_source_backoff 1 s")
    if o.hub_check and o.server:
        # mitmproxy opened its listeners before the addon loaded: this check would bind the ports
        raise exceptions.OptionsError("hub_check: run python -m hubrewrite.check with the same arguments "
                                      "(it adds --set server=false, so that nothing listens)")
    table, rules = _registries(o), _rules(o.hub_allow, o.hub_deny)
    return Settings(
        public_url=_public_url(o.hub_public_url),
        registries=table,
        source_backoff=o.hub_source_backoff,
        proxy_passthrough=o.hub_proxy_passthrough,
        private_networks=_private_networks(o.hub_private_networks),
        proxy_guarded=bool(getattr(o, "proxyauth", None)),
        accounts=accounts,
        rules=rules,
        upstream_credentials=_upstream_credentials(o.hub_upstream_credentials, table),
        allow_push=o.hub_allow_push,
        client=ClientSettings(o.hub_upstream_timeout, o.hub_max_buffered_body, o.ssl_insecure,
                              o.ssl_verify_upstream_trusted_ca, o.ssl_verify_upstream_trusted_confdir),
        limits=_limits(o),
        cache=_cache(o),
        metrics_listen=_loopback_option("hub_metrics_listen", o.hub_metrics_listen),
        metrics_auth=o.hub_metrics_auth,
        show_secrets=o.hub_show_secrets,
        # mitmweb is where flows are looked at
        side_flows=o.hub_side_flows == "on" or (o.hub_side_flows == "auto" and tools.is_mitmweb(o)),
        # mitmweb and the console keep every flow; any tool saves them with save_stream_file (mitmdump -w)
        records_flows=not o.hub_show_secrets and (tools.keeps_every_flow(o) or bool(getattr(o, "save_stream_file", None))),
        log_format=o.hub_log_format,
        check=o.hub_check,
        prefetch=prefetch_settings(o.hub_prefetch, o.hub_prefetch_interval, o.hub_cache_dir, o.mode, table, rules),
    )


def _check_modes(modes: Sequence[str]) -> None:
    """Only the modes whose every flow the addon sees and decides: reverse http(s) and regular.

    Others (socks5, transparent, wireguard, upstream, ...) would pass traffic the
    addon never classifies: an open proxy.
    """
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.RegularMode) or (
                isinstance(mode, mode_specs.ReverseMode) and mode.scheme in ("http", "https")):
            continue
        raise exceptions.OptionsError(
            f"hub_rewrite serves registries in reverse (http/https) or regular proxy mode, not {spec!r}"
        )


def _public_url(value: str) -> str:
    try:
        return validate_public_url(value) if value else ""
    except ValueError as e:
        raise exceptions.OptionsError(f"hub_public_url {value!r}: {e}") from e


def _registries(o: optmanager.OptManager) -> Registries:
    default = o.hub_registry_name.lower()
    if not REGISTRY_HOST_RE.fullmatch(default):
        raise exceptions.OptionsError(f"hub_registry_name {default!r} is not a registry host name")
    prefix = o.hub_official_prefix
    if prefix and not NAME_RE.fullmatch(prefix):
        raise exceptions.OptionsError(f"hub_official_prefix {prefix!r} is not a repository namespace")
    try:
        table = registries.parse_table(o.hub_upstreams)
        host_map = registries.parse_host_map(o.hub_host_map, set(table))
    except registries.TableError as e:
        raise exceptions.OptionsError(f"hub_upstreams/hub_host_map: {e}") from e
    return Registries(table, default, host_map, official_registry=default, official_prefix=prefix)


def _private_networks(specs: Sequence[str]) -> PrivateNetworks:
    try:
        return PrivateNetworks.parse(specs)
    except ValueError as e:
        raise exceptions.OptionsError(f"hub_private_networks: {e}") from e


def _accounts(path: str) -> MirrorAccounts | None:
    try:
        return MirrorAccounts.from_file(Path(path).expanduser()) if path else None
    except AccountsError as e:
        raise exceptions.OptionsError(f"hub_users_file: {e}") from e


def _rules(allow: Sequence[str], deny: Sequence[str]) -> RepositoryRules:
    try:
        return RepositoryRules.parse(allow, deny)
    except PolicyError as e:
        raise exceptions.OptionsError(f"hub_allow/hub_deny: {e}") from e


def _upstream_credentials(path: str, table: Registries) -> UpstreamCredentials:
    try:
        hosts = {source_key(source_of(u, base)) for u in table.table.values() for base in u.bases}
        return UpstreamCredentials.load(path, set(table.table) | {table.default} | hosts)
    except PolicyError as e:
        raise exceptions.OptionsError(f"hub_upstream_credentials: {e}") from e


def _limits(o: optmanager.OptManager) -> Limits:
    if o.hub_max_connections < 1 or o.hub_head_timeout < 1 or o.hub_max_head_bytes < 4096:
        raise exceptions.OptionsError(
            "hub_max_connections and hub_head_timeout must be at least 1, hub_max_head_bytes at least 4096"
        )
    return Limits(o.hub_max_connections, o.hub_head_timeout, o.hub_max_head_bytes, max(1, o.tcp_timeout))


def _cache(o: optmanager.OptManager) -> CacheSettings | None:
    if not o.hub_cache_dir:
        for option in ("hub_blob_listen", "hub_store_url"):
            if getattr(o, option):
                raise exceptions.OptionsError(f"{option} works with the cache: it needs hub_cache_dir")
        return None
    try:
        max_bytes = human.parse_size(o.hub_cache_max_size) or 0
    except ValueError as e:
        raise exceptions.OptionsError(f"hub_cache_max_size: {e}") from e
    if o.hub_cache_stale < 0 or o.hub_cache_stale_grace < 0 or o.hub_cache_auth_ttl < 1 or o.hub_cache_max_files < 0:
        raise exceptions.OptionsError(
            "hub_cache_stale, hub_cache_stale_grace and hub_cache_max_files must be >= 0, hub_cache_auth_ttl >= 1"
        )
    if o.hub_blob_url:
        try:
            validate_public_url(o.hub_blob_url)
        except ValueError as e:
            raise exceptions.OptionsError(f"hub_blob_url {o.hub_blob_url!r}: {e}") from e
    return CacheSettings(
        directory=Path(o.hub_cache_dir).expanduser(),
        max_bytes=max_bytes,
        max_files=o.hub_cache_max_files,
        stale_seconds=o.hub_cache_stale,
        stale_grace=o.hub_cache_stale_grace,
        auth_ttl=o.hub_cache_auth_ttl,
        blob_listen=_host_port("hub_blob_listen", o.hub_blob_listen) if o.hub_blob_listen else None,
        blob_url=o.hub_blob_url.rstrip("/"),
        blob_secret=Path(o.hub_blob_secret).expanduser() if o.hub_blob_secret else None,
        store=_store(o),
        presign=o.hub_store_presign,
        fetch_ahead=o.hub_fetch_ahead,
    )


def _store(o: optmanager.OptManager) -> BucketConfig | None:
    if not o.hub_store_url:
        if o.hub_store_presign:
            raise exceptions.OptionsError("hub_store_presign sends clients to the bucket: it needs hub_store_url")
        return None
    try:
        return BucketConfig.parse(o.hub_store_url, endpoint=o.hub_store_endpoint, region=o.hub_store_region,
                                  addressing=o.hub_store_addressing, credentials_file=o.hub_store_credentials)
    except BucketConfigError as e:
        raise exceptions.OptionsError(f"hub_store_url: {e}") from e


def _host_port(name: str, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise exceptions.OptionsError(f"{name} {value!r}: expected host:port, e.g. 0.0.0.0:5001")
    return host.strip("[]") or "0.0.0.0", int(port)


def _loopback_option(name: str, value: str) -> tuple[str, int] | None:
    if not value:
        return None
    try:
        return loopback_address(value)
    except ValueError as e:
        raise exceptions.OptionsError(f"{name} {value!r}: {e}") from e
