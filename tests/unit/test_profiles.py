"""Profile loading: bundled profiles, inheritance, and errors that name file, key and fix."""

from pathlib import Path

import pytest

from sandbox.errors import ConfigError
from sandbox.profiles import list_profiles, load_profile
from sandbox.spec import NetworkMode, SeccompAction


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def test_bundled_profiles_load_and_extend_strict():
    strict, standard, compile_ = (load_profile(n) for n in ("strict", "standard", "compile"))
    assert {"strict", "standard", "compile"} <= set(list_profiles())
    assert strict.network is NetworkMode.NONE and strict.uid != 0
    assert standard.network is NetworkMode.LOOPBACK
    assert compile_.limits.pids > strict.limits.pids
    assert compile_.limits.work_size > strict.limits.work_size
    assert compile_.env == strict.env  # inherited untouched
    assert len({p.content_hash for p in (strict, standard, compile_)}) == 3


def test_extends_merges_tables_and_replaces_values(tmp_path):
    path = write(tmp_path, "child", 'extends = "strict"\n[limits]\nmemory = "32M"\n')
    child, strict = load_profile(path), load_profile("strict")
    assert child.limits.memory == 32 << 20
    assert child.limits.wall_time == strict.limits.wall_time
    assert child.seccomp == strict.seccomp
    assert child.name == "child"


def test_extends_finds_siblings_first(tmp_path):
    write(tmp_path, "base", '[limits]\nwall_time = 3\n')
    child = load_profile(write(tmp_path, "leaf", 'extends = "base"\n'))
    assert child.limits.wall_time == 3


def test_inheritance_cycles_are_reported(tmp_path):
    write(tmp_path, "a", 'extends = "b"\n[limits]\nwall_time = 1\n')
    write(tmp_path, "b", 'extends = "a"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_profile(str(tmp_path / "a.toml"))


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('[limits]\nwall_time = 1\nmemroy = "1M"\n', "limits.memroy", "unknown key"),
    ('[limits]\nwall_time = 1\nmemory = "lots"\n', "limits.memory", "expected a size"),
    ('[limits]\nwall_time = 1\npids = 0\n', "limits.pids", "> 0"),
    ('[limits]\nmemory = "1M"\n', "limits.wall_time", "needs a wall-time"),
    ('[limits]\nwall_time = 1\n[box]\nuid = 0\n', "box.uid", "never 0"),
    ('[limits]\nwall_time = 1\n[box]\nnetwork = "host"\n', "box.network", "'none'"),
    ('[limits]\nwall_time = 1\n[box]\nworkdir = "box"\n', "box.workdir", "absolute"),
    ('[limits]\nwall_time = 1\n[seccomp]\nallow = ["@nope"]\n', "seccomp.allow", "@nope"),
    ('[limits]\nwall_time = 1\n[seccomp]\nallow = ["read", "no_such_call"]\n', "seccomp.allow",
     "no_such_call"),
    ('[limits]\nwall_time = 1\n[seccomp]\ndefault = "allow"\n', "seccomp.default", "allowlist"),
    ('[limits]\nwall_time = 1\n[[seccomp.rule]]\nsyscalls = ["read"]\naction = "errno"\n'
     'errno = "ENOPE"\n', "seccomp.rule[0].errno", "errno name"),
    ('[limits]\nwall_time = 1\n[env]\n"BAD-NAME" = "x"\n', "env.BAD-NAME", "NAME"),
    ("surprise = 1\n", "surprise", "unknown key"),
    ("[limits\n", None, "not valid TOML"),
    ('[limits]\nwall_time = 1\n[seccomp]\nsocket_families = [[1]]\n',
     "seccomp.socket_families", "socket family names"),
    ('[limits]\nwall_time = 1\ntmp_size = 1180591620717411303424\n', "limits.tmp_size",
     "4 EiB"),
])
def test_invalid_profiles_name_file_and_key(tmp_path, text, key, problem):
    path = write(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.source == path
    assert info.value.key == key
    assert problem in str(info.value)


def test_the_old_namespace_clone_key_names_its_unsafe_successor(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('extends = "strict"\n[seccomp]\nnamespace_clone = true\n')
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    assert info.value.key == "seccomp.namespace_clone"
    assert "seccomp.unsafe_namespace_clone" in (info.value.hint or "")


def test_unknown_profile_name_lists_where_it_looked():
    with pytest.raises(ConfigError, match="no such profile") as info:
        load_profile("does-not-exist")
    assert "profiles" in (info.value.hint or "")


def test_seccomp_rules_keep_actions_and_errnos(tmp_path):
    path = write(tmp_path, "p", '[limits]\nwall_time = 1\n[seccomp]\nallow = ["@basic"]\n'
                 '[[seccomp.rule]]\nsyscalls = ["uname"]\naction = "errno"\nerrno = "EPERM"\n')
    rules = load_profile(path).seccomp.rules
    assert rules[0].action is SeccompAction.ALLOW and "brk" in rules[0].syscalls
    assert rules[1].syscalls == ("uname",) and rules[1].errno == 1


def test_a_missing_parent_names_the_file_and_its_extends_key(tmp_path):
    path = write(tmp_path, "child", 'extends = "no-such-parent"\n')
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert (info.value.source, info.value.key) == (str(tmp_path / "child.toml"), "extends")
    assert "'no-such-parent': no such profile" in info.value.problem
    assert "profiles" in (info.value.hint or "")


@pytest.mark.parametrize(("limit", "value", "problem"), [
    ("memory", 256, "did you mean 256M?"), ("memory", "256", "did you mean 256M?"),
    ("memory", "512K", "at least 1M"), ("stack", 4096, "did you mean 4096M?"),
    ("tmp_size", "1K", "at least 4K"), ("work_size", 100, "did you mean 100M?"),
    ("root_size", "2K", "at least 4K"), ("pids", "0", "> 0"), ("pids", 1 << 23, "at most"),
    ("open_files", "many", "whole number"), ("cpu_quota", "nan", "0.01 to 4096"),
])
def test_sizes_below_their_floor_and_bad_counts_are_refused(tmp_path, limit, value, problem):
    text = f'"{value}"' if isinstance(value, str) else str(value)
    path = write(tmp_path, "p", f"[limits]\nwall_time = 1\n{limit} = {text}\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.key == f"limits.{limit}" and problem in info.value.problem


def test_floors_and_counts_accept_the_smallest_sensible_values(tmp_path):
    path = write(tmp_path, "p", '[limits]\nwall_time = 1\nmemory = "1M"\nstack = "64K"\n'
                 'tmp_size = 4096\nfsize = 1\noutput = 1\npids = "16"\nopen_files = 1048576\n')
    limits = load_profile(path).limits
    assert (limits.memory, limits.stack, limits.tmp_size) == (1 << 20, 64 << 10, 4096)
    assert (limits.fsize, limits.output, limits.pids, limits.open_files) == (1, 1, 16, 1 << 20)
