"""Image references, OCI documents, build files and registry answers: parsed strictly."""

from __future__ import annotations

import json

import pytest

from sandbox.errors import ImageError
from sandbox.image.buildfile import parse_buildfile
from sandbox.image.oci import (
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    canonical_json,
    manifest_json,
    parse_config,
    parse_manifest,
    parse_user,
)
from sandbox.image.registry import is_loopback, parse_challenge, parse_tags, parse_token
from sandbox.imageref import parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,registry,repo,tag,digest", [
    ("python", None, "python", None, None),
    ("python:3.11", None, "python", "3.11", None),
    ("judge/py-min:v1", None, "judge/py-min", "v1", None),
    ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000", "a/b", "c", None),
    ("localhost/a", "localhost", "a", None, None),
    (f"reg.example.com/a@{D}", "reg.example.com", "a", None, D),
    (f"[::1]:5000/a:t@{D}", "[::1]:5000", "a", "t", D),
])
def test_good_references(text, registry, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize("text", [
    "", "UPPER", "a//b", "a:", "a:-tag", "a@sha256:short", "a@md5:" + "a" * 32, "-a", "a..b",
    "bad host!/a", "a:" + "t" * 200, "a b", "/a", "a/", "x" * 1000,
])
def test_bad_references(text):
    with pytest.raises(ImageError):
        parse_reference(text)


def manifest(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": D, "size": 10},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": D, "size": 5,
                    "urls": ["http://elsewhere.example/x"]}],
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_manifest_parses_and_ignores_foreign_urls():
    doc = parse_manifest(manifest())
    assert isinstance(doc, Manifest) and doc.layers[0].size == 5
    assert "urls" not in doc.layers[0].to_json()


@pytest.mark.parametrize("data", [
    b"[]", b"{", b"null", manifest(schemaVersion=1), manifest(mediaType="text/plain"),
    manifest(config={"mediaType": OCI_CONFIG, "digest": "sha256:x", "size": 1}),
    manifest(layers=[{"mediaType": OCI_LAYER_GZIP, "digest": D, "size": -1}]),
    manifest(layers=[{"mediaType": OCI_LAYER_GZIP, "digest": D, "size": True}]),
    manifest(layers=[{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                      "digest": D, "size": 1}]),
    manifest(layers=[{"mediaType": OCI_LAYER_GZIP, "digest": D, "size": 1}] * 129),
    b"{" * 100000,
])
def test_bad_manifests(data):
    with pytest.raises(ImageError):
        parse_manifest(data)


def test_index_selects_linux_amd64():
    index = parse_manifest(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": D, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": DOCKER_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 2,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode())
    assert isinstance(index, Index) and index.select().size == 2
    with pytest.raises(ImageError, match="linux/arm64"):
        index.select(arch="s390x")


def config(**run: object) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": run,
                       "rootfs": {"type": "layers", "diff_ids": [D]}}).encode()


def test_config_fields():
    c = parse_config(config(Env=["A=1", "B=x=y"], Cmd=["sh"], WorkingDir="/w", User="1000:1000",
                            Volumes={"/v": {}}, Labels={"k": "v"}))
    assert c.env == (("A", "1"), ("B", "x=y")) and c.cmd == ("sh",) and c.workdir == "/w"
    assert c.user == "1000:1000" and c.labels == (("k", "v"),) and c.diff_ids == (D,)


@pytest.mark.parametrize("run", [
    {"Env": ["NOEQUALS"]}, {"Env": "A=1"}, {"Cmd": "sh"}, {"Cmd": [1]}, {"WorkingDir": "rel"},
    {"User": "root; rm -rf /"}, {"User": "0:0:0"}, {"User": "../x"}, {"Labels": {"a": 1}},
])
def test_bad_config_fields(run):
    with pytest.raises(ImageError):
        parse_config(config(**run))


@pytest.mark.parametrize("user", ["", "0", "1000", "1000:1000", "nobody", "app:app", "_x.y-z"])
def test_user_strict_grammar(user):
    assert parse_user(user) == user


def test_written_manifest_is_canonical_and_round_trips():
    data = manifest_json(Descriptor(OCI_CONFIG, D, 10), [Descriptor(OCI_LAYER_GZIP, D, 5)])
    assert data == canonical_json(json.loads(data))
    doc = parse_manifest(data)
    assert isinstance(doc, Manifest) and doc.config.digest == D


def test_buildfile_grammar():
    text = """# comment
from scratch
BUNDLE --exclude=*/test /usr/bin/python3 \\
       /usr/lib/python3.11
COPY --chmod=755 a b /dst/
ENV A=1 B="two words"
ENV LEGACY value with spaces
LABEL org.example.x=y
WORKDIR /w
USER 1000:1000
RUN echo hi && \\
    # a comment inside a continued instruction
    echo there
CMD ["python3", "-c", "print(1)"]
ENTRYPOINT /bin/sh
"""
    ins = parse_buildfile(text, "Sandboxfile")
    kinds = [i.keyword for i in ins]
    assert kinds == ["FROM", "BUNDLE", "COPY", "ENV", "ENV", "LABEL", "WORKDIR", "USER", "RUN",
                     "CMD", "ENTRYPOINT"]
    assert ins[1].args == ("/usr/bin/python3", "/usr/lib/python3.11")
    assert ins[1].option("exclude") == ["*/test"] and ins[1].line == 3
    assert ins[2].option("chmod") == ["755"] and ins[2].args == ("a", "b", "/dst/")
    assert ins[3].args == ("A=1", "B=two words") and ins[4].args == ("LEGACY=value with spaces",)
    assert ins[8].args == ("/bin/sh", "-c", "echo hi &&  echo there") and ins[8].line == 11
    assert ins[9].args == ("python3", "-c", "print(1)")


@pytest.mark.parametrize("text,line,message", [
    ("", 1, "first instruction must be FROM"),
    ("RUN x\n", 1, "first instruction must be FROM"),
    ("FROM scratch\nFROM scratch\n", 2, "only one FROM"),
    ("FROM scratch\nEXPOSE 80\n", 2, "unknown instruction"),
    ("FROM Bad!Ref\n", 1, "FROM"),
    ("FROM scratch\nRUN [\"a\", 1]\n", 2, "JSON array"),
    ("FROM scratch\nRUN [not json\n", 2, "invalid JSON"),
    ("FROM scratch\nCOPY a\n", 2, "COPY"),
    ("FROM scratch\nCOPY --chmod=999 a b\n", 2, "octal"),
    ("FROM scratch\nCOPY --from=x a b\n", 2, "unknown option"),
    ("FROM scratch\nBUNDLE relative\n", 2, "absolute"),
    ("FROM scratch\nENV 1A=x\n", 2, "bad name"),
    ("FROM scratch\nENV A='unterminated\n", 2, "ENV"),
    ("FROM scratch\nUSER root;x\n", 2, "USER"),
    ("FROM scratch\nWORKDIR a b\n", 2, "exactly one"),
    ("FROM scratch\nRUN a \\", 2, "continuation"),
])
def test_buildfile_errors_name_file_and_line(text, line, message):
    with pytest.raises(ImageError, match=message) as info:
        parse_buildfile(text, "ctx/Sandboxfile")
    assert info.value.message.startswith(f"ctx/Sandboxfile:{line}:")


def test_buildfile_bytes_are_checked():
    for data in (b"\xff\xfe", b"FROM scratch\0", b"#" * (2 << 20)):
        with pytest.raises(ImageError):
            parse_buildfile(data, "f")


def test_registry_answers():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert scheme == "bearer" and params["scope"] == "repository:a/b:pull"
    assert parse_challenge('Basic realm="x \\"quoted\\""')[1]["realm"] == 'x "quoted"'
    for bad in ("", "Bearer realm", 'Bearer realm="unterminated', "B@d x=y"):
        with pytest.raises(ImageError):
            parse_challenge(bad) if bad else parse_challenge("9 x")
    assert parse_token(b'{"access_token": "abc"}') == "abc"
    for bad in (b"[]", b"{}", b'{"token": 5}', b'{"token": "a\\nb"}', b"nope"):
        with pytest.raises(ImageError):
            parse_token(bad)
    assert parse_tags(b'{"name": "a", "tags": ["1", "2"]}') == ["1", "2"]
    assert parse_tags(b'{"name": "a", "tags": null}') == []
    with pytest.raises(ImageError):
        parse_tags(b'{"tags": [1]}')
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5")
    assert not is_loopback("10.0.0.1:5000") and not is_loopback("registry.example.com")
