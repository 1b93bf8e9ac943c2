"""The filter cache: a stored program is used only when it is whole, the caller's and reached
without a symlink; anything else is ignored, compiled again and rewritten."""

import dataclasses
import errno
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.box import seccomp
from sandbox.profiles import load_profile
from sandbox.spec import SeccompAction, SeccompRule


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A state dir of this test's own and no filter kept in memory from an earlier test."""
    monkeypatch.setenv("SANDBOX_HOME", str(tmp_path / "home"))
    seccomp.compile_filter.cache_clear()
    yield tmp_path / "home"
    seccomp.compile_filter.cache_clear()


REAL_COMPILE = seccomp._compile
#: One instruction, SECCOMP_RET_ALLOW: what a planted or stale file must never smuggle in.
ALLOW_ALL = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF_0000)


@pytest.fixture()
def compiles(monkeypatch):
    """Counts the filters really compiled (rather than read back from the cache)."""
    calls = []

    def counting(policy, notify):
        calls.append(notify)
        return REAL_COMPILE(policy, notify)

    monkeypatch.setattr(seccomp, "_compile", counting)
    return calls


def strict():
    return load_profile("strict").seccomp


def stored(home: Path) -> list[Path]:
    return sorted((home / "seccomp").glob("*.bpf"))


def fresh(policy, *, notify=True) -> bytes:
    """The program as compiled now, from nothing."""
    return REAL_COMPILE(policy, notify)


def entry(policy, notify, program) -> bytes:
    """A cache file that passes every check of its content, for ``program``."""
    key = bytes.fromhex(seccomp._cache_key(policy, notify))
    digest = hashlib.sha256(program).digest()
    return seccomp._CACHE_HEADER.pack(seccomp._CACHE_MAGIC, key, len(program), digest) + program


def test_a_well_formed_entry_is_what_the_cache_returns(home, compiles):
    """The premise of the tests below: a file like this one would be used, were it trusted."""
    seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    path.write_bytes(entry(strict(), True, ALLOW_ALL))
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == ALLOW_ALL
    assert compiles == [True]


def test_a_compiled_filter_is_stored_private_and_read_back(home, compiles):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    assert os.stat(home / "seccomp").st_mode & 0o777 == 0o700
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    seccomp.compile_filter.cache_clear()  # a new process: only the file is left
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True]
    assert program == fresh(strict())


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "empty", "magic", "length"])
def test_a_damaged_file_is_ignored_and_rewritten(home, compiles, damage):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    data = bytearray(path.read_bytes())
    header = seccomp._CACHE_HEADER.size
    if damage == "flip":
        data[header + 5] ^= 0x01  # one bit of one instruction
    elif damage == "truncate":
        del data[-8:]  # one whole instruction less
    elif damage == "extend":
        data += data[-8:]
    elif damage == "empty":
        data = bytearray()
    elif damage == "magic":
        data[0] ^= 0xFF
    else:  # a header that agrees with a shorter program, whose checksum it lacks
        data[header - 36 : header - 32] = (len(program) - 8).to_bytes(4, "little")
        del data[-8:]
    path.write_bytes(bytes(data))
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True]
    assert path.read_bytes() != bytes(data) and len(path.read_bytes()) == header + len(program)


def test_a_file_of_another_owner_or_open_to_others_is_ignored(home, compiles):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    path.write_bytes(entry(strict(), True, ALLOW_ALL))
    os.chown(path, 12345, 12345)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True]
    assert os.stat(path).st_uid == os.geteuid()  # replaced by one of ours
    path.write_bytes(entry(strict(), True, ALLOW_ALL))
    os.chmod(path, 0o640)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True, True]
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.link(path, home / "second-link")  # a hard link: this name may not be the only one
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True, True, True]


def test_a_file_of_another_policy_is_not_taken_for_this_one(home, compiles):
    seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    key = seccomp._cache_key(strict(), False)
    (home / "seccomp" / f"{key}.bpf").write_bytes(path.read_bytes())
    os.chmod(home / "seccomp" / f"{key}.bpf", 0o600)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=False) == fresh(strict(), notify=False)
    assert compiles == [True, False]


def test_a_symlink_planted_at_the_file_is_never_followed(home, compiles, tmp_path):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    elsewhere = tmp_path / "planted.bpf"
    elsewhere.write_bytes(entry(strict(), True, ALLOW_ALL))
    os.chmod(elsewhere, 0o600)
    os.utime(elsewhere, ns=(10**9, 10**9))
    path.unlink()
    path.symlink_to(elsewhere)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True]
    assert not path.is_symlink() and path.read_bytes() == entry(strict(), True, program)
    # The target was neither read as the cache nor written through.
    assert elsewhere.read_bytes() == entry(strict(), True, ALLOW_ALL)
    assert os.stat(elsewhere).st_mtime_ns == 10**9


def test_a_symlink_planted_at_the_directory_is_never_followed(home, compiles, tmp_path):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / path.name).write_bytes(entry(strict(), True, ALLOW_ALL))
    os.chmod(other / path.name, 0o600)
    path.unlink()
    (home / "seccomp").rmdir()
    (home / "seccomp").symlink_to(other)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True]
    assert seccomp.filter_known(strict()) is False
    assert [p.name for p in other.iterdir()] == [path.name]  # nothing written there
    assert (other / path.name).read_bytes() == entry(strict(), True, ALLOW_ALL)


@pytest.mark.parametrize("change", ["owner", "mode"])
def test_a_directory_of_another_owner_or_open_to_others_is_not_used(home, compiles, change):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    path.write_bytes(entry(strict(), True, ALLOW_ALL))
    if change == "owner":
        os.chown(home / "seccomp", 12345, 12345)
    else:
        os.chmod(home / "seccomp", 0o755)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert compiles == [True, True]
    assert path.read_bytes() == entry(strict(), True, ALLOW_ALL)  # left as it was


def test_a_changed_policy_gets_its_own_filter(home, compiles):
    policy = strict()
    changed = dataclasses.replace(
        policy,
        rules=(*policy.rules, SeccompRule(("getpid",), SeccompAction.ERRNO, errno.EPERM)),
    )
    base = seccomp.compile_filter(policy, notify=True)
    other = seccomp.compile_filter(changed, notify=True)
    assert base != other and len(stored(home)) == 2
    assert other == fresh(changed)
    assert seccomp._cache_key(policy, True) != seccomp._cache_key(policy, False)
    families = dataclasses.replace(policy, socket_families=(1,))
    assert seccomp._cache_key(families, True) != seccomp._cache_key(policy, True)
    unsafe = dataclasses.replace(policy, unsafe_namespace_clone=True)
    assert seccomp._cache_key(unsafe, True) != seccomp._cache_key(policy, True)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(policy, notify=True) == base
    assert seccomp.compile_filter(changed, notify=True) == other
    assert compiles == [True, True]


def test_a_changed_profile_file_gets_its_own_filter(home, compiles, tmp_path):
    path = tmp_path / "mine.toml"
    text = 'extends = "strict"\n[seccomp]\nallow = ["@basic", "@io", "@file"{}]\n'
    path.write_text(text.format(""))
    before = seccomp.compile_filter(load_profile(str(path)).seccomp, notify=True)
    path.write_text(text.format(', "@process"'))
    after = seccomp.compile_filter(load_profile(str(path)).seccomp, notify=True)
    assert before != after and len(stored(home)) == 2


def test_filter_known_vouches_only_for_a_stored_policy(home):
    policy = strict()
    assert seccomp.filter_known(policy) is False
    seccomp.compile_filter(policy, notify=False)
    assert seccomp.filter_known(policy) is True
    # libseccomp compiles a pseudo-syscall of another architecture that the profile check
    # refuses: such a policy is never stored, so it never skips that check.
    odd = dataclasses.replace(
        policy, rules=(*policy.rules, SeccompRule(("socketcall",), SeccompAction.ALLOW))
    )
    assert seccomp.unknown_syscalls(("socketcall",)) == ["socketcall"]
    seccomp.compile_filter(odd, notify=False)
    assert seccomp.filter_known(odd) is False


def test_the_cache_keeps_the_newest_entries(home, monkeypatch):
    monkeypatch.setattr(seccomp, "CACHE_ENTRIES", 2)
    policy = strict()
    keys = []
    for number in (1, 2, 3):
        changed = dataclasses.replace(policy, socket_families=(number,))
        seccomp.compile_filter(changed, notify=True)
        keys.append(seccomp._cache_key(changed, True))
        path = home / "seccomp" / f"{keys[-1]}.bpf"
        os.utime(path, ns=(number * 10**9, number * 10**9))  # written in this order
    assert [p.stem for p in stored(home)] == sorted(keys[1:])


def test_a_run_whose_filter_is_stored_never_loads_pyseccomp(home):
    env = {**os.environ, "SANDBOX_HOME": str(home)}
    code = (
        "import sys\n"
        "from sandbox.cli import main\n"
        "code = main(['exec', '--profile', 'strict', '--', '/bin/true'])\n"
        "print(code, 'pyseccomp' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.stdout == "0 True\n", first.stderr
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.stdout == "0 False\n", again.stderr


def test_checking_a_profile_writes_nothing(home):
    load_profile("strict")
    assert seccomp.filter_known(strict()) is False
    assert not home.exists()  # only compiling a filter makes the state dir and the cache
    seccomp.compile_filter(strict(), notify=True)
    assert len(stored(home)) == 1


def test_without_a_known_libseccomp_nothing_is_stored_or_read(home, compiles, monkeypatch):
    program = seccomp.compile_filter(strict(), notify=True)
    [path] = stored(home)
    path.write_bytes(entry(strict(), True, ALLOW_ALL))
    monkeypatch.setattr(seccomp, "_toolchain", lambda: None)
    seccomp.compile_filter.cache_clear()
    assert seccomp.compile_filter(strict(), notify=True) == program
    assert seccomp.compile_filter(strict(), notify=False) == fresh(strict(), notify=False)
    assert compiles == [True, True, False]
    assert stored(home) == [path] and seccomp.filter_known(strict()) is False
