"""Where the shared cache's bucket is and how to sign in to it, from the mirror's options.

    config = BucketConfig.parse("s3://mirror-cache/hub", endpoint="http://127.0.0.1:7480",
                                region="", addressing="auto", credentials_file="")

URL: ``s3://<bucket>[/<prefix>]``.  Every object the mirror writes lives
under the prefix, so several mirrors (or other data) can share one bucket.

Endpoint: empty for AWS itself, else ``http(s)://host[:port]`` of any
S3-compatible server (Ceph RGW, MinIO, R2, ...).  Region: the option, else
``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``us-east-1`` (what most
S3-compatible servers expect in the SigV4 scope).  Addressing:
``path`` (``endpoint/bucket/key``), ``virtual`` (``bucket.endpoint/key``) or
``auto`` (botocore's choice: virtual on AWS, path on a custom endpoint).

Credentials, first match wins:

1. ``credentials_file``: an INI file in the format of ``~/.aws/credentials``;
   the section named by ``AWS_PROFILE``, else ``[default]``, must hold
   ``aws_access_key_id`` and ``aws_secret_access_key`` (and may hold
   ``aws_session_token``).  Read once here, so a mistake is reported when the
   mirror starts, not at the first cache miss.
2. ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``).
3. ``AWS_SHARED_CREDENTIALS_FILE``: read like 1.
4. ``AWS_PROFILE``: that profile, resolved by boto3 (``~/.aws/credentials``,
   ``~/.aws/config``, SSO, ...).
5. Nothing set: boto3's default chain (``~/.aws`` files, then container or
   instance roles).

No secret ever appears in a repr, a str or an error message.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_REGION = "us-east-1"
ADDRESSING_STYLES = ("auto", "path", "virtual")

# S3's bucket naming rules, minus the legacy ones (uppercase, underscores) that
# virtual-host addressing cannot carry
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_REGION = re.compile(r"^[a-z0-9-]{1,64}$")


class BucketConfigError(ValueError):
    """A bad store URL or option; the message names the problem, never a secret."""


@dataclass(frozen=True)
class BucketConfig:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing slash)
    endpoint_url: str | None  # None: AWS
    region: str
    addressing_style: str
    # where the credentials come from, for logs: "credentials file /etc/...", "environment", ...
    credentials_source: str
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None  # a boto3 profile, when the keys are not given here

    def __str__(self) -> str:
        where = self.endpoint_url or "AWS"
        path = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return f"s3://{path} at {where} ({self.region}, {self.addressing_style} addressing, {self.credentials_source})"

    @classmethod
    def parse(cls, url: str, *, endpoint: str = "", region: str = "", addressing: str = "auto",
              credentials_file: str = "", environ: Mapping[str, str] | None = None) -> BucketConfig:
        """Check and combine the options; ``environ`` defaults to ``os.environ``."""
        env = os.environ if environ is None else environ
        bucket, prefix = _parse_url(url)
        addressing = (addressing or "auto").strip().lower()
        if addressing not in ADDRESSING_STYLES:
            raise BucketConfigError(f"addressing style must be one of {', '.join(ADDRESSING_STYLES)}, not {addressing!r}")
        region = (region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION).strip()
        if not _REGION.match(region):
            raise BucketConfigError(f"region {region!r} is not a region name (like us-east-1)")
        credentials = _credentials(credentials_file, env)
        return cls(bucket=bucket, prefix=prefix, endpoint_url=_parse_endpoint(endpoint), region=region,
                   addressing_style=addressing, **credentials)


def _parse_url(url: str) -> tuple[str, str]:
    url = (url or "").strip()
    if not url.startswith("s3://"):
        raise BucketConfigError("the store URL must look like s3://bucket or s3://bucket/prefix")
    rest = url[len("s3://"):]
    if "@" in rest:
        # never echo it: the part before @ would be credentials (a secret key may hold '/')
        raise BucketConfigError("the store URL must not carry credentials; use the credentials file or environment")
    if "?" in rest or "#" in rest:
        raise BucketConfigError("the store URL takes no query or fragment: s3://bucket[/prefix]")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket or _is_ip(bucket):
        # echo only harmless characters: "s3://key:secret/..." must not end up in a log
        shown = repr(bucket) if _PREFIX_SEGMENT.match(bucket) else "the bucket name"
        raise BucketConfigError(
            f"{shown} is not a valid bucket name (3-63 characters: lowercase letters, digits, '.' and '-')")
    segments = [s for s in prefix.split("/") if s]
    for s in segments:
        if s in (".", "..") or not _PREFIX_SEGMENT.match(s):
            raise BucketConfigError(
                f"prefix segment {s!r} is not allowed (letters, digits, '.', '_' and '-'; no '.' or '..')")
    return bucket, "/".join(segments)


def _parse_endpoint(endpoint: str) -> str | None:
    endpoint = (endpoint or "").strip()
    if not endpoint:
        return None
    if "@" in endpoint:  # before parsing: a secret key may hold '/', which would split it oddly
        raise BucketConfigError("the S3 endpoint must not carry credentials; use the credentials file or environment")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise BucketConfigError("the S3 endpoint is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BucketConfigError("the S3 endpoint must look like https://host[:port] or http://host[:port]")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise BucketConfigError("the S3 endpoint takes no path, query or fragment: put the bucket in the store URL")
    return f"{parts.scheme}://{parts.netloc}"


def _credentials(credentials_file: str, env: Mapping[str, str]) -> dict[str, str | None]:
    profile = env.get("AWS_PROFILE") or None
    if credentials_file:
        return _credentials_from_file(credentials_file, profile)
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if access or secret:
        if not (access and secret):
            raise BucketConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together")
        return {"access_key": access, "secret_key": secret, "session_token": env.get("AWS_SESSION_TOKEN") or None,
                "credentials_source": "environment"}
    if env.get("AWS_SHARED_CREDENTIALS_FILE"):
        return _credentials_from_file(env["AWS_SHARED_CREDENTIALS_FILE"], profile)
    if profile:
        return {"profile": profile, "credentials_source": f"profile {profile}"}
    return {"credentials_source": "boto3 default chain"}


def _credentials_from_file(path: str, profile: str | None) -> dict[str, str | None]:
    section = profile or "default"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise BucketConfigError(f"cannot read the credentials file {path}: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError):
        # the parser's messages quote lines of the file: keep them out
        raise BucketConfigError(f"the credentials file {path} is not an INI file like ~/.aws/credentials") from None
    if not parser.has_section(section):
        raise BucketConfigError(f"the credentials file {path} has no [{section}] section")
    values = parser[section]
    access, secret = values.get("aws_access_key_id", "").strip(), values.get("aws_secret_access_key", "").strip()
    if not (access and secret):
        raise BucketConfigError(
            f"[{section}] in {path} needs both aws_access_key_id and aws_secret_access_key")
    return {"access_key": access, "secret_key": secret,
            "session_token": values.get("aws_session_token", "").strip() or None,
            "credentials_source": f"credentials file {path} [{section}]"}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
