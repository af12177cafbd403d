"""The prefetch list: one image reference per line, with the platforms to keep warm.

    # comments and blank lines are ignored
    docker.io/library/nginx:1.27 linux/amd64,linux/arm64
    ghcr.io/owner/tool@sha256:<64 hex>
    alpine                                    # docker.io/library/alpine:latest, every platform

A reference names its registry as clients do (a first segment that looks like a
host), else the default registry with Docker Hub's ``library/`` rule
(``Registries.route``). A line the grammar refuses stops the mirror (one clear
line); a line naming a registry the table does not serve, or a repository the
allow/deny rules refuse, is kept as refused: never fetched, said once in the log
and shown on the status page.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import exceptions
from mitmproxy.proxy import mode_specs

from ..access.rules import RepositoryRules
from ..registry.errors import RegistryError
from ..registry.names import NAME_RE, TAG_RE, validate_digest
from ..registry.registries import Registries
from ..registry.upstream import Upstream

MAX_BYTES = 1 << 20  # a list of images, not a data set
MAX_IMAGES = 1000
_PLATFORM = re.compile(r"[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)?")


class PrefetchFileError(ValueError):
    pass


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""  # empty: any variant

    def matches(self, platform: object) -> bool:
        """Does an index entry's ``platform`` object name this platform?"""
        if not isinstance(platform, dict):
            return False
        return (platform.get("os") == self.os and platform.get("architecture") == self.architecture
                and (not self.variant or platform.get("variant") == self.variant))

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.architecture, self.variant)))


@dataclass(frozen=True)
class Image:
    """One line of the list: what to keep warm, and where."""

    text: str  # the reference as the line wrote it
    upstream: Upstream | None  # None: a registry the table does not serve
    repository: str  # as the upstream names it (as written, for a registry not served)
    reference: str  # tag or digest
    platforms: tuple[Platform, ...]  # empty: every platform of an index
    refused: str = ""  # why it is never fetched

    @property
    def name(self) -> str:
        registry = f"{self.upstream.name}/" if self.upstream else ""
        return f"{registry}{self.repository}{'@' if ':' in self.reference else ':'}{self.reference}"


@dataclass(frozen=True)
class PrefetchSettings:
    path: Path
    interval: int  # seconds between two checks
    images: tuple[Image, ...]

    @property
    def lock_name(self) -> str:
        """One lock per list: processes with another list do their own rounds."""
        names = "\n".join(image.name for image in self.images)
        return "prefetch-" + hashlib.sha256(names.encode()).hexdigest()[:16]


def prefetch_settings(path: str, interval: int, cache_dir: str, modes: Sequence[str], registries: Registries,
                      rules: RepositoryRules) -> PrefetchSettings | None:
    """hub_prefetch and hub_prefetch_interval, checked; a reverse listener's target is the
    default registry's API, as for its clients. Raises OptionsError."""
    if not path:
        return None
    if not cache_dir:
        raise exceptions.OptionsError("hub_prefetch keeps images in the cache: it needs hub_cache_dir")
    if interval < 1:
        raise exceptions.OptionsError("hub_prefetch_interval must be at least 1 second")
    reverse = [m for m in map(mode_specs.ProxyMode.parse, modes) if isinstance(m, mode_specs.ReverseMode)]
    if reverse:
        registries = registries.with_default(Upstream(reverse[0].scheme, *reverse[0].address))
    file = Path(path).expanduser()
    try:
        return PrefetchSettings(file, interval, read_list(file, registries, rules))
    except PrefetchFileError as e:
        raise exceptions.OptionsError(f"hub_prefetch: {e}") from None


def read_list(path: Path, registries: Registries, rules: RepositoryRules) -> tuple[Image, ...]:
    """Every image the file names. Raises PrefetchFileError (``path:line: what``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as e:
        raise PrefetchFileError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PrefetchFileError(f"{path}: not UTF-8 text") from e
    if len(data) > MAX_BYTES:
        raise PrefetchFileError(f"{path}: larger than {MAX_BYTES} bytes")
    images: dict[str, tuple[int, Image]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.partition("#")[0].split()
        if not fields:
            continue
        try:
            image = _image(fields, registries, rules)
        except PrefetchFileError as e:
            raise PrefetchFileError(f"{path}:{number}: {e}") from None
        if image.name in images:
            raise PrefetchFileError(f"{path}:{number}: {image.name} is listed on line {images[image.name][0]} too")
        images[image.name] = (number, image)
        if len(images) > MAX_IMAGES:
            raise PrefetchFileError(f"{path}: more than {MAX_IMAGES} images")
    return tuple(image for _, image in images.values())


def _image(fields: list[str], registries: Registries, rules: RepositoryRules) -> Image:
    if len(fields) > 2:
        raise PrefetchFileError(f"expected an image reference and at most a platform list, not {' '.join(fields)!r}")
    text = fields[0]
    name, reference = split_reference(text)
    platforms = parse_platforms(fields[1]) if len(fields) == 2 else ()
    try:
        routed = registries.route(None, name)
    except RegistryError as e:
        return Image(text, None, name, reference, platforms, refused=e.message)
    if not NAME_RE.fullmatch(routed.name):
        raise PrefetchFileError(f"{text!r}: {routed.name!r} is not a repository name")
    refused = "" if rules.permits(routed.upstream.name, routed.name) else "refused by hub_allow/hub_deny"
    return Image(text, routed.upstream, routed.name, reference, platforms, refused)


def split_reference(text: str) -> tuple[str, str]:
    """``name[:tag][@digest]`` -> (name, tag or digest); the tag defaults to ``latest``."""
    name, at, digest = text.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    if at:
        try:
            validate_digest(digest)
        except RegistryError as e:
            raise PrefetchFileError(f"{text!r}: {e.message}") from None
    elif tag and not TAG_RE.fullmatch(tag):
        raise PrefetchFileError(f"{text!r}: {tag!r} is not a valid tag")
    if not name or name != name.lower() or "//" in name or name.startswith("/") or name.endswith("/"):
        raise PrefetchFileError(f"{text!r} is not an image reference (lower-case [registry/]name[:tag][@digest])")
    return name, digest if at else (tag or "latest")


def parse_platforms(text: str) -> tuple[Platform, ...]:
    platforms = []
    for part in text.split(","):
        if not _PLATFORM.fullmatch(part):
            raise PrefetchFileError(f"{part!r} is not a platform (os/architecture[/variant], e.g. linux/arm64/v8)")
        platforms.append(Platform(*part.split("/")))
    return tuple(dict.fromkeys(platforms))
