"""Image references as docker normalises them: `busybox` is `docker.io/library/busybox:latest`.

The first path component is a registry when it has a `.` or a `:`, is `localhost`, or has an upper-case
letter (distribution/reference's rule); otherwise the name lives on Docker Hub, whose single-component
names sit under `library/`. `NAME@sha256:HEX` pins a manifest digest. Unlike podman, an unqualified name
never becomes `localhost/NAME`: `busybox:1` is always docker.io/library/busybox:1, wherever it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
# Docker Hub's name and the host its API answers on.
HUB_API = "registry-1.docker.io"
_HUB_ALIASES = ("index.docker.io",)

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class ReferenceError(ValueError):
    """A name that is not a valid image reference; the message is one line for the user."""


@dataclass(frozen=True)
class Reference:
    """An image reference split into registry, repository, tag and digest."""
    registry: str           # docker.io, quay.io, 127.0.0.1:5000, localhost
    repository: str         # library/busybox
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self):
        """registry/repository: what the store and auth files call the repository."""
        return f"{self.registry}/{self.repository}"

    def __str__(self):
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s

    @property
    def api_host(self):
        """The host:port the registry's /v2/ API answers on."""
        return HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def ref(self):
        """What a manifest is fetched by: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag):
        return Reference(self.registry, self.repository, tag, None)


def parse(text, default_tag=True):
    """Parse and normalise `text`; without tag or digest the tag is `latest` (unless default_tag=False)."""
    if not text or text != text.strip():
        raise ReferenceError(f"invalid reference format: {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise ReferenceError(f"invalid reference format: {text!r}: bad digest {digest!r}")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise ReferenceError(f"invalid reference format: {text!r}: bad tag {tag!r}")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        registry, path = first, remainder
        if not _DOMAIN_RE.fullmatch(registry):
            raise ReferenceError(f"invalid reference format: {text!r}: bad registry {registry!r}")
        if registry in _HUB_ALIASES:
            registry = DEFAULT_REGISTRY
    else:
        registry, path = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = "library/" + path
    if not path:
        raise ReferenceError(f"invalid reference format: {text!r}: no repository")
    if path.lower() != path:
        raise ReferenceError(f"invalid reference format: {text!r}: repository name must be lowercase")
    if not _PATH_RE.fullmatch(path) or len(registry) + 1 + len(path) > 255:
        raise ReferenceError(f"invalid reference format: {text!r}")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def familiar(name):
    """The short form docker prints: `busybox:1` for docker.io/library/busybox:1."""
    if name.startswith(DEFAULT_REGISTRY + "/"):
        name = name[len(DEFAULT_REGISTRY) + 1:]
        if name.startswith("library/") and "/" not in name[len("library/"):].split(":")[0].split("@")[0]:
            name = name[len("library/"):]
    return name


def is_loopback(registry):
    """Whether a registry host:port is on this machine (127.0.0.0/8, localhost, ::1): plain HTTP allowed."""
    host = registry
    if host.startswith("["):
        host = host[1:host.index("]")]
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host == "localhost" or host == "::1" or re.fullmatch(r"127(?:\.\d{1,3}){3}", host) is not None
