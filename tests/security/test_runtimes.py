"""The allowlist is wide enough for real programs: C++ built under `compile` and run under
`strict`, Python under `strict`, and, where the host has them, Java under `standard` and a Rust
binary under `strict`. (That it is not too wide is tests/security/test_syscalls.py.)"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import sandbox
from sandbox import Verdict

CPP = """#include <iostream>
#include <thread>
#include <vector>
#include <algorithm>
int main() {
    std::vector<int> v{3, 1, 2};
    std::sort(v.begin(), v.end());
    std::thread t([&] { v.push_back(4); });
    t.join();
    for (int x : v) std::cout << x;
    std::cout << std::endl;
}
"""


def readable(directory: Path) -> Path:
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return directory


def test_cpp_compiled_under_compile_runs_under_strict(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    (tmp_path / "a.cpp").write_text(CPP)
    readable(tmp_path)
    out.chmod(0o777)
    built = sandbox.run(["g++", "-O2", "-pthread", "-o", "/box/out/a", "/box/src/a.cpp"],
                        profile="compile", binds=[(str(tmp_path), "/box/src"),
                                                  (str(out), "/box/out", True)])
    assert built.verdict is Verdict.OK, built.stderr
    ran = sandbox.run(["/box/bin/a"], binds=[(str(out), "/box/bin")])
    assert ran.verdict is Verdict.OK and ran.stdout == b"1234\n"


def test_python_with_threads_subprocess_and_tempfiles_under_strict():
    code = ("import tempfile, threading, subprocess, json, hashlib, random\n"
            "with tempfile.NamedTemporaryFile() as f: f.write(b'x')\n"
            "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
            "print(subprocess.run(['true']).returncode, random.random() < 1)")
    report = sandbox.run(["python3", "-c", code])
    assert report.verdict is Verdict.OK, report.stderr
    assert report.stdout == b"0 True\n"


def test_java_under_standard(tmp_path):
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("no JDK on this host")
    (tmp_path / "Hello.java").write_text(
        'public class Hello { public static void main(String[] a) throws Exception {'
        ' Thread t = new Thread(() -> System.out.println("thread")); t.start(); t.join();'
        ' System.out.println("hello"); } }')
    subprocess.run(["javac", str(tmp_path / "Hello.java")], check=True)
    readable(tmp_path)
    report = sandbox.run(["java", "-cp", "/box/src", "Hello"], profile="standard",
                         binds=[(str(tmp_path), "/box/src")])
    assert report.verdict is Verdict.OK, report.stderr
    assert report.stdout == b"thread\nhello\n"


def test_rust_binary_under_strict(tmp_path):
    rustc = shutil.which("rustc")
    if rustc is None:
        pytest.skip("no Rust compiler on this host")
    (tmp_path / "main.rs").write_text(
        'fn main() { let h = std::thread::spawn(|| 21 * 2); println!("{}", h.join().unwrap()); }')
    result = subprocess.run([rustc, "-O", "-o", str(tmp_path / "main"),
                             str(tmp_path / "main.rs")], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"rustc could not build here: {result.stderr[-200:]!r}")
    readable(tmp_path)
    report = sandbox.run(["/box/src/main"], binds=[(str(tmp_path), "/box/src")])
    assert report.verdict is Verdict.OK, report
    assert report.stdout == b"42\n"
