"""`sandbox exec` end to end on the real kernel: exit codes, stdio, binds, the root, reports."""

import json
import os
import sys
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
    assert data["verdict"] == "ok" and data["profile"] == "strict" and data["schema"] == 2
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
    assert b"rule 'compile C and C++' matches: profile compile\n" in explained.stdout
    checked = run_cli("policy", "check", str(ROOT / "policies/default.toml"))
    assert checked.returncode == 0 and b": ok (" in checked.stdout


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
    ("/bin/zzz", b"read-only system directory"),
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


POLICY_WITH_TENANT = """\
default_profile = "strict"
[[rule]]
name = "acme compiles"
tenant = "acme"
profile = "compile"
[ceilings]
memory = "100M"
"""

# Every limit flag, a value, and what the report must show for it (--root-size: below).
LIMIT_FLAGS = [
    ("--wall-time", "3", "wall_time", 3.0), ("--cpu-time", "2", "cpu_time", 2.0),
    ("--memory", "64M", "memory", 64 << 20), ("--pids", "8", "pids", 8),
    ("--address-space", "512M", "address_space", 512 << 20),
    ("--fsize", "1M", "fsize", 1 << 20), ("--open-files", "32", "open_files", 32),
    ("--stack", "8M", "stack", 8 << 20), ("--output-limit", "1M", "output", 1 << 20),
    ("--tmp-size", "2M", "tmp_size", 2 << 20), ("--work-size", "2M", "work_size", 2 << 20),
    ("--extra-time", "200ms", "extra_time", 0.2), ("--cpu-quota", "1.5", "cpu_quota", 1.5),
    ("--cpus", "0", "cpus", [0]),
]


def test_the_flag_table_covers_every_limit():
    from sandbox.limits import LIMITS

    assert {name for _, _, name, _ in LIMIT_FLAGS} | {"root_size"} == set(LIMITS)
    assert {flag for flag, *_ in LIMIT_FLAGS} | {"--root-size"} == {e.flag for e in LIMITS.values()}


@pytest.mark.parametrize(("flag", "value", "name", "expected"), LIMIT_FLAGS,
                         ids=[f for f, *_ in LIMIT_FLAGS])
def test_every_limit_flag_works_from_the_command_line(tmp_path, flag, value, name, expected):
    report = tmp_path / "r.json"
    result = exec_(flag, value, "--", "true", report=report)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["limits"][name]["value"] == expected


def test_count_cpu_and_root_flags_take_effect_in_the_box():
    result = exec_("--open-files", "32", "--stack", "8M", "--cpus", "0", "--root-size", "1M",
                   "--", "sh", "-c", "ulimit -n; ulimit -s; nproc; echo w > /new && cat /new; "
                   "head -c 8000000 /dev/zero > /big 2>/dev/null || echo full")
    assert result.stdout == b"32\n8192\n1\nw\nfull\n", result.stderr


def test_tenant_selects_by_policy_for_exec_and_explain(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text(POLICY_WITH_TENANT)
    report = tmp_path / "r.json"
    result = exec_("--policy", str(policy), "--tenant", "acme", "--", "true", report=report)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["profile"] == "compile"
    assert b"clamped by policy: memory: 1G -> 100M" in result.stderr
    explained = run_cli("policy", "explain", str(policy), "--tenant", "acme")
    lines = explained.stdout.decode().splitlines()
    assert explained.returncode == 0
    assert lines[0] == f"policy {policy}, request: tenant=acme"
    assert lines[1] == "rule 'acme compiles' matches: profile compile"
    assert "  memory         100M  (the profile asks 1G; ceilings.memory)" in lines
    assert "  wall_time      30s" in lines and "  cpus           all" in lines
    assert "  root_size      none (read-only root)" in lines
    other = run_cli("policy", "explain", str(policy), "--tenant", "other")
    assert b"no rule matches: the policy's default_profile, strict\n" in other.stdout


def test_request_attributes_without_a_policy_are_refused():
    for attribute in ("--purpose", "--language", "--tenant"):
        result = exec_(attribute, "x", "--", "true")
        assert result.returncode == 125
        assert b"no policy is given" in result.stderr and b"hint: add --policy" in result.stderr


@pytest.mark.parametrize(("args", "command"), [
    (["exec", "--bogus", "--", "true"], "sandbox exec"), ([], "sandbox"),
    (["exec", "--log-level", "loud", "--", "true"], "sandbox exec"),
    (["profile"], "sandbox profile"), (["image", "save", "x"], "sandbox image save"),
    (["policy", "explain"], "sandbox policy explain"),
])
def test_usage_errors_exit_125_with_one_line_and_a_hint(args, command):
    result = run_cli(*args)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 125, result
    assert len(lines) == 2 and lines[0].startswith("sandbox: error: command line: ")
    assert lines[1] == f"sandbox: hint: see '{command} --help'"


def test_version_and_help_still_exit_0():
    assert run_cli("--version").stdout.startswith(b"sandbox ")
    assert run_cli("exec", "--help").returncode == 0


def test_log_options_work_after_the_subcommand():
    result = run_cli("exec", "--log-format", "json", "--log-level", "info", "--", "true")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr)["event"] == "box_finished"
    nested = run_cli("profile", "list", "--log-level", "debug")
    assert nested.returncode == 0 and b"strict" in nested.stdout


@pytest.mark.parametrize("args", [["profile", "show", "strict"], ["profile", "list"],
                                  ["policy", "explain", str(ROOT / "policies/default.toml")],
                                  ["image", "ls"]])
def test_a_closed_output_pipe_ends_the_cli_quietly(args):
    import subprocess

    from tests.conftest import SANDBOX

    read_end, write_end = os.pipe()
    os.close(read_end)  # `sandbox ... | head` after head exited
    try:
        result = subprocess.run([SANDBOX, *args], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == b""


@pytest.mark.parametrize("target", ["/", "/usr", "/usr/local/x", "/usr/share/doc", "/bin",
                                    "/sbin/x", "/lib", "/lib64/x", "/etc", "/etc/passwd"])
def test_binds_onto_read_only_system_dirs_are_refused_up_front(tmp_path, target):
    os.chmod(tmp_path, 0o755)
    result = exec_("--ro-bind", f"{tmp_path}:{target}", "--", "true")
    assert result.returncode == 125
    assert b"read-only system directory" in result.stderr
    assert b"hint: bind under /box or /tmp" in result.stderr


@pytest.mark.parametrize("target", ["/data", "/opt/x", "/usrlocal", "/etcetera", "/tmp/x"])
def test_binds_next_to_system_dirs_still_work(tmp_path, target):
    (tmp_path / "f").write_text("seen\n")
    os.chmod(tmp_path, 0o755)
    result = exec_("--ro-bind", f"{tmp_path}:{target}", "--", "cat", f"{target}/f")
    assert result.stdout == b"seen\n", result.stderr


def test_a_size_without_a_unit_that_is_surely_bytes_is_refused():
    result = exec_("--memory", "256", "--", "true")
    assert result.returncode == 125 and b"did you mean 256M?" in result.stderr
    assert exec_("--memory", "256M", "--", "true").returncode == 0


def test_arguments_over_the_kernel_limit_are_refused_and_large_ones_pass():
    many = [str(i) * 100_000 for i in range(3)]  # 300 KB: over a quarter of a 1M stack
    refused = exec_("--stack", "1M", "--", "sh", "-c", "echo $#", "sh", *many)
    assert refused.returncode == 125 and b"ARG_MAX" in refused.stderr
    result = exec_("--stack", "8M", "--", "sh", "-c", "echo $#", "sh", *many)
    assert result.stdout == b"3\n", result.stderr


def test_image_flags_build_ls_tag_rm(tmp_path):
    context = tmp_path / "ctx"
    context.mkdir()
    (tmp_path / "Buildfile").write_text("FROM scratch\nBUNDLE /bin/sh\nCMD [\"/bin/sh\"]\n")
    built = run_cli("image", "build", "-f", str(tmp_path / "Buildfile"), "-t", "cli/flags:1",
                    str(context), timeout=300)
    assert built.returncode == 0, built.stderr
    tagged = run_cli("image", "tag", "cli/flags:1", "cli/flags:2")
    assert tagged.returncode == 0 and tagged.stdout == b"tagged cli/flags:2\n"
    listed = run_cli("image", "ls").stdout.decode().splitlines()
    assert listed[0].split() == ["NAME", "DIGEST", "LAYERS", "SIZE"]
    assert {line.split()[0] for line in listed[1:]} >= {"cli/flags:1", "cli/flags:2"}
    assert run_cli("image", "rm", "cli/flags:2").returncode == 0
    assert "cli/flags:2" not in run_cli("image", "ls").stdout.decode()


def test_an_image_tag_is_checked_before_the_build_runs(tmp_path):
    result = run_cli("image", "build", "-t", "Bad:Tag!", str(tmp_path / "no-context"))
    assert result.returncode == 125 and b"bad tag 'Tag!'" in result.stderr
    digest = run_cli("image", "load", "-i", str(tmp_path / "none"), "-t", "a@sha256:" + "0" * 64)
    assert digest.returncode == 125 and b"cannot tag with a digest" in digest.stderr


def test_every_option_of_every_subcommand_is_used_by_a_test():
    import argparse

    from sandbox.cli import _parser

    sources = "".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    missing = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in dict.fromkeys(action.choices.values()):
                    walk(child)
            elif action.option_strings and action.dest != "help" and not any(
                    f'"{o}"' in sources for o in action.option_strings):
                missing.append(f"{parser.prog} {action.option_strings[0]}")

    walk(_parser(complete=True))
    assert not missing


def test_doctor_tells_whether_linked_groups_can_run(tmp_path):
    """Without nft a linked group is refused; doctor warns (strict does not need it)."""
    here = run_cli("doctor")
    assert b"[ok  ] linked groups: nsenter and nft found" in here.stdout
    python_dir = os.path.dirname(os.path.realpath(sys.executable))
    without = run_cli("doctor", env={**os.environ, "PATH": python_dir})
    assert b"[warn] linked groups: missing: nsenter, nft" in without.stdout
    assert b"fix: apt-get install nftables" in without.stdout


def test_a_setup_failure_is_reported_as_phase_operation_and_errno(tmp_path):
    """A bind whose mount point would be inside a bound file fails while the root is built,
    before the runner is ready: the report is still written (sandbox_error, exit 125), the
    box's own words on why reach it as an object, and the line on stderr is made from it."""
    source = tmp_path / "file"
    source.write_text("x\n")
    os.chmod(tmp_path, 0o755)
    report = tmp_path / "report.json"
    result = run_cli("exec", "--bind", f"{source}:/data", "--bind", f"{tmp_path}:/data/x",
                     "--report", str(report), "--", "true")
    assert result.returncode == 125
    data = json.loads(report.read_text())
    assert data["schema"] == 2 and data["verdict"] == "sandbox_error"
    # The mount point /data/x would be inside the bound file: mkdir under it fails.
    failure = data["setup_error"]
    assert failure == {"phase": "mount_root", "operation": failure["operation"], "errno": 20,
                       "errno_name": "ENOTDIR", "detail": "Not a directory"}
    assert failure["operation"].endswith("/data/x")
    line = f"box setup failed in phase mount_root: {failure['operation']}: Not a directory"
    assert data["error"] == line
    assert f"sandbox: {line}".encode() in result.stderr
