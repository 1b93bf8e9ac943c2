"""Policies: rule selection, ceilings that clamp, and what a policy forbids."""

from pathlib import Path

import pytest

from sandbox.errors import ConfigError
from sandbox.policy import load_policy
from sandbox.request import Request, resolve
from sandbox.spec import Bind

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "policies" / "default.toml"


def test_default_policy_selects_compile_for_cpp_and_strict_for_runs():
    policy = load_policy(DEFAULT)
    assert policy.select({"purpose": "compile", "language": "cpp"})[0] == "compile"
    assert policy.select({"purpose": "compile", "language": "c"})[0] == "compile"
    assert policy.select({"purpose": "run", "language": "cpp"})[0] == "strict"
    assert policy.select({"purpose": "compile", "language": "rust"}) == (
        "strict", "default_profile")


def test_a_policy_name_finds_the_bundled_file_and_paths_stay_paths(tmp_path, monkeypatch):
    assert load_policy("default").source == str(ROOT / "sandbox" / "data" / "policies" /
                                                 "default.toml")
    assert Path(load_policy("default").source).resolve() == DEFAULT
    with pytest.raises(ConfigError, match="no such policy") as info:
        load_policy("nonesuch")
    assert "/etc/sandbox/policies" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="lower-case"):
        load_policy("Default")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"default\.toml"):
        load_policy("default.toml")  # a file name is a path, relative to the current directory


def test_boundary_values_do_not_match_by_prefix():
    policy = load_policy(DEFAULT)
    assert policy.select({"purpose": "compile", "language": "cpp2"})[0] == "strict"
    assert policy.select({"purpose": "compiler", "language": "c"})[0] == "strict"


def test_no_rule_and_no_default_is_an_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[rule]]\npurpose = "run"\nprofile = "strict"\n')
    with pytest.raises(ConfigError, match="no rule matches"):
        load_policy(path).select({"purpose": "compile"})


def test_requests_are_clamped_to_ceilings(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('default_profile = "strict"\n[ceilings]\nmemory = "100M"\nwall_time = 2\n')
    spec = resolve(Request(argv=["true"], policy=path, limits={"memory": "1G"}))
    assert spec.limits.memory == 100 << 20
    assert spec.limits.wall_time == 2
    assert any(note.startswith("memory:") for note in spec.clamped)


def test_requests_may_tighten_below_the_ceiling(tmp_path):
    spec = resolve(Request(argv=["true"], policy=DEFAULT, attributes={"purpose": "run"},
                           limits={"memory": "8M", "wall_time": "250ms"}))
    assert spec.limits.memory == 8 << 20 and spec.limits.wall_time == 0.25
    assert spec.clamped == ()


def test_policy_refuses_writable_binds_and_foreign_networks(tmp_path):
    with pytest.raises(ConfigError, match="read-only binds only"):
        resolve(Request(argv=["true"], policy=DEFAULT, binds=[Bind("/tmp", "/box/t", True)]))
    with pytest.raises(ConfigError, match="network 'loopback'"):
        policy = tmp_path / "p.toml"
        policy.write_text('default_profile = "standard"\n')
        resolve(Request(argv=["true"], policy=policy))


def test_policy_and_profile_must_agree():
    with pytest.raises(ConfigError, match="selects profile 'strict'"):
        resolve(Request(argv=["true"], policy=DEFAULT, profile="compile",
                        attributes={"purpose": "run"}))


@pytest.mark.parametrize(("text", "key"), [
    ("surprise = 1\n", "surprise"),
    ('[ceilings]\nmemory = "x"\n', "ceilings.memory"),
    ('[ceilings]\nbogus = 1\n', "ceilings.bogus"),
    ('[[rule]]\nprofile = 3\n', "rule[0].profile"),
    ('[[rule]]\nprofile = "strict"\nlanguage = []\n', "rule[0].language"),
    ('[allow]\nnetworks = ["internet"]\n', "allow.networks"),
])
def test_invalid_policies_name_the_key(tmp_path, text, key):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert info.value.key == key and info.value.source == str(path)


@pytest.mark.parametrize(("argv", "problem"), [([], "non-empty"), ([""], "non-empty"),
                                                (["a\0b"], "NUL")])
def test_bad_commands_are_refused(argv, problem):
    with pytest.raises(ConfigError, match=problem):
        resolve(Request(argv=argv))


def test_bad_request_limits_name_the_limit():
    with pytest.raises(ConfigError) as info:
        resolve(Request(argv=["true"], limits={"memory": "-5"}))
    assert info.value.key == "memory"


def test_clamp_notes_show_units(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('default_profile = "strict"\n[ceilings]\nmemory = "100M"\nwall_time = 2\n')
    spec = resolve(Request(argv=["true"], policy=path))
    assert f"memory: 256M -> 100M ({path}: ceilings.memory)" in spec.clamped
    assert f"wall_time: 10s -> 2s ({path}: ceilings.wall_time)" in spec.clamped


@pytest.mark.parametrize("attributes", [{"purpose": "run"}, {"language": "c"}, {"tenant": "t"}])
def test_attributes_without_a_policy_are_refused(attributes):
    with pytest.raises(ConfigError, match="no policy is given"):
        resolve(Request(argv=["true"], attributes=attributes))


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("argv", "ls -l", "expected a list of strings"), ("argv", [b"ls"], "to be a string"),
    ("profile", 123, "name or path"), ("image", ["x"], "name or path"), ("policy", 1, "a path"),
    ("binds", "/a:/b", "list of binds"), ("env", ["A=1"], "mapping"), ("limits", 3, "mapping"),
    ("env", {"A": 1}, "strings"),
])
def test_request_fields_of_the_wrong_type_are_config_errors(field, value, problem):
    request = Request(argv=["true"], **{field: value}) if field != "argv" else Request(argv=value)
    with pytest.raises(ConfigError, match=problem):
        resolve(request)


@pytest.mark.parametrize(("target", "refused"), [
    ("/", True), ("/usr", True), ("/usr/lib/x", True), ("/bin", True), ("/sbin/x", True),
    ("/lib", True), ("/lib64", True), ("/libx32/y", True), ("/etc", True), ("/etc/ssl/x", True),
    ("//usr/x", True), ("/usr/", True), ("/box/x", False), ("/data", False), ("/usrx", False),
    ("/etcetera/x", False), ("/tmp/usr", False), ("/opt", False),
])
def test_binds_onto_system_dirs_are_refused_by_resolve(target, refused):
    request = Request(argv=["true"], binds=[Bind("/tmp", target)])
    if refused:
        with pytest.raises(ConfigError, match="read-only system directory") as info:
            resolve(request)
        assert "/box" in (info.value.hint or "")
    else:
        assert resolve(request).binds == (Bind("/tmp", target),)


def _execs(argv: list[str], stack: int) -> bool:
    import errno
    import resource
    import subprocess

    def limit_stack() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, (stack, stack))

    try:
        subprocess.run(argv, env={}, preexec_fn=limit_stack, check=True)
    except OSError as e:
        assert e.errno == errno.E2BIG
        return False
    return True


@pytest.mark.parametrize(("total", "fits"), [(1_950_000, True), (2_150_000, False)])
def test_the_exec_size_check_agrees_with_the_kernel(total, fits):
    argv = ["/bin/true", *(str(i % 10) * 99_999 + "x" for i in range(total // 100_000))]
    request = Request(argv=argv, limits={"stack": "8M"})  # the kernel's limit: 2 MiB
    assert _execs(argv, 8 << 20) is fits  # the control: the kernel itself, no sandbox
    if fits:
        resolve(request)
    else:
        with pytest.raises(ConfigError, match="ARG_MAX"):
            resolve(request)


def test_one_string_over_max_arg_strlen_is_refused():
    with pytest.raises(ConfigError, match="MAX_ARG_STRLEN") as info:
        resolve(Request(argv=["echo", "x" * (128 << 10)]))
    assert info.value.key == "argv[1]"
    with pytest.raises(ConfigError, match="MAX_ARG_STRLEN") as info:
        resolve(Request(argv=["true"], env={"BIG": "x" * (128 << 10)}))
    assert info.value.key == "env.BIG"
    assert _execs(["/bin/true", "x" * (128 << 10)], 8 << 20) is False  # the kernel agrees
    resolve(Request(argv=["echo", "x" * ((128 << 10) - 1)]))


def test_every_spec_is_validated_however_it_is_made():
    """Spec's own check holds for resolve, dataclasses.replace and a build step alike."""
    import dataclasses

    from sandbox.spec import BUILD_STEP_ID, build_step_spec

    spec = resolve(Request(argv=["true"]))
    with pytest.raises(ConfigError, match="read-only system directory"):
        dataclasses.replace(spec, binds=(Bind("/tmp", "/usr/lib"),))
    with pytest.raises(ConfigError, match="NUL"):
        dataclasses.replace(spec, argv=("a\0b",))
    with pytest.raises(ConfigError, match="MAX_ARG_STRLEN"):
        dataclasses.replace(spec, argv=("echo", "x" * (128 << 10)))
    root = dataclasses.replace(spec.profile, uid=BUILD_STEP_ID, gid=BUILD_STEP_ID)
    with pytest.raises(ConfigError, match="only a build step's"):
        dataclasses.replace(spec, profile=root)
    step = build_step_spec(spec.profile, ("true",), env=(), cwd="/", step="1/1",
                           layers=(), store="/nonexistent", upper="/nonexistent/upper")
    assert step.profile.uid == BUILD_STEP_ID and step.image is not None
    assert dataclasses.replace(spec, argv=()).argv == ()  # a warm box's shape has no command
