"""`sandbox.run` from Python: captured output, stdin forms, errors, and many threads at once."""

import os
import threading

import pytest

import sandbox
from sandbox import Verdict


def test_the_issue_example():
    report = sandbox.run(["python3", "-c", "print(6*7)"], profile="strict", stdin=b"")
    assert (report.verdict, report.exit_code, report.stdout) == (Verdict.OK, 0, b"42\n")
    assert report.ok and report.stderr == b""


@pytest.mark.parametrize("stdin", [b"in\n", "in\n"])
def test_stdin_as_bytes_or_text(stdin):
    assert sandbox.run(["cat"], stdin=stdin).stdout == b"in\n"


def test_stdin_from_a_descriptor_and_none(tmp_path):
    path = tmp_path / "in"
    path.write_bytes(b"from file\n")
    with path.open("rb") as f:
        assert sandbox.run(["cat"], stdin=f.fileno()).stdout == b"from file\n"
    assert sandbox.run(["cat"], stdin=None).stdout == b""


def test_output_limit_truncates_and_is_a_verdict():
    report = sandbox.run(["sh", "-c", "yes | head -c 100000; sleep 5"], output="1K")
    assert report.verdict is Verdict.OUTPUT_LIMIT and report.limit_fired == "output"
    assert report.stdout == b"y\n" * 512 and report.stdout_truncated
    assert report.stdout_bytes > 1024 and not report.stderr_truncated


def test_binds_and_limits_as_keywords(tmp_path):
    (tmp_path / "x").write_text("bound\n")
    os.chmod(tmp_path, 0o755)
    report = sandbox.run(["cat", "/box/in/x"], binds=[(str(tmp_path), "/box/in")],
                         wall_time="2s", memory="64M", pids=4)
    assert report.stdout == b"bound\n"
    assert report.limits["memory"].value == 64 << 20 and report.limits["pids"].value == 4
    assert "pids" in report.limits["pids"].mechanism


def test_a_setup_failure_is_a_structured_object_of_the_report(tmp_path):
    """A mount point inside a bound file: the box's mount_root fails with ENOTDIR, and the
    report (through the helper) says so as data, not only as prose."""
    (tmp_path / "file").write_text("x\n")
    os.chmod(tmp_path, 0o755)
    report = sandbox.run(["true"], binds=[(str(tmp_path / "file"), "/box/f"),
                                          (str(tmp_path), "/box/f/x")])
    failure = report.setup_error
    assert report.verdict is Verdict.SANDBOX_ERROR and isinstance(failure, sandbox.SetupFailure)
    assert (failure.phase, failure.errno, failure.errno_name) == ("mount_root", 20, "ENOTDIR")
    assert failure.operation.endswith("/box/f/x") and report.error == failure.message()


def test_invalid_requests_raise_config_errors():
    with pytest.raises(sandbox.ConfigError, match="no such profile"):
        sandbox.run(["true"], profile="missing")
    with pytest.raises(sandbox.ConfigError):
        sandbox.run([])
    with pytest.raises(sandbox.SandboxError):
        sandbox.run(["true"], binds=[("/does/not/exist", "/box/x")])


def test_many_threads_at_once_get_their_own_results():
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                report = sandbox.run(["sh", "-c", f"echo {n}-{i}; exit {n % 3}"])
                assert report.exit_code == n % 3
                results[n * 10 + i] = report.stdout or b""
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {n * 10 + i: f"{n}-{i}\n".encode() for n in range(8) for i in range(5)}


def test_run_works_in_a_forked_child_with_its_own_helper():
    sandbox.run(["true"])  # the parent's helper exists now
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if sandbox.run(["echo", "child"]).stdout == b"child\n" else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_captured_output_costs_the_caller_one_copy_of_it():
    """The helper hands captured output over as a memory file: 96 MiB of output grow the
    caller by about 96 MiB (a pickle through the socket cost three copies)."""
    import subprocess
    import sys

    size = 96 << 20
    script = (
        "import resource, sandbox\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = sandbox.run(['python3', '-c', 'import sys; sys.stdout.buffer.write(b\"x\" * "
        f"{size})'], output='128M', memory='256M', wall_time='30s')\n"
        "print(len(r.stdout), r.stdout_truncated, "
        "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                         timeout=120).stdout.split()
    assert out[:2] == [str(size).encode(), b"False"]
    assert int(out[2]) < 1.5 * size


@pytest.mark.parametrize(("kwargs", "key", "problem"), [
    ({"argv": "ls"}, "argv", "expected a list of strings"),
    ({"profile": 123}, "profile", "name or path"),
    ({"binds": "/a:/b"}, "binds", "list of (source, target) tuples"),
    ({"binds": [("/a",)]}, "binds[0]", "(source, target[, writable])"),
    ({"binds": [("/tmp", "/usr/x")]}, "bind /tmp:/usr/x", "read-only system directory"),
    ({"stdout": -1}, "stdout", "file descriptor"),
    ({"stderr": 987}, "stderr", "not open"),
    ({"stdout": True}, "stdout", "file descriptor"),
    ({"stdin": 3.5}, "stdin", "expected bytes, str"),
    ({"stdin": 987}, "stdin", "not open"),
    ({"env": "A=1"}, "env", "mapping"),
    ({"env": {"A": 1}}, "env.A", "strings"),
    ({"purpose": 3}, "purpose", "a string"),
    ({"purpose": "run"}, "purpose", "no policy is given"),
    ({"policy": 3}, "policy", "a path"),
    ({"memory": 256}, "memory", "did you mean 256M?"),
    ({"pids": 0}, "pids", "> 0"),
    ({"cpu_quota": "lots"}, "cpu_quota", "number of CPUs"),
    ({"argv": ["echo", "x" * (128 << 10)]}, "argv[1]", "MAX_ARG_STRLEN"),
])
def test_every_keyword_is_validated_up_front(kwargs, key, problem):
    argv = kwargs.pop("argv", ["true"])
    with pytest.raises(sandbox.ConfigError) as info:
        sandbox.run(argv, **kwargs)
    assert info.value.key == key and problem in info.value.problem


def test_descriptors_must_be_open_the_right_way(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    with path.open("rb") as f, pytest.raises(sandbox.ConfigError, match="not open for writing"):
        sandbox.run(["true"], stdout=f.fileno())
    with path.open("wb") as f:
        with pytest.raises(sandbox.ConfigError, match="not open for reading"):
            sandbox.run(["true"], stdin=f.fileno())
        assert sandbox.run(["echo", "to file"], stdout=f.fileno()).ok
    assert path.read_bytes() == b"to file\n"


def test_counts_as_digit_strings_and_bind_lists_are_accepted(tmp_path):
    os.chmod(tmp_path, 0o755)
    report = sandbox.run(["true"], pids="8", open_files="32", binds=[[str(tmp_path), "/box/t"]])
    assert report.ok and report.limits["pids"].value == 8


def test_a_run_too_large_for_the_helper_is_a_config_error():
    argv = ["true", *(str(i) * 100_000 for i in range(4))]  # fits the kernel, not the socket
    with pytest.raises(sandbox.ConfigError, match="too large to send to the box helper"):
        sandbox.run(argv)
    assert sandbox.run(["true"]).ok  # the helper is still there
