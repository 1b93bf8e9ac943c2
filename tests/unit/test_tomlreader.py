"""The one TOML reader: keys it was not given are refused, and every error names the file and
the whole dotted key."""

import pytest

from sandbox.errors import BuildFileError, ConfigError
from sandbox.group import load_group
from sandbox.image.buildfile import parse_buildfile
from sandbox.spec import NetworkMode
from sandbox.tomlreader import Table


def doc() -> Table:
    data = {"name": "x", "n": 3, "flag": True, "box": {"network": "none", "deep": {"k": 1}},
            "rule": [{"syscalls": ["read"]}, {"syscalls": "write"}], "env": {"ANY_KEY": "v"}}
    return Table("f.toml", data, {"name", "n", "flag", "box", "rule", "env"})


def problem(call) -> tuple[str | None, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.source == "f.toml"
    return info.value.key, info.value.problem


def test_unknown_keys_are_refused_at_their_dotted_path():
    assert problem(lambda: Table("f.toml", {"a": 1, "b": 2}, {"a"}))[0] == "b"
    key, text = problem(lambda: doc().table("box", {"network"}))
    assert key == "box.deep" and "unknown key (expected one of network)" in text
    key, _ = problem(lambda: doc().table("box", {"network", "deep"}).table("deep", {"j"}))
    assert key == "box.deep.k"


def test_typed_getters_name_the_key_and_what_was_expected():
    t = doc()
    assert (t.string("name"), t.integer("n"), t.boolean("flag")) == ("x", 3, True)
    assert problem(lambda: t.integer("flag")) == ("flag", "expected int, got True")
    assert problem(lambda: t.string("n", expected="a name")) == ("n", "expected a name, got 3")
    assert problem(lambda: t.boolean("name")) == ("name", "expected bool, got 'x'")
    assert problem(lambda: t.string("absent")) == ("absent", "missing")
    assert t.string("absent", "default") == "default" and t.optional_string("absent") is None
    box = t.table("box", {"network", "deep"})
    assert box.enum("network", NetworkMode) is NetworkMode.NONE
    assert "expected one of" in problem(lambda: t.enum("name", NetworkMode))[1]


def test_arrays_of_tables_carry_their_index():
    rules = doc().tables("rule", {"syscalls"})
    assert rules[0].strings("syscalls") == ["read"]
    assert problem(lambda: rules[1].strings("syscalls"))[0] == "rule[1].syscalls"
    assert problem(lambda: doc().tables("name", {"x"})) == ("name", "expected an array")


def test_a_table_whose_keys_are_data_takes_any_key():
    assert dict(doc().table("env", None)) == {"ANY_KEY": "v"}
    assert problem(lambda: doc().table("name", None)) == ("name", "expected a table")


@pytest.mark.parametrize(("text", "key"), [
    ('[[box]]\nname = "a"\ncommand = ["true"]\n[[box.bind]]\nsource = "x"\ntarget = "/y"\n'
     'writable = "yes"\n', "box 'a'.bind[0].writable"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\npurpose = 3\n', "box 'a'.purpose"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\nsurprise = 1\n', "box 'a'.surprise"),
    ('[[box]]\nname = "a"\ncommand = ["true"]\nlimits = 3\n', "box 'a'.limits"),
    ('name = 3\n[[box]]\nname = "a"\ncommand = ["true"]\n', "name"),
])
def test_group_files_are_read_with_the_same_rules(tmp_path, text, key):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_group(path)
    assert (info.value.source, info.value.key) == (str(path), key)


def test_build_file_errors_name_the_file_and_line():
    with pytest.raises(BuildFileError) as info:
        parse_buildfile("FROM scratch\nBOGUS x\n", "Buildfile")
    assert (info.value.source, info.value.line) == ("Buildfile", 2)
    assert str(info.value) == f"Buildfile:2: {info.value.problem}"
