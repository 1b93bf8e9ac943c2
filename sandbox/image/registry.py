"""Push and pull with the OCI distribution API (anonymous, basic and bearer-token auth).

Everything a registry says is checked: manifests and blobs against the digest asked for (and
blobs against their size while they stream, so an endless or oversized answer stops at once),
``Docker-Content-Digest`` against the body, JSON answers against a size cap. A layer's foreign
``urls`` are never followed: every blob comes from the registry named in the reference.
Plain HTTP is used only for loopback registries; redirects (blob storage) may not downgrade to
HTTP and never carry our credentials to another host.

Credentials: ``SANDBOX_REGISTRY_USER`` and ``SANDBOX_REGISTRY_PASSWORD``, else the ``auths`` of
``~/.docker/config.json`` for the registry's host.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import ImageError
from ..imageref import Reference, parse_reference
from .oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    digest_of,
    docker_manifest,
    parse_manifest,
)
from .store import MAX_IMAGE_BYTES, Image, Store
from .tarstream import Budget

ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
MAX_JSON = 4 << 20
MAX_BLOB = Budget().max_bytes  # a compressed layer is never larger than its tar may be
MAX_REDIRECTS = 5
TIMEOUT = 60.0
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)')
Progress = Callable[[str], None]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate: Scheme key="value", ...`` -> (scheme lower-cased, params)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme.isalpha():
        raise ImageError(f"registry: malformed WWW-Authenticate header {header[:100]!r}")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            raise ImageError(f"registry: malformed WWW-Authenticate header {header[:100]!r}")
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return scheme.lower(), params


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (with or without a port)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def credentials(host: str) -> tuple[str, str] | None:
    """User and password for ``host``: environment first, then docker's config."""
    user, password = (
        os.environ.get("SANDBOX_REGISTRY_USER"),
        os.environ.get("SANDBOX_REGISTRY_PASSWORD"),
    )
    if user and password is not None:
        return user, password
    path = os.path.join(os.path.expanduser("~"), ".docker", "config.json")
    try:
        with open(path, "rb") as f:
            auths = json.loads(f.read(MAX_JSON)).get("auths", {})
        encoded = auths.get(host, {}).get("auth")
        if isinstance(encoded, str):
            name, _, secret = base64.b64decode(encoded).decode().partition(":")
            return name, secret
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    return None


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: http.client.HTTPResponse
    conn: http.client.HTTPConnection

    def read_json_bytes(self, limit: int = MAX_JSON) -> bytes:
        data = self.body.read(limit + 1)
        self.close()
        if len(data) > limit:
            raise ImageError(f"registry: answer larger than {limit} bytes")
        return data

    def close(self) -> None:
        self.conn.close()


@dataclass
class Client:
    """One registry host; remembers tokens per scope."""

    host: str
    creds: tuple[str, str] | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "http" if is_loopback(self.host) else "https"

    def _open(self, url: str) -> tuple[http.client.HTTPConnection, str, str]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ImageError(f"registry: refusing URL {url[:200]!r}")
        if parts.scheme == "http" and not is_loopback(parts.netloc):
            raise ImageError(f"registry: refusing plain HTTP to {parts.netloc} (not loopback)")
        conn_type = (
            http.client.HTTPConnection if parts.scheme == "http" else http.client.HTTPSConnection
        )
        conn = conn_type(parts.netloc, timeout=TIMEOUT)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return conn, path, parts.netloc

    def request(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str] | None = None,
        body: BinaryIO | bytes | None = None,
        length: int | None = None,
    ) -> _Response:
        """Send one request (with auth as the registry asks, following redirects)."""
        url = path if "://" in path else f"{self.scheme}://{self.host}{path}"
        for attempt in range(2):
            response = self._send(method, url, scope, dict(headers or {}), body, length)
            if response.status != 401 or attempt == 1:
                return response
            challenge = response.headers.get("www-authenticate", "")
            response.close()
            self._authenticate(challenge, scope)
            if hasattr(body, "seek"):
                body.seek(0)  # type: ignore[union-attr]
        raise ImageError(f"registry {self.host}: authentication failed")

    def _send(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str],
        body: BinaryIO | bytes | None,
        length: int | None,
    ) -> _Response:
        origin = None
        for _ in range(MAX_REDIRECTS + 1):
            conn, path, netloc = self._open(url)
            origin = origin or netloc
            send = dict(headers)
            if netloc == origin:  # credentials never go to a redirect's other host
                auth = self._auth_header(scope)
                if auth:
                    send["Authorization"] = auth
            if length is not None:
                send["Content-Length"] = str(length)
            elif body is None and method in ("PUT", "POST"):
                send["Content-Length"] = "0"
            try:
                conn.request(method, path, body=body, headers=send)
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise ImageError(
                    f"cannot reach registry {netloc}: {getattr(e, 'strerror', None) or e}",
                    hint="is the registry running, and is the name right?",
                ) from None
            response = _Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw, conn)
            if raw.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.headers.get("location", "")
                response.close()
                url = urllib.parse.urljoin(url, location)
                continue
            return response
        raise ImageError("registry: too many redirects")

    def _auth_header(self, scope: str) -> str | None:
        if scope in self.tokens:
            return self.tokens[scope]
        return self.tokens.get("*")

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge) if challenge else ("", {})
        if scheme == "basic":
            if self.creds is None:
                raise ImageError(
                    f"registry {self.host} needs a user and password",
                    hint="set SANDBOX_REGISTRY_USER and SANDBOX_REGISTRY_PASSWORD",
                )
            encoded = base64.b64encode(":".join(self.creds).encode()).decode()
            self.tokens["*"] = f"Basic {encoded}"
            return
        if scheme != "bearer" or "realm" not in params:
            raise ImageError(f"registry {self.host}: unsupported authentication {challenge[:80]!r}")
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        url = params["realm"] + "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        conn, path, _ = self._open(url)
        headers = {}
        if self.creds is not None:
            encoded = base64.b64encode(":".join(self.creds).encode()).decode()
            headers["Authorization"] = f"Basic {encoded}"
        try:
            conn.request("GET", path, headers=headers)
            raw = conn.getresponse()
            data = raw.read(MAX_JSON + 1)
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"cannot reach the token service of {self.host}: {e}") from None
        finally:
            conn.close()
        if raw.status != 200:
            raise ImageError(
                f"registry {self.host}: the token service refused ({raw.status})",
                hint="check SANDBOX_REGISTRY_USER and SANDBOX_REGISTRY_PASSWORD",
            )
        self.tokens[scope] = f"Bearer {parse_token(data)}"


def parse_token(data: bytes) -> str:
    """The token of a token service's JSON answer (``token`` or ``access_token``)."""
    if len(data) > MAX_JSON:
        raise ImageError("registry: token answer too large")
    try:
        doc = json.loads(data)
    except ValueError:
        raise ImageError("registry: the token answer is not JSON") from None
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise ImageError("registry: the token answer holds no token")
    return token


def error_detail(data: bytes) -> str:
    """``CODE message`` of a registry's error body (``{"errors": [...]}``), or empty."""
    try:
        first = json.loads(data)["errors"][0]
        text = f"{first.get('code', '')} {first.get('message', '')}".strip()
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return ""
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def registry_error(response: _Response, what: str) -> ImageError:
    """An ImageError with the registry's own error code and message when it sent one."""
    try:
        detail = error_detail(response.read_json_bytes(64 << 10))
    except ImageError:
        detail = ""
    return ImageError(
        f"registry: {what} failed with HTTP {response.status}" + (f": {detail}" if detail else "")
    )


def _remote(reference: str) -> Reference:
    ref = parse_reference(reference)
    if ref.registry is None:
        raise ImageError(
            f"{reference!r} names no registry",
            hint="use HOST[:PORT]/NAME[:TAG], e.g. 127.0.0.1:5000/judge/python:3",
        )
    return ref


def _client(ref: Reference) -> Client:
    host = ref.registry or ""
    return Client(host, credentials(host))


def _get_manifest(client: Client, ref: Reference, target: str, scope: str) -> tuple[bytes, str]:
    response = client.request(
        "GET", f"/v2/{ref.repository}/manifests/{target}", scope, {"Accept": ACCEPT}
    )
    if response.status == 404:
        response.close()
        raise ImageError(f"no image {ref} in registry {ref.registry}")
    if response.status != 200:
        raise registry_error(response, f"getting the manifest of {ref}")
    data = response.read_json_bytes(MAX_MANIFEST)
    digest = digest_of(data)
    expected = (
        target if target.startswith("sha256:") else response.headers.get("docker-content-digest")
    )
    if expected and expected != digest:
        raise ImageError(f"registry: manifest of {ref} does not match its digest {expected}")
    return data, response.headers.get("content-type", "").split(";")[0].strip()


def pull(reference: str, store: Store, progress: Progress) -> Image:
    """Pull ``reference`` into ``store`` (every blob verified) and tag it there."""
    ref = _remote(reference)
    client = _client(ref)
    scope = f"repository:{ref.repository}:pull"
    with store.using():
        data, media_type = _get_manifest(client, ref, ref.digest or ref.tag or "latest", scope)
        doc = parse_manifest(data, media_type or None)
        if isinstance(doc, Index):
            chosen = doc.select()
            data, media_type = _get_manifest(client, ref, chosen.digest, scope)
            doc = parse_manifest(data, media_type or None)
            if isinstance(doc, Index):
                raise ImageError("registry: an index inside an index is not supported")
        if sum(d.size for d in doc.layers) > MAX_IMAGE_BYTES:
            raise ImageError(f"image {ref}: its layers claim more than {MAX_IMAGE_BYTES} bytes")
        for descriptor in (doc.config, *doc.layers):
            if store.has_blob(descriptor.digest):
                continue
            if descriptor.size > MAX_BLOB:  # before a byte of it lands on the disk
                raise ImageError(f"blob {descriptor.digest} claims {descriptor.size} bytes")
            progress(f"pulling {descriptor.digest[:19]} ({descriptor.size / 1e6:.1f} MB)")
            response = client.request(
                "GET", f"/v2/{ref.repository}/blobs/{descriptor.digest}", scope
            )
            if response.status != 200:
                raise registry_error(response, f"getting blob {descriptor.digest}")
            try:
                store.put_stream(response.body, descriptor.digest, descriptor.size)
            finally:
                response.close()
        image = store.add_image(data)
        if ref.tag or not ref.digest:
            store.tag(str(ref.with_tag()).split("@")[0], image.digest)
    return image


def push(local: str, reference: str, store: Store, progress: Progress, docker: bool = False) -> str:
    """Push the stored image ``local`` as ``reference``; returns the manifest digest.

    ``docker``: push a Docker schema 2 manifest (for old clients) instead of the stored one.
    """
    ref = _remote(reference)
    if ref.digest:
        raise ImageError("push to a tag, not to a digest")
    client = _client(ref)
    scope = f"repository:{ref.repository}:pull,push"
    with store.using():
        image = store.image(local)
        for descriptor in (*image.manifest.layers, image.manifest.config):
            head = client.request("HEAD", f"/v2/{ref.repository}/blobs/{descriptor.digest}", scope)
            head.close()
            if head.status == 200:
                progress(f"exists  {descriptor.digest[:19]}")
                continue
            progress(f"pushing {descriptor.digest[:19]} ({descriptor.size / 1e6:.1f} MB)")
            start = client.request("POST", f"/v2/{ref.repository}/blobs/uploads/", scope)
            if start.status != 202 or "location" not in start.headers:
                raise registry_error(start, "starting a blob upload")
            start.close()
            location = urllib.parse.urljoin(
                f"{client.scheme}://{client.host}/", start.headers["location"]
            )
            if urllib.parse.urlsplit(location).netloc != client.host:
                raise ImageError(f"registry: upload location on another host: {location[:200]}")
            separator = "&" if "?" in location else "?"
            url = f"{location}{separator}digest={urllib.parse.quote(descriptor.digest)}"
            with open(store.blob_path(descriptor.digest), "rb") as blob:
                done = client.request(
                    "PUT",
                    url,
                    scope,
                    {"Content-Type": "application/octet-stream"},
                    blob,
                    descriptor.size,
                )
            if done.status != 201:
                raise registry_error(done, f"uploading blob {descriptor.digest}")
            done.close()
        manifest = store.read_blob(image.digest, MAX_MANIFEST)
        media_type, digest = image.manifest.media_type, image.digest
        if docker:
            manifest = docker_manifest(image.manifest)
            media_type, digest = DOCKER_MANIFEST, store.put_bytes(manifest)
        put = client.request(
            "PUT",
            f"/v2/{ref.repository}/manifests/{ref.tag or 'latest'}",
            scope,
            {"Content-Type": media_type},
            manifest,
            len(manifest),
        )
        if put.status != 201:
            raise registry_error(put, f"putting the manifest of {ref}")
        put.close()
        answered = put.headers.get("docker-content-digest")
        if answered and answered != digest:
            raise ImageError(f"registry: stored the manifest as {answered}, not {digest}")
    return digest


def list_tags(repository: str) -> list[str]:
    """Every tag of ``HOST/NAME`` (following ``Link`` pagination)."""
    ref = _remote(repository)
    client = _client(ref)
    scope = f"repository:{ref.repository}:pull"
    tags: list[str] = []
    path: str | None = f"/v2/{ref.repository}/tags/list"
    for _ in range(1000):
        if path is None:
            break
        response = client.request("GET", path, scope)
        if response.status == 404:
            response.close()
            raise ImageError(f"no repository {ref.name} in registry {ref.registry}")
        if response.status != 200:
            raise registry_error(response, f"listing the tags of {ref.name}")
        link = response.headers.get("link", "")
        tags += parse_tags(response.read_json_bytes())
        m = re.match(r"\s*<([^>]+)>", link)
        path = m.group(1) if m and m.group(1).startswith("/v2/") else None
    return tags


def parse_tags(data: bytes) -> list[str]:
    """The ``tags`` of a tags/list answer."""
    try:
        doc: Any = json.loads(data)
    except ValueError:
        raise ImageError("registry: the tag list is not JSON") from None
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ImageError("registry: the tag list is malformed")
    return tags
