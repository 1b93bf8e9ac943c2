"""Push and pull against a real registry (Debian's docker-registry), and interop with skopeo
and umoci. The registry runs on 127.0.0.1 with its storage in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SANDBOX, run_cli
from registry_server import PASSWORD, USER, Registry, missing_tools
from test_images import SHELL_IMAGE, build, write_context

import sandbox
from sandbox import Verdict

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    context = write_context(tmp_path_factory.mktemp("ctx"), SHELL_IMAGE, {"greeting.txt": "hi\n"})
    build(context, "test/reg:1")
    return "test/reg:1"


@pytest.fixture(scope="module", params=["none", "basic", "token"])
def registry(request, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = Registry(tmp_path_factory.mktemp(f"registry-{request.param}"), request.param)
    yield server
    server.stop()


def creds_env(registry: Registry) -> dict[str, str]:
    env = dict(os.environ)
    if registry.auth != "none":
        env |= {"SANDBOX_REGISTRY_USER": USER, "SANDBOX_REGISTRY_PASSWORD": PASSWORD}
    return env


def fresh_store(tmp_path: Path, registry: Registry) -> dict[str, str]:
    return creds_env(registry) | {"SANDBOX_HOME": str(tmp_path / "store")}


def test_push_then_pull_into_an_empty_store_and_run(image, registry, tmp_path):
    target = f"{registry.host}/judge/shell:v1"
    pushed = run_cli("image", "push", image, target, env=creds_env(registry))
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip().decode()
    tags = run_cli("image", "tags", f"{registry.host}/judge/shell", env=creds_env(registry))
    assert tags.stdout == b"v1\n", tags.stderr
    env = fresh_store(tmp_path, registry)
    pulled = run_cli("image", "pull", target, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().decode() == digest
    result = run_cli("exec", "--image", target, env=env)
    assert result.stdout == b"hello from the image\nhi\n/data\n", result.stderr
    by_digest = run_cli("image", "pull", f"{registry.host}/judge/shell@{digest}", env=env)
    assert by_digest.returncode == 0, by_digest.stderr
    if registry.tokens is not None:
        assert registry.tokens.requests > 0


def test_wrong_or_missing_credentials_are_refused(image, registry, tmp_path):
    if registry.auth == "none":
        pytest.skip("anonymous registry")
    env = dict(os.environ) | {"SANDBOX_HOME": str(tmp_path / "s"), "HOME": str(tmp_path)}
    env.pop("SANDBOX_REGISTRY_USER", None)
    result = run_cli("image", "pull", f"{registry.host}/judge/shell:v1", env=env)
    assert result.returncode == 125 and b"Traceback" not in result.stderr
    env |= {"SANDBOX_REGISTRY_USER": USER, "SANDBOX_REGISTRY_PASSWORD": "wrong"}
    result = run_cli("image", "push", image, f"{registry.host}/judge/shell:v2", env=env)
    assert result.returncode == 125 and b"Traceback" not in result.stderr


def skopeo_creds(registry: Registry) -> list[str]:
    return [] if registry.auth == "none" else [f"--creds={USER}:{PASSWORD}"]


def test_skopeo_reads_what_we_push(image, registry, tmp_path):
    target = f"{registry.host}/interop/ours:1"
    assert run_cli("image", "push", image, target, env=creds_env(registry)).returncode == 0
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", *skopeo_creds(registry),
                              f"docker://{target}"], capture_output=True, check=True)
    doc = json.loads(inspect.stdout)
    assert doc["Env"][0].startswith("GREETING=") and len(doc["Layers"]) == 3
    out = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", *[
        c.replace("--creds", "--src-creds") for c in skopeo_creds(registry)],
        f"docker://{target}", f"oci:{out}:ours"], check=True, capture_output=True)
    unpacked = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{out}:ours", str(unpacked)],
                   check=True, capture_output=True)
    rootfs = unpacked / "rootfs"
    assert (rootfs / "made" / "by-run").read_text() == "built\n"
    assert not (rootfs / "usr" / "bin" / "rm").exists()  # our whiteout, applied by umoci


def test_we_pull_and_run_what_skopeo_pushes(image, registry, tmp_path):
    layout = tmp_path / "layout"
    assert run_cli("image", "save", "-o", str(layout), image).returncode == 0
    index = json.loads((layout / "index.json").read_text())
    name = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    # skopeo re-compresses the layers, so the registry gets blobs we never made
    target = f"{registry.host}/interop/theirs:2"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-compress",
                    "--dest-compress-format=gzip", "--dest-compress-level=1",
                    "--format=v2s2", *[c.replace("--creds", "--dest-creds")
                                       for c in skopeo_creds(registry)],
                    f"oci:{layout}:{name}", f"docker://{target}"], check=True,
                   capture_output=True)
    env = fresh_store(tmp_path, registry)
    pulled = run_cli("image", "pull", target, env=env)
    assert pulled.returncode == 0, pulled.stderr
    inspect = json.loads(run_cli("image", "inspect", target, env=env).stdout)
    assert inspect["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    report = run_cli("exec", "--image", target, env=env)
    assert report.stdout == b"hello from the image\nhi\n/data\n", report.stderr


def test_umoci_image_loads_and_runs(tmp_path):
    """An OCI layout made and changed by umoci (its own layer and config) loads and runs."""
    layout = tmp_path / "umoci-layout"
    assert run_cli("image", "save", "-o", str(layout), "test/reg:1").returncode == 0
    index = json.loads((layout / "index.json").read_text())
    name = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{name}", str(bundle)],
                   check=True, capture_output=True)
    (bundle / "rootfs" / "data" / "added-by-umoci").write_text("umoci\n")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:umoci", str(bundle)], check=True,
                   capture_output=True)
    subprocess.run(["umoci", "config", "--image", f"{layout}:umoci", "--config.env=FROM_UMOCI=1"],
                   check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"]
                          if m["annotations"]["org.opencontainers.image.ref.name"] == "umoci"]
    (layout / "index.json").write_text(json.dumps(index))
    loaded = run_cli("image", "load", "-i", str(layout), "-t", "test/from-umoci")
    assert loaded.returncode == 0, loaded.stderr
    report = sandbox.run(["/bin/sh", "-c", "cat /data/added-by-umoci; echo $FROM_UMOCI"],
                         image="test/from-umoci")
    assert report.verdict == Verdict.OK and report.stdout == b"umoci\n1\n", report.stderr


def test_an_unreachable_registry_is_a_clean_error():
    result = run_cli("image", "push", "test/reg:1", "127.0.0.1:9/x/y:1")
    assert result.returncode == 125 and b"cannot reach registry 127.0.0.1:9" in result.stderr


def test_push_as_docker_schema_2(image, registry, tmp_path):
    target = f"{registry.host}/judge/docker-format:1"
    pushed = run_cli("image", "push", "--format", "docker", image, target, env=creds_env(registry))
    assert pushed.returncode == 0, pushed.stderr
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          *skopeo_creds(registry), f"docker://{target}"],
                         capture_output=True, check=True).stdout
    assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    env = fresh_store(tmp_path, registry)
    assert run_cli("image", "pull", target, env=env).returncode == 0
    assert run_cli("exec", "--image", target, env=env).stdout.startswith(b"hello from the image")


def test_two_pulls_at_once_into_one_store(image, registry, tmp_path):
    target = f"{registry.host}/judge/parallel:1"
    assert run_cli("image", "push", image, target, env=creds_env(registry)).returncode == 0
    env = fresh_store(tmp_path, registry)
    pulls = [subprocess.Popen([SANDBOX, "image", "pull", target], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in pulls]
    assert all(p.returncode == 0 for p in pulls), [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1
    result = run_cli("exec", "--image", target, env=env)
    assert result.stdout.startswith(b"hello from the image")
    assert list((tmp_path / "store" / "images" / "tmp").iterdir()) == []
