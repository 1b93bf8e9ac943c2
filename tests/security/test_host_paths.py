"""Host paths are never followed through what a box planted: binds, stdin, every output file.

A box writes into a directory bound writable; the next run (as root) names paths inside it.
Each attack is planted for real by a box, then used by the next run, with the kernel's
``fs.protected_symlinks`` off and on, in sticky and non-sticky directories. Each control shows
what plain path resolution (what the sandbox used to do) would have done with the same plant.
"""

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants as a box, then acts as root")


def _sysctl(name: str, value: int) -> Iterator[None]:
    path = Path("/proc/sys/fs") / name
    old = path.read_text()
    path.write_text(str(value))
    yield
    path.write_text(old)


@pytest.fixture(params=[0, 1], ids=["protected_symlinks=0", "protected_symlinks=1"])
def protected_symlinks(request: pytest.FixtureRequest) -> Iterator[int]:
    yield from (request.param for _ in _sysctl("protected_symlinks", request.param))


@pytest.fixture(params=[0o777, 0o1777], ids=["non-sticky", "sticky"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A directory a box may write (bound writable), as a judge's scratch dir would be."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(request.param)
    return directory


def plant(shared: Path, script: str, *options: str) -> Path:
    """Run ``script`` in a box that has ``shared`` at /box/out, writable, and in it ``d``, a
    directory of its own (not sticky: the kernel's symlink protection does not cover it, so
    following a plant there works even with ``fs.protected_symlinks=1``); returns ``d``."""
    result = run_cli("exec", *options, "--bind", f"{shared}:/box/out", "--", "sh", "-c",
                     f"mkdir -p /box/out/d && cd /box/out/d && {script}")
    assert result.returncode == 0, result.stderr
    return shared / "d"


def test_a_planted_symlink_never_becomes_a_bind_source(shared, protected_symlinks):
    d = plant(shared, "ln -s / /box/out/out; ln -s / out; ln -s /etc etc")
    # Control: resolving the plant as paths gives the host's root (read-write, with --bind).
    assert os.path.realpath(d / "out") == "/"
    assert (d / "etc" / "passwd").read_text() == Path("/etc/passwd").read_text()
    followed = run_cli("exec", "--ro-bind", f"{os.path.realpath(d / 'out')}:/box/host",
                       "--", "ls", "/box/host")
    assert b"etc" in followed.stdout.split()
    for planted in ("out", "d/out", "d/etc/shadow"):
        result = run_cli("exec", "--bind", f"{shared}/{planted}:/box/host", "--",
                         "sh", "-c", "echo ran > /box/host/PWNED")
        assert result.returncode == 125, result.stderr
        assert b"is a symlink" in result.stderr
    assert not Path("/PWNED").exists()


@pytest.fixture
def unprotected_hardlinks() -> Iterator[None]:
    yield from _sysctl("protected_hardlinks", 0)


def test_a_planted_hard_link_is_refused_as_stdin_and_as_a_bind_source(
        shared, unprotected_hardlinks):
    secret = shared / "answers"
    secret.write_text("the jury's secret\n")
    secret.chmod(0o600)  # root's: the box cannot read it
    plant(shared, "ln /box/out/answers /box/out/input.txt")
    assert secret.stat().st_nlink == 2
    # Control: a plain open as root reads the secret through the box's link.
    assert (shared / "input.txt").read_text() == "the jury's secret\n"
    result = run_cli("exec", "--stdin", str(shared / "input.txt"), "--", "cat")
    assert result.returncode == 125 and b"hard links" in result.stderr
    assert b"secret" not in result.stdout
    result = run_cli("exec", "--ro-bind", f"{shared}/input.txt:/box/in", "--", "cat", "/box/in")
    assert result.returncode == 125 and b"hard links" in result.stderr


def test_a_planted_symlink_is_refused_as_stdin(shared, protected_symlinks):
    d = plant(shared, "ln -s /etc/shadow input.txt")
    assert (d / "input.txt").read_text().startswith("root:")  # control: root reads it
    result = run_cli("exec", "--stdin", str(d / "input.txt"), "--", "cat")
    assert result.returncode == 125 and b"is a symlink" in result.stderr
    assert b"root:" not in result.stdout


def test_a_planted_fifo_is_refused_as_stdin_without_waiting(shared, tmp_path):
    # mknod is not in the shipped profiles' allowlists; a profile of the operator's may add it.
    loose = tmp_path / "mknod.toml"
    loose.write_text('extends = "strict"\n[seccomp]\nallow = ["@basic", "@io", "@file", '
                     '"@process", "mknodat", "mknod"]\n')
    d = plant(shared, "mkfifo input.txt", "--profile", str(loose))
    # Control: a plain open of the FIFO waits for a writer that never comes.
    waited = subprocess.run(["timeout", "1", "cat", str(d / "input.txt")])
    assert waited.returncode == 124
    result = run_cli("exec", "--stdin", str(d / "input.txt"), "--", "cat", timeout=10)
    assert result.returncode == 125 and b"not a regular file" in result.stderr


@pytest.mark.parametrize("option", ["--stdout", "--stderr", "--report", "--meta"])
def test_a_planted_symlink_is_never_written_through(shared, protected_symlinks, option,
                                                     tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    d = plant(shared, f"ln -s {victim} out.txt")
    result = run_cli("exec", option, str(d / "out.txt"), "--bind", f"{shared}:/box/out",
                     "--", "sh", "-c", "echo ran > /box/out/ran")
    assert result.returncode == 125 and b"is a symlink" in result.stderr
    assert not (shared / "ran").exists()  # refused before the program ran
    assert victim.read_text() == "precious\n"
    # Control: writing through the path as root overwrites the victim.
    (d / "out.txt").write_text("overwritten\n")
    assert victim.read_text() == "overwritten\n"


def test_a_hard_linked_output_target_is_replaced_not_written(shared, tmp_path):
    victim = shared / "victim"
    victim.write_text("precious\n")
    os.link(victim, shared / "report.json")  # what a box can do with protected_hardlinks=0
    result = run_cli("exec", "--report", str(shared / "report.json"), "--", "true")
    assert result.returncode == 0, result.stderr
    assert json.loads((shared / "report.json").read_text())["verdict"] == "ok"
    assert victim.read_text() == "precious\n"
    assert not list(shared.glob(".*.tmp"))  # no staging file left behind


def test_output_files_are_checked_before_the_program_runs(tmp_path):
    marker = tmp_path / "marker"
    marker_dir = tmp_path / "m"
    marker_dir.mkdir()
    marker_dir.chmod(0o777)
    for option in ("--report", "--meta", "--stdout", "--stderr"):
        result = run_cli("exec", option, str(tmp_path / "missing" / "out"),
                         "--bind", f"{marker_dir}:/box/m", "--", "touch", "/box/m/ran")
        assert result.returncode == 125
        assert b"missing" in result.stderr and b"internal error" not in result.stderr
        assert not (marker_dir / "ran").exists()
    assert not marker.exists()


def test_a_report_is_never_lost_when_its_file_cannot_be_written_after_the_run(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: the box may remove our staging file
    # The box removes the report's staging file from the directory it shares with it.
    result = run_cli("exec", "--report", str(shared / "report.json"),
                     "--bind", f"{shared}:/box/out", "--", "sh", "-c",
                     "rm -f /box/out/.report.json.*.tmp; echo done")
    assert result.returncode == 125
    assert b"cannot write" in result.stderr
    text = result.stderr.decode()
    report = json.loads(text[text.index("{"):])
    assert report["verdict"] == "ok" and report["stdout_bytes"] == 5
    assert not (shared / "report.json").exists()


def test_a_group_report_is_not_written_through_a_planted_symlink(shared, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    d = plant(shared, f"ln -s {victim} group.json")
    group = tmp_path / "g.toml"
    group.write_text('[[box]]\nname = "a"\ncommand = ["true"]\n')
    result = run_cli("group", "run", str(group), "--report", str(d / "group.json"))
    assert result.returncode == 125 and b"is a symlink" in result.stderr
    assert victim.read_text() == "precious\n"


def test_the_callers_own_descriptors_and_devices_are_written_as_they_are():
    """No box can make a device node or one of the CLI's descriptors: they need no rename."""
    result = run_cli("exec", "--report", "/dev/stdout", "--stdout", "/dev/null",
                     "--meta", "/dev/fd/2", "--", "echo", "hidden")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verdict"] == "ok"  # the report, not the program's output
    assert b"status" not in result.stderr and b"time-wall:" in result.stderr


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("tiny")
    (context / "Sandboxfile").write_text("FROM scratch\nBUNDLE /bin/true\n")
    built = run_cli("image", "build", "-t", "paths/tiny", str(context), timeout=120)
    assert built.returncode == 0, built.stderr
    return "paths/tiny"


def test_a_planted_symlink_is_neither_a_build_context_nor_a_build_file(shared, tmp_path):
    d = plant(shared, "ln -s / ctx; mkdir real; ln -s /etc/shadow real/Sandboxfile")
    buildfile = tmp_path / "Sf"
    buildfile.write_text("FROM scratch\nCOPY etc/passwd /leak/passwd\n")
    # Control: through the plant, the context is the host's root and the build file its shadow.
    assert (d / "ctx" / "etc" / "passwd").read_text() == Path("/etc/passwd").read_text()
    assert (d / "real" / "Sandboxfile").read_text().startswith("root:")
    context = run_cli("image", "build", "-f", str(buildfile), "-t", "paths/leak", str(d / "ctx"))
    assert context.returncode == 125 and b"is a symlink" in context.stderr
    buildfile_run = run_cli("image", "build", "-t", "paths/leak2", str(d / "real"))
    assert buildfile_run.returncode == 125 and b"is a symlink" in buildfile_run.stderr
    assert b"root:" not in buildfile_run.stderr.lower()


def test_image_save_never_writes_through_a_planted_symlink(shared, tmp_path, tiny_image):
    victim = tmp_path / "victim-dir"
    victim.mkdir()
    d = plant(shared, f"ln -s {victim} layout; ln -s {victim} parent")
    assert os.path.realpath(d / "layout") == str(victim)  # control: the path leads there
    for output in (d / "layout", d / "parent" / "img.tar", d / "parent" / "layout"):
        result = run_cli("image", "save", "-o", str(output), tiny_image)
        assert result.returncode == 125 and b"is a symlink" in result.stderr, result.stderr
    assert list(victim.iterdir()) == []
    made = run_cli("image", "save", "-o", str(d / "fresh"), tiny_image)  # a real path works
    assert made.returncode == 0 and (d / "fresh" / "index.json").is_file(), made.stderr


def test_a_fifo_named_as_an_input_file_never_blocks_the_cli(tmp_path):
    fifo = tmp_path / "input"
    os.mkfifo(fifo)  # as any local user could, where a path is expected
    waited = subprocess.run(["timeout", "1", "cat", str(fifo)])
    assert waited.returncode == 124  # control: a plain open waits for a writer
    for args in (["exec", "--policy", str(fifo), "--", "true"],
                 ["exec", "--profile", str(fifo), "--", "true"],
                 ["group", "run", str(fifo)],
                 ["image", "load", "-i", str(fifo)]):
        result = run_cli(*args, timeout=20)
        assert result.returncode == 125, (args, result.stderr)
        assert b"not a regular file" in result.stderr, (args, result.stderr)


def test_a_layout_is_read_from_the_directory_checked_not_from_its_path_again(tmp_path):
    """A box that can write above a layout swaps it for a symlink between two reads."""
    from sandbox.hostpath import open_nofollow
    from sandbox.image.archive import _Dir

    layout, elsewhere = tmp_path / "layout", tmp_path / "elsewhere"
    for directory, text in ((layout, "the layout's"), (elsewhere, "root's secret")):
        directory.mkdir()
        (directory / "index.json").write_text(text)
    fd = open_nofollow(str(layout), os.O_RDONLY | os.O_DIRECTORY)
    try:
        reader = _Dir(fd)
        assert reader.read("index.json", 100) == b"the layout's"
        layout.rename(tmp_path / "moved")
        layout.symlink_to(elsewhere)  # the swap
        assert (layout / "index.json").read_text() == "root's secret"  # control: by path
        assert reader.read("index.json", 100) == b"the layout's"
    finally:
        os.close(fd)


def test_bundle_never_takes_a_readable_file_from_a_private_directory(shared, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "token.txt").write_text("root's token\n")
    (private / "token.txt").chmod(0o644)  # readable by mode, but nobody else may reach it
    d = plant(shared, f"ln -s {private}/token.txt prog")
    assert (d / "prog").read_text() == "root's token\n"  # control: root follows the plant
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Sandboxfile").write_text(f"FROM scratch\nBUNDLE {d}/prog\n")
    result = run_cli("image", "build", "-t", "paths/bundle", str(context))
    assert result.returncode == 125 and b"not world-readable" in result.stderr, result.stderr
