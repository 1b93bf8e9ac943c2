"""`sandbox exec` end to end on the real kernel: exit codes, stdio, binds, the root, reports."""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli


def exec_(*args: str, stdin: bytes = b"", report: Path | None = None, timeout: float = 60):
    extra = ["--report", str(report)] if report else []
    return run_cli("exec", *extra, *args, stdin=stdin, timeout=timeout)


@pytest.mark.parametrize(("cmd", "code"), [
    (["true"], 0), (["sh", "-c", "exit 3"], 3), (["sh", "-c", "kill -SEGV $$"], 128 + 11),
    (["no-such-program"], 127), (["/etc/passwd"], 126), (["/box"], 126),
])
def test_exit_codes_follow_docker_conventions(cmd, code):
    assert exec_("--", *cmd).returncode == code


def test_configuration_errors_exit_125_with_one_line_and_no_traceback():
    for args in (["--profile", "nope", "--", "true"], ["--memory", "lots", "--", "true"],
                 ["--ro-bind", "/does/not/exist:/x", "--", "true"], ["--"]):
        result = exec_(*args)
        assert result.returncode == 125, args
        assert b"Traceback" not in result.stderr
        assert result.stderr.startswith(b"sandbox: error:"), result.stderr


def test_stdin_stdout_stderr_pass_through():
    result = exec_("--", "sh", "-c", "read x; echo out:$x; echo err:$x >&2", stdin=b"hello\n")
    assert result.stdout == b"out:hello\n" and result.stderr == b"err:hello\n"


def test_the_issue_example_prints_42(tmp_path):
    report = tmp_path / "r.json"
    result = exec_("--profile", "strict", "--", "python3", "-c", "print(6*7)", report=report)
    assert result.stdout == b"42\n" and result.returncode == 0
    data = json.loads(report.read_text())
    for key in ("verdict", "exit_code", "signal", "cpu_time", "wall_time", "memory_peak",
                "forbidden_syscall", "profile"):
        assert key in data
    assert data["verdict"] == "ok" and data["profile"] == "strict" and data["schema"] == 1
    assert data["cgroup"] in ("cgroup1", "cgroup2")
    assert 0 < data["wall_time"] < 10 and data["memory_peak"] > 0


def test_read_only_bind_is_readable_and_not_writable(tmp_path):
    (tmp_path / "input.txt").write_text("jury data\n")
    os.chmod(tmp_path, 0o755)
    result = exec_("--ro-bind", f"{tmp_path}:/box/src", "--", "sh", "-c",
                   "cat /box/src/input.txt; echo x > /box/src/new 2>/dev/null || echo refused")
    assert result.stdout == b"jury data\nrefused\n"
    assert not (tmp_path / "new").exists()


def test_writable_bind_keeps_what_the_program_writes(tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    result = exec_("--bind", f"{out}:/box/out", "--", "sh", "-c", "echo answer > /box/out/a")
    assert result.returncode == 0, result.stderr
    assert (out / "a").read_text() == "answer\n"


def test_bind_to_a_new_top_level_path_and_a_single_file(tmp_path):
    (tmp_path / "f").write_text("file bind\n")
    os.chmod(tmp_path, 0o755)
    result = exec_("--ro-bind", f"{tmp_path}:/data", "--ro-bind", f"{tmp_path}/f:/box/f",
                   "--", "sh", "-c", "cat /data/f /box/f")
    assert result.stdout == b"file bind\nfile bind\n", result.stderr


@pytest.mark.parametrize("path", ["/", "/usr", "/etc", "/bin", "/dev"])
def test_root_and_system_dirs_are_read_only(path):
    result = exec_("--", "sh", "-c", f"touch {path}/x 2>&1 || true")
    assert b"Read-only file system" in result.stdout or b"Permission denied" in result.stdout


def test_mounts_carry_ro_nosuid_nodev_and_proc_sys_is_read_only():
    result = exec_("--", "cat", "/proc/self/mountinfo")
    mounts = {line.split()[4]: line.split()[5].split(",") for line in
              result.stdout.decode().splitlines()}
    for point in ("/", "/usr", "/proc/sys", "/dev"):
        assert "ro" in mounts[point], (point, mounts[point])
    for point, options in mounts.items():
        if not point.startswith("/dev/") and point != "/dev":
            assert "nosuid" in options, point
    assert "rw" in mounts["/tmp"] and "rw" in mounts["/box"]


def test_tmp_and_workdir_are_writable_and_size_capped():
    result = exec_("--tmp-size", "1M", "--work-size", "1M", "--", "sh", "-c",
                   "echo ok > /tmp/a && echo ok > /box/a && cat /tmp/a /box/a && "
                   "dd if=/dev/zero of=/tmp/big bs=64k count=64 2>&1")
    assert result.stdout.startswith(b"ok\nok\n")
    assert b"No space left on device" in result.stdout


def test_environment_is_an_explicit_allowlist():
    os.environ["SANDBOX_TEST_SECRET"] = "leak"
    try:
        result = exec_("--env", "EXTRA=1", "--", "env")
    finally:
        del os.environ["SANDBOX_TEST_SECRET"]
    names = sorted(line.split(b"=", 1)[0] for line in result.stdout.splitlines())
    assert names == [b"EXTRA", b"HOME", b"LANG", b"PATH", b"TMPDIR"]


def test_identity_hostname_and_workdir():
    result = exec_("--", "sh", "-c", "id -u; id -g; hostname; pwd; cat /etc/hostname")
    assert result.stdout == b"1000\n1000\nbox\n/box\nbox\n"


def test_wall_time_limit_kills_and_is_reported(tmp_path):
    report = tmp_path / "r.json"
    result = exec_("--wall-time", "0.3", "--", "sleep", "5", report=report)
    data = json.loads(report.read_text())
    assert result.returncode == 137
    assert data["verdict"] == "wall_time_limit" and data["limit_fired"] == "wall_time"
    assert 0.3 <= data["wall_time"] < 0.6


def test_policy_selects_the_compile_profile(tmp_path):
    report = tmp_path / "r.json"
    result = exec_("--policy", str(ROOT / "policies/default.toml"), "--purpose", "compile",
                   "--language", "cpp", "--", "true", report=report)
    assert result.returncode == 0
    assert json.loads(report.read_text())["profile"] == "compile"


def test_policy_clamps_and_says_so(tmp_path):
    result = exec_("--policy", str(ROOT / "policies/default.toml"), "--purpose", "run",
                   "--memory", "64G", "--", "true")
    assert result.returncode == 0
    assert b"clamped by policy: memory" in result.stderr


def test_compile_profile_builds_and_runs_a_c_program(tmp_path, gcc):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.c").write_text('#include <stdio.h>\nint main(){puts("compiled");return 0;}\n')
    os.chmod(tmp_path, 0o755)
    os.chmod(src, 0o755)
    result = exec_("--profile", "compile", "--ro-bind", f"{src}:/box/src", "--", "sh", "-c",
                   "gcc -O2 -o /tmp/a /box/src/a.c && /tmp/a")
    assert result.stdout == b"compiled\n", result.stderr


def test_profile_show_check_list_and_policy_explain(tmp_path):
    shown = run_cli("profile", "show", "compile")
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == "compile"
    assert b"strict" in run_cli("profile", "list").stdout
    good = run_cli("profile", "check", str(ROOT / "profiles/standard.toml"))
    assert good.returncode == 0 and b": ok" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nwall_time = 1\nbogus = 2\n")
    checked = run_cli("profile", "check", str(bad))
    assert checked.returncode == 125 and b"limits.bogus: unknown key" in checked.stderr
    explained = run_cli("policy", "explain", str(ROOT / "policies/default.toml"), "--purpose",
                        "compile", "--language", "c")
    assert explained.returncode == 0
    assert b"profile: compile (matched by rule 'compile C and C++')" in explained.stdout


def test_doctor_passes_on_this_host():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stdout
    assert b"strict can be honoured on this host" in result.stdout


def test_json_log_event_per_run():
    result = run_cli("--log-format", "json", "--log-level", "info", "exec", "--", "true")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["box_finished"]
    assert events[0]["verdict"] == "ok" and "cpu_time" in events[0]


def test_python_dash_m_works():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sandbox", "exec", "--", "echo", "m"],
                            capture_output=True)
    assert result.stdout == b"m\n"


@pytest.mark.parametrize(("target", "message"), [
    ("/box/../etc", b"must not contain '..'"),
    ("/proc/x", b"outside /, /proc and /dev"),
    ("/bin/zzz", b"/bin is a symlink in the image"),
])
def test_bind_targets_that_would_escape_or_shadow_are_refused(tmp_path, target, message):
    os.chmod(tmp_path, 0o755)
    result = exec_("--ro-bind", f"{tmp_path}:{target}", "--", "true")
    assert result.returncode == 125
    assert message in result.stderr


def test_closed_standard_descriptors_become_dev_null():
    import subprocess

    from tests.conftest import SANDBOX

    script = f"exec 0<&-; {SANDBOX} exec -- readlink /proc/self/fd/0"
    result = subprocess.run(["sh", "-c", script], capture_output=True)
    assert result.returncode == 0 and result.stdout == b"/dev/null\n"
