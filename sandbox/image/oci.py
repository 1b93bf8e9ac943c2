"""OCI and Docker schema 2 documents: descriptors, manifests, indexes and image configs.

Parsing is strict (these documents come from registries and archives of strangers): every field
is type-checked, digests must be ``sha256:``, sizes must be non-negative integers, a layer's
media type must be one this engine can unpack, and a layer's ``urls`` are never used. Writing
produces canonical JSON (sorted keys, no spaces), so the same image always has the same digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError
from ..imageref import check_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, DOCKER_LAYER)
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20
MAX_LAYERS = 128  # the overlay mount option must fit in a page of /proc/self/fd/N paths
_USER = re.compile(
    r"^(?:[0-9]{1,10}|[a-z_][a-z0-9_.-]{0,31})(?::(?:[0-9]{1,10}|[a-z_][a-z0-9_.-]{0,31}))?$"
)
_ENV = re.compile(r"^[^=\0]+=[^\0]*$")


def digest_of(data: bytes) -> str:
    """The ``sha256:`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: object) -> bytes:
    """The one JSON encoding this engine writes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Platform:
    """``os``/``architecture``[/``variant``] of a manifest in an index."""

    os: str
    architecture: str
    variant: str = ""


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: media type, digest and exact size."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The descriptor as an OCI JSON object."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Manifest:
    """One image: its config and its layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """A list of manifests, one per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, os_name: str = "linux", arch: str = "amd64") -> Descriptor:
        """The manifest for this platform, or ImageError naming the platforms there are."""
        for d in self.manifests:
            if d.platform and (d.platform.os, d.platform.architecture) == (os_name, arch):
                return d
        found = [f"{d.platform.os}/{d.platform.architecture}" for d in self.manifests if d.platform]
        raise ImageError(f"no {os_name}/{arch} image in the index (it has: {found or 'none'})")


@dataclass(frozen=True)
class ImageConfig:
    """What an image's config says about running it, and its layers' diff ids."""

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str = ""
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    history: tuple[dict[str, Any], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The config as an OCI image config object (no timestamps: builds are reproducible)."""
        config: dict[str, Any] = {}
        if self.env:
            config["Env"] = [f"{k}={v}" for k, v in self.env]
        if self.entrypoint is not None:
            config["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            config["Cmd"] = list(self.cmd)
        if self.workdir:
            config["WorkingDir"] = self.workdir
        if self.user:
            config["User"] = self.user
        if self.labels:
            config["Labels"] = dict(self.labels)
        return {
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": list(self.diff_ids)},
            "history": list(self.history),
        }


def _load(data: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(data) > limit:
        raise ImageError(f"{what} is larger than {limit} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ImageError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


def _get(obj: dict[str, Any], key: str, kind: type, what: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is ...:
            raise ImageError(f"{what}: {key} is missing")
        return default
    value = obj[key]
    if value is None and default is not ...:
        return default
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ImageError(f"{what}: {key} must be a {kind.__name__}")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise ImageError(f"{what} must be a list of strings")
    return tuple(value)


def _string_map(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ImageError(f"{what} must map strings to strings")
    return tuple(sorted(value.items()))


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    """A descriptor object; ``urls`` are ignored (never followed)."""
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not an object")
    size = _get(obj, "size", int, what)
    if size < 0:
        raise ImageError(f"{what}: size is negative")
    platform = None
    if "platform" in obj:
        p = _get(obj, "platform", dict, what)
        platform = Platform(
            _get(p, "os", str, f"{what}.platform"),
            _get(p, "architecture", str, f"{what}.platform"),
            _get(p, "variant", str, f"{what}.platform", ""),
        )
    return Descriptor(
        media_type=_get(obj, "mediaType", str, what),
        digest=check_digest(_get(obj, "digest", str, what), f"{what} digest"),
        size=size,
        platform=platform,
        annotations=_string_map(obj.get("annotations") or {}, f"{what}.annotations"),
    )


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """An image manifest or an index, in OCI or Docker schema 2 form."""
    obj = _load(data, MAX_MANIFEST, "manifest")
    if _get(obj, "schemaVersion", int, "manifest") != 2:
        raise ImageError("manifest: schemaVersion must be 2 (schema 1 is not supported)")
    kind = obj.get("mediaType") or media_type
    if kind is None:  # OCI allows leaving it out: tell by the content
        kind = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    if kind in INDEX_TYPES:
        items = _get(obj, "manifests", list, "index")
        return Index(
            kind, tuple(parse_descriptor(d, f"index.manifests[{i}]") for i, d in enumerate(items))
        )
    if kind not in MANIFEST_TYPES:
        raise ImageError(f"manifest: unsupported media type {str(kind)[:100]!r}")
    config = parse_descriptor(_get(obj, "config", dict, "manifest"), "manifest.config")
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(f"manifest.config: unsupported media type {config.media_type[:100]!r}")
    layers = tuple(
        parse_descriptor(d, f"manifest.layers[{i}]")
        for i, d in enumerate(_get(obj, "layers", list, "manifest"))
    )
    if len(layers) > MAX_LAYERS:
        raise ImageError(f"manifest: more than {MAX_LAYERS} layers")
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(
                f"manifest.layers[{i}]: unsupported layer type {layer.media_type[:100]!r}",
                hint="foreign and non-distributable layers are refused; zstd is not supported",
            )
    return Manifest(kind, config, layers)


def parse_user(text: str) -> str:
    """An image's ``User``: ``uid``, ``name``, ``uid:gid`` or ``name:group``, nothing else.

    It is recorded, never obeyed: a box always runs as its profile's uid.
    """
    if text and not _USER.match(text):
        raise ImageError(f"image config: User {text[:60]!r} is not NAME, UID or UID:GID")
    return text


def parse_config(data: bytes) -> ImageConfig:
    """An image config (OCI or Docker); ``Volumes``, ``ExposedPorts`` and the like are ignored."""
    obj = _load(data, MAX_CONFIG, "image config")
    rootfs = _get(obj, "rootfs", dict, "image config")
    if rootfs.get("type") != "layers":
        raise ImageError("image config: rootfs.type must be 'layers'")
    diff_ids = tuple(
        check_digest(d, "image config diff id") if isinstance(d, str) else check_digest("", "")
        for d in _get(rootfs, "diff_ids", list, "image config rootfs")
    )
    run = _get(obj, "config", dict, "image config", {})
    env = []
    for item in _strings(run.get("Env") or [], "image config: Env"):
        if not _ENV.match(item):
            raise ImageError(f"image config: Env entry {item[:60]!r} is not NAME=value")
        name, _, value = item.partition("=")
        env.append((name, value))
    workdir = _get(run, "WorkingDir", str, "image config", "")
    if workdir and (not workdir.startswith("/") or "\0" in workdir):
        raise ImageError("image config: WorkingDir must be an absolute path")
    history = _get(obj, "history", list, "image config", [])
    return ImageConfig(
        architecture=_get(obj, "architecture", str, "image config"),
        os=_get(obj, "os", str, "image config"),
        diff_ids=diff_ids,
        env=tuple(env),
        entrypoint=_strings(run["Entrypoint"], "image config: Entrypoint")
        if run.get("Entrypoint") is not None
        else None,
        cmd=_strings(run["Cmd"], "image config: Cmd") if run.get("Cmd") is not None else None,
        workdir=workdir,
        user=parse_user(_get(run, "User", str, "image config", "")),
        labels=_string_map(run.get("Labels") or {}, "image config: Labels"),
        history=tuple(h for h in history if isinstance(h, dict)),
    )


def manifest_json(
    config: Descriptor, layers: list[Descriptor], media_type: str = OCI_MANIFEST
) -> bytes:
    """A canonical image manifest."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.to_json(),
            "layers": [d.to_json() for d in layers],
        }
    )


def docker_manifest(manifest: Manifest) -> bytes:
    """The same image as a canonical Docker schema 2 manifest (same blobs, new digest).

    Docker schema 2 has no uncompressed layer type, so only gzip layers convert.
    """
    layers = []
    for layer in manifest.layers:
        if layer.media_type not in (OCI_LAYER_GZIP, DOCKER_LAYER):
            raise ImageError(
                f"layer {layer.digest} is not gzip-compressed: Docker schema 2 cannot name it",
                hint="push it as OCI (the default)",
            )
        layers.append(Descriptor(DOCKER_LAYER, layer.digest, layer.size))
    config = Descriptor(DOCKER_CONFIG, manifest.config.digest, manifest.config.size)
    return manifest_json(config, layers, DOCKER_MANIFEST)
