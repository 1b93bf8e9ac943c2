"""Building, running, saving and loading images, end to end through the CLI and the library."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

import sandbox
from sandbox import Verdict


def build(context: Path, tag: str, *extra: str) -> str:
    result = run_cli("image", "build", "-t", tag, *extra, str(context), timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def write_context(path: Path, buildfile: str, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "Sandboxfile").write_text(buildfile)
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


SHELL_IMAGE = """\
FROM scratch
BUNDLE /bin/sh /usr/bin/cat /usr/bin/ls /usr/bin/rm /usr/bin/mkdir /usr/bin/id /usr/bin/head
COPY greeting.txt /data/greeting.txt
ENV GREETING="hello from the image" PATH=/usr/bin:/bin
WORKDIR /data
USER 0:0
RUN mkdir /made && echo built > /made/by-run && rm /usr/bin/rm
CMD ["/bin/sh", "-c", "echo $GREETING; cat greeting.txt; pwd"]
"""


@pytest.fixture(scope="module")
def shell_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    context = write_context(tmp_path_factory.mktemp("ctx"), SHELL_IMAGE,
                            {"greeting.txt": "hi\n"})
    build(context, "test/shell:1")
    return "test/shell:1"


@pytest.fixture(scope="module")
def shipped_images() -> dict[str, str]:
    """The build files of images/, built once."""
    for name in ("python3", "c-runtime", "gcc"):
        build(ROOT / "images" / name, f"{name}:test")
    return {n: f"{n}:test" for n in ("python3", "c-runtime", "gcc")}


def test_image_config_applies_but_the_box_uid_wins(shell_image):
    result = run_cli("exec", "--image", shell_image)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the image\nhi\n/data\n"
    # the image says USER 0:0; the box still runs as the profile's uid
    ids = run_cli("exec", "--image", shell_image, "--", "id")
    assert ids.stdout.startswith(b"uid=1000 gid=1000")


def test_run_layer_keeps_its_changes_and_whiteouts(shell_image):
    result = run_cli("exec", "--image", shell_image, "--", "/bin/sh", "-c",
                     "cat /made/by-run; ls /usr/bin; test -e /usr/bin/rm || echo no-rm")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "built" in out and "no-rm" in out and "\nrm\n" not in out


def test_root_is_read_only_unless_the_profile_gives_it_room(shell_image):
    ro = sandbox.run(["/bin/sh", "-c", "echo x > /data/new"], image=shell_image)
    assert ro.verdict == Verdict.RUNTIME_ERROR and b"Read-only" in ro.stderr
    rw = sandbox.run(["/bin/sh", "-c", "echo x > /new && cat /new && head -c 3000000 /dev/zero "
                      "> /big"], image=shell_image, root_size="1M")
    assert rw.stdout == b"x\n"
    assert rw.verdict == Verdict.RUNTIME_ERROR and b"No space left" in rw.stderr
    again = sandbox.run(["/bin/sh", "-c", "cat /new"], image=shell_image, root_size="1M")
    assert again.verdict == Verdict.RUNTIME_ERROR  # the writable layer was thrown away
    # the image's own directories stay the image's: the box user cannot write them
    denied = sandbox.run(["/bin/sh", "-c", "echo x > /data/new"], image=shell_image,
                         root_size="1M")
    assert b"Permission denied" in denied.stderr


def test_profile_image_key_and_api(shell_image, tmp_path):
    profile = tmp_path / "img.toml"
    profile.write_text(f'extends = "strict"\nimage = "{shell_image}"\n')
    report = sandbox.run(["cat", "/data/greeting.txt"], profile=str(profile))
    assert report.verdict == Verdict.OK and report.stdout == b"hi\n"
    digest = json.loads(run_cli("image", "inspect", shell_image).stdout)["digest"]
    assert report.image == digest and json.loads(report.to_json())["image"] == digest
    assert sandbox.run(["true"]).image is None


def test_layer_cache_and_reproducible_digest(shell_image, tmp_path):
    context = write_context(tmp_path / "ctx", SHELL_IMAGE, {"greeting.txt": "hi\n"})
    cached = run_cli("image", "build", "-t", "test/shell:again", str(context))
    assert cached.stderr.count(b"cached layer") == 3
    first = run_cli("image", "inspect", shell_image)
    uncached = run_cli("image", "build", "--no-cache", "-t", "test/shell:fresh", str(context))
    assert b"cached" not in uncached.stderr
    assert uncached.stdout.strip() == json.loads(first.stdout)["digest"].encode()
    (context / "greeting.txt").write_text("changed\n")
    changed = run_cli("image", "build", "-t", "test/shell:changed", str(context))
    assert changed.stderr.count(b"cached layer") == 1  # BUNDLE only: COPY's input changed


def test_shipped_images_build_and_run(shipped_images, tmp_path):
    py = sandbox.run(["python3", "-c", "import json, decimal, sqlite3; print(6*7)"],
                     image=shipped_images["python3"])
    assert py.verdict == Verdict.OK and py.stdout == b"42\n", py.stderr
    src = tmp_path / "src"
    src.mkdir()
    os.chmod(src, 0o777)
    (src / "a.cpp").write_text(
        "#include <bits/stdc++.h>\nint main(){std::vector<int> v{3,1,2};"
        "std::sort(v.begin(),v.end());std::printf(\"%d %.3f\\n\",v[0],std::sqrt(2.0));}\n")
    compiled = sandbox.run(["g++", "-O2", "-o", "/box/src/a", "/box/src/a.cpp"],
                           image=shipped_images["gcc"], profile="compile",
                           binds=[sandbox.Bind(str(src), "/box/src", writable=True)])
    assert compiled.verdict == Verdict.OK, compiled.stderr
    ran = sandbox.run(["/box/a"], image=shipped_images["c-runtime"],
                      binds=[(str(src / "a"), "/box/a")])
    assert ran.verdict == Verdict.OK and ran.stdout == b"1 1.414\n"
    # the runtime image holds the loader and libc, libm, libstdc++ (+libgcc_s), nothing else
    inspect = json.loads(run_cli("image", "inspect", shipped_images["c-runtime"]).stdout)
    layer = Path(inspect["layers"][0]["path"])
    files = sorted(p.name for p in layer.rglob("*") if p.is_file())
    assert all(
        f.startswith(("ld-linux", "libc.so", "libgcc_s", "libm.so", "libstdc++")) for f in files)
    no_shell = sandbox.run(["/bin/sh", "-c", "true"], image=shipped_images["c-runtime"])
    assert no_shell.verdict == Verdict.SANDBOX_ERROR or no_shell.exit_code == 127


@pytest.mark.parametrize("fmt,name", [("oci", "layout"), ("oci", "layout.tar"),
                                      ("docker", "archive.tar")])
def test_save_and_load_round_trip(shell_image, tmp_path, fmt, name):
    out = tmp_path / name
    saved = run_cli("image", "save", "--format", fmt, "-o", str(out), shell_image)
    assert saved.returncode == 0, saved.stderr
    loaded = run_cli("image", "load", "-i", str(out), "-t", f"test/loaded-{fmt}:{len(name)}")
    assert loaded.returncode == 0, loaded.stderr
    result = run_cli("exec", "--image", f"test/loaded-{fmt}:{len(name)}")
    assert result.stdout == b"hello from the image\nhi\n/data\n"


def test_saved_tars_are_deterministic(shell_image, tmp_path):
    for fmt in ("oci", "docker"):
        a, b = tmp_path / f"a-{fmt}.tar", tmp_path / f"b-{fmt}.tar"
        for out in (a, b):
            run_cli("image", "save", "--format", fmt, "-o", str(out), shell_image)
        assert a.read_bytes() == b.read_bytes()


def test_a_tampered_archive_is_refused(shell_image, tmp_path):
    layout = tmp_path / "layout"
    run_cli("image", "save", "-o", str(layout), shell_image)
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    blob = layout / "blobs/sha256" / manifest["layers"][1]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    fresh = {**os.environ, "SANDBOX_HOME": str(tmp_path / "fresh-store")}  # has no blob yet
    result = run_cli("image", "load", "-i", str(layout), "-t", "test/tampered", env=fresh)
    assert result.returncode == 125
    assert b"digest" in result.stderr and b"Traceback" not in result.stderr
    # a blob that is a symlink to a host file is never read
    os.unlink(blob)
    os.symlink("/etc/hostname", blob)
    result = run_cli("image", "load", "-i", str(layout), "-t", "test/tampered", env=fresh)
    assert result.returncode == 125 and b"cannot open" in result.stderr


def test_a_hostile_archive_cannot_write_outside_staging(tmp_path):
    evil = tmp_path / "evil.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../../../../../../../../" + str(tmp_path / "pwned"))
        tar.addfile(info, io.BytesIO(b""))
    evil.write_bytes(buf.getvalue())
    result = run_cli("image", "load", "-i", str(evil))
    assert result.returncode == 125 and b"climbs out" in result.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args,message", [
    (["exec", "--image", "no/such:image", "--", "true"], b"no image 'no/such:image'"),
    (["exec", "--image", "Bad Ref!", "--", "true"], b"bad repository"),
    (["image", "inspect", "sha256:" + "0" * 64], b"no image"),
    (["image", "pull", "127.0.0.1:1/x/y:1"], b"cannot reach registry"),
    (["image", "pull", "nohost/y:1"], b"names no registry"),
    (["image", "rm", "never/tagged"], b"no image"),
])
def test_image_errors_exit_125_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 125, result
    assert message in result.stderr and b"Traceback" not in result.stderr


def test_a_malformed_build_file_names_the_line(tmp_path):
    context = write_context(tmp_path, "FROM scratch\n\n# fine\nCOPY only-one-arg\n")
    result = run_cli("image", "build", "-t", "x/y", str(context))
    assert result.returncode == 125
    assert f"{context}/Sandboxfile:4: COPY".encode() in result.stderr
    failing = write_context(tmp_path / "f", "FROM scratch\nBUNDLE /bin/sh\nRUN exit 3\n")
    result = run_cli("image", "build", "-t", "x/y", str(failing))
    assert result.returncode == 125 and b"Sandboxfile:3: RUN failed" in result.stderr


def test_copy_never_follows_symlinks_out_of_the_context(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    context = write_context(tmp_path / "ctx", "FROM scratch\nCOPY link /link\nCOPY dir/ /d/\n")
    (context / "link").symlink_to(secret)
    (context / "dir").mkdir()
    (context / "dir" / "inner").symlink_to(secret)
    build(context, "test/links")
    inspect = json.loads(run_cli("image", "inspect", "test/links").stdout)
    links = []
    for layer in inspect["layers"]:
        for path in Path(layer["path"]).rglob("*"):
            assert path.is_symlink() or path.is_dir() or b"host secret" not in path.read_bytes()
            if path.is_symlink():
                links.append((path.name, os.readlink(path)))
    assert sorted(links) == [("inner", str(secret)), ("link", str(secret))]
    escape = write_context(tmp_path / "esc", "FROM scratch\nCOPY ../secret /s\n")
    result = run_cli("image", "build", "-t", "test/esc", str(escape))
    assert result.returncode == 125 and b"leaves the build context" in result.stderr


def test_bundle_refuses_secrets(tmp_path):
    if not os.path.exists("/etc/shadow"):
        pytest.skip("no /etc/shadow on this host")
    context = write_context(tmp_path, "FROM scratch\nBUNDLE /etc/shadow\n")
    result = run_cli("image", "build", "-t", "test/secret", str(context))
    assert result.returncode == 125 and b"not world-readable" in result.stderr


def test_concurrent_builds_and_runs_do_not_corrupt_the_store(shell_image, tmp_path):
    contexts = [write_context(tmp_path / f"c{i}", SHELL_IMAGE.replace("built", f"built{i % 2}"),
                              {"greeting.txt": "hi\n"}) for i in range(4)]
    results: list[subprocess.CompletedProcess[bytes]] = []

    def one(i: int) -> None:
        results.append(run_cli("image", "build", "--no-cache", "-t", f"test/par:{i}",
                               str(contexts[i]), timeout=300))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    runs = [sandbox.run(["cat", "/made/by-run"], image=shell_image) for _ in range(5)]
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert all(r.stdout == b"built\n" for r in runs)
    digests = {run_cli("image", "inspect", f"test/par:{i}").stdout for i in range(4)}
    assert len({json.loads(d)["digest"] for d in digests}) == 2  # two distinct contents
    for i in range(4):
        assert run_cli("exec", "--image", f"test/par:{i}", "--", "cat",
                       "/made/by-run").stdout == f"built{i % 2}\n".encode()


def test_prune_keeps_tagged_images_and_frees_the_rest(tmp_path):
    context = write_context(tmp_path, "FROM scratch\nBUNDLE /bin/sh /usr/bin/cat\n"
                                      "COPY f /f\n", {"f": "one"})
    build(context, "test/prune:keep")
    (context / "f").write_text("two")
    build(context, "test/prune:drop")
    drop = json.loads(run_cli("image", "inspect", "test/prune:drop").stdout)
    assert run_cli("image", "rm", "test/prune:drop").returncode == 0
    pruned = run_cli("image", "prune")
    assert pruned.returncode == 0 and b"removed" in pruned.stdout
    assert not Path(drop["layers"][-1]["path"]).exists()
    kept = sandbox.run(["cat", "/f"], image="test/prune:keep")
    assert kept.stdout == b"one"



def test_an_image_cannot_redirect_the_box_mount_points(shell_image, tmp_path):
    """An image whose /tmp, /proc, /dev and work dir are symlinks to host paths, and whose
    files are setuid: the box still gets its own tmpfs, proc and dev, and no setuid bit."""
    context = write_context(tmp_path, f"FROM {shell_image}\nCOPY links/ /\n"
                                      "COPY --chmod=4755 suid /usr/bin/suid\n", {"suid": "x"})
    links = context / "links"
    links.mkdir()
    for name, target in (("tmp", "/etc"), ("proc", "/"), ("dev", "/root"), ("box", "/var")):
        (links / name).symlink_to(target)
    build(context, "test/redirect")
    inspect = json.loads(run_cli("image", "inspect", "test/redirect").stdout)
    top = Path(inspect["layers"][-2]["path"])
    assert os.readlink(top / "tmp") == "/etc"  # the attack is really in the image
    report = sandbox.run(["/bin/sh", "-c",
                          "ls /tmp | head -3; echo end; head -1 /proc/self/status; ls /dev;"
                          " ls -l /usr/bin/suid"], image="test/redirect")
    assert report.verdict == Verdict.OK, report.stderr
    out = report.stdout.decode()
    assert out.startswith("end\n")  # the box's empty tmpfs, not the host's /etc
    assert "Name:\thead" in out  # a real proc
    assert "full" in out and "null" in out  # the box's /dev
    assert "-rwxr-xr-x" in out  # setuid dropped when the layer was unpacked


def test_prune_waits_for_a_run_that_uses_the_store(shell_image):
    import time

    reports: list[sandbox.Report] = []
    runner = threading.Thread(target=lambda: reports.append(sandbox.run(
        ["/bin/sh", "-c", "while :; do :; done"], image=shell_image, wall_time=1.5,
        cpu_time=5)))
    runner.start()
    time.sleep(0.5)
    started = time.monotonic()
    pruned = run_cli("image", "prune")
    waited = time.monotonic() - started
    runner.join()
    assert pruned.returncode == 0 and reports[0].verdict == Verdict.WALL_TIME_LIMIT
    assert waited > 0.5, "prune did not wait for the run holding the store"
    assert sandbox.run(["cat", "/made/by-run"], image=shell_image).stdout == b"built\n"


def _naive_copy(context: Path, stage: Path, sources: list[str]) -> None:
    """How COPY staged several sources before: by path, so the second write and chmod went
    through the symlink the first source had staged."""
    import shutil

    for source in sources:
        src, target = context / source, stage / "out" / Path(source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copyfile(src, target, follow_symlinks=False)
            os.chmod(target, 0o777)  # the mode the context file has


def test_copy_never_writes_through_a_symlink_an_earlier_source_staged(shell_image, tmp_path):
    victim = tmp_path / "victim"
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    context = write_context(tmp_path / "ctx", f"FROM {shell_image}\nCOPY a/x b/x /out/\n"
                            "COPY d1 d2 /tree/\n", {"b/x": "pwned", "d2/sub/f": "pwned"})
    (context / "a").mkdir()
    (context / "a" / "x").symlink_to(victim)
    os.chmod(context / "b" / "x", 0o777)  # what the attack wants on the victim
    (context / "d1").mkdir()
    (context / "d1" / "sub").symlink_to(victim_dir)
    # control: staged by path, the second source lands in (and chmods) the host's victim
    victim.write_text("do not touch")
    os.chmod(victim, 0o600)
    _naive_copy(context, tmp_path / "naive", ["a/x", "b/x"])
    assert victim.read_text() == "pwned" and victim.stat().st_mode & 0o777 == 0o777
    victim.write_text("do not touch")
    os.chmod(victim, 0o600)
    build(context, "test/copy-race")
    assert victim.read_text() == "do not touch" and victim.stat().st_mode & 0o777 == 0o600
    assert list(victim_dir.iterdir()) == []
    report = sandbox.run(["cat", "/out/x", "/tree/sub/f"], image="test/copy-race")
    assert report.stdout == b"pwnedpwned", report.stderr  # the later source won, in the image


def test_fifos_in_the_context_never_block_the_build(tmp_path):
    context = write_context(tmp_path / "ctx", "FROM scratch\nCOPY dir /d\n", {"dir/f": "x"})
    os.mkfifo(context / "dir" / "pipe")
    # control: a plain open of the FIFO blocks (no writer ever comes)
    blocked = subprocess.run(["timeout", "1", "cat", str(context / "dir" / "pipe")])
    assert blocked.returncode == 124
    result = run_cli("image", "build", "-t", "test/fifo", str(context), timeout=30)
    assert result.returncode == 0, result.stderr
    named = write_context(tmp_path / "named", "FROM scratch\nCOPY pipe /p\n")
    os.mkfifo(named / "pipe")
    result = run_cli("image", "build", "-t", "test/fifo", str(named), timeout=30)
    assert result.returncode == 125 and b"not a file, directory or symlink" in result.stderr
    as_buildfile = tmp_path / "fifo-file"
    as_buildfile.mkdir()
    os.mkfifo(as_buildfile / "Sandboxfile")
    result = run_cli("image", "build", "-t", "test/fifo", str(as_buildfile), timeout=30)
    assert result.returncode == 125 and b"not a regular file" in result.stderr


def test_a_run_step_cannot_write_past_its_size_limit(shell_image, tmp_path):
    # `|| true`: the command hides its ENOSPC, the build still fails and names the limit
    context = write_context(tmp_path, f"FROM {shell_image}\n"
                                      "RUN head -c 40000000 /dev/zero > /big || true\n")
    refused = run_cli("image", "build", "--no-cache", "--root-size", "16M", "-t", "test/cap",
                      str(context), timeout=120)
    assert refused.returncode == 125, refused.stderr
    assert b"more than the 16M a build step may write" in refused.stderr
    profile = tmp_path / "small-build.toml"
    profile.write_text('extends = "build"\n[limits]\nroot_size = "16M"\n')
    from_profile = run_cli("image", "build", "--no-cache", "--run-profile", str(profile),
                           "-t", "test/cap", str(context), timeout=120)
    assert b"more than the 16M a build step may write" in from_profile.stderr
    # control: with room for it the same step writes its 40 MB, so the limit stopped it
    build(context, "test/cap", "--no-cache", "--root-size", "64M")
    inspect = json.loads(run_cli("image", "inspect", "test/cap").stdout)
    assert (Path(inspect["layers"][-1]["path"]) / "big").stat().st_size == 40_000_000


def test_other_local_users_can_neither_read_nor_plant_in_the_store(tmp_path):
    import shutil
    import stat
    import tempfile

    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to act as a second local user")
    top = Path(tempfile.mkdtemp(prefix="sandbox-store-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)  # the store's parents are open: only its own modes protect it
        env = {**os.environ, "SANDBOX_HOME": str(top / "home")}
        context = write_context(tmp_path, "FROM scratch\nBUNDLE /bin/sh /usr/bin/ls\n"
                                "COPY tree/ /\nCOPY secret /secret\n", {"secret": "s3cret"})
        (context / "tree" / "pub").mkdir(parents=True)
        os.chmod(context / "tree" / "pub", 0o777)  # a world-writable image dir
        os.chmod(context / "secret", 0o600)
        built = run_cli("image", "build", "-t", "test/private", str(context), env=env)
        assert built.returncode == 0, built.stderr
        inspect = json.loads(run_cli("image", "inspect", "test/private", env=env).stdout)
        store = top / "home" / "images"
        blob = store / "blobs/sha256" / inspect["layers"][-1]["digest"][7:]
        pub = Path(inspect["layers"][-2]["path"]) / "pub"
        assert stat.S_IMODE(pub.stat().st_mode) == 0o777  # the image's own mode is kept

        def attack() -> tuple[subprocess.CompletedProcess[bytes], ...]:
            as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            read = subprocess.run([*as_nobody, "sh", "-c", f"gzip -dc < {blob}"],
                                  capture_output=True)
            plant = subprocess.run([*as_nobody, "touch", str(pub / "planted")],
                                   capture_output=True)
            return read, plant

        read, plant = attack()
        assert read.returncode != 0 and b"s3cret" not in read.stdout
        assert plant.returncode != 0 and not (pub / "planted").exists()
        for dirpath, dirnames, filenames in os.walk(store):
            if Path(dirpath).parent == store / "layers":
                dirnames[:] = []  # an unpacked layer holds the image's own modes
                continue
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
            if Path(dirpath) == store / "blobs/sha256":
                assert {stat.S_IMODE(os.stat(f"{dirpath}/{f}").st_mode) for f in filenames} == {
                    0o600}
        # boxes still mount the layers of a 0700 store, and see exactly the image
        ran = run_cli("exec", "--image", "test/private", "--", "ls", "-A", "/pub", env=env)
        assert ran.returncode == 0 and ran.stdout == b"", ran.stderr
        # control: with the modes the store had before, the second user reads and plants...
        for sub in ("", "blobs", "blobs/sha256", "layers", "cache", "tmp"):
            os.chmod(store / sub, 0o755)  # the old, open modes
        os.chmod(blob, 0o644)
        read, plant = attack()
        assert b"s3cret" in read.stdout and plant.returncode == 0
        # ...so such a store is refused rather than used
        refused = run_cli("exec", "--image", "test/private", "--", "ls", "/pub", env=env)
        assert refused.returncode == 125 and b"open to other users" in refused.stderr
    finally:
        shutil.rmtree(top)
