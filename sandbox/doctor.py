"""``sandbox doctor``: which of the sandbox's guarantees hold on this host, and how to fix the rest.

Each check runs the real kernel feature (in a throw-away child where it changes state); the last
one starts a real box under ``strict``. Exit status 0 when ``strict`` can be honoured, 1 if not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .box import cgroups
from .errors import SandboxError


@dataclass(frozen=True)
class Check:
    """A guarantee: does it hold, what was seen, how to fix it, does strict need it."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = True


def _in_child(action: object) -> tuple[bool, str]:
    """Run ``action()`` in a forked child (it may change namespaces); (ok, error text)."""
    import ctypes  # noqa: F401 - loaded before fork

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            action()  # type: ignore[operator]
            os.write(write_fd, b"ok")
        except BaseException as e:
            os.write(write_fd, str(e).encode()[:500])
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        answer = f.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return answer == "ok", answer


def _user_namespaces() -> Check:
    from .kernel import CLONE_NEWNS, CLONE_NEWUSER, Kernel

    ok, err = _in_child(lambda: Kernel().unshare(CLONE_NEWUSER | CLONE_NEWNS))
    return Check(
        "user namespaces",
        ok,
        "unshare(CLONE_NEWUSER) works" if ok else err,
        "enable them: sysctl kernel.unprivileged_userns_clone=1 (Debian) or "
        "user.max_user_namespaces > 0; on Ubuntu 24.04+ allow them in AppArmor",
    )


def _overlayfs() -> Check:
    ok = "overlay" in Path("/proc/filesystems").read_text()
    return Check(
        "overlayfs",
        ok,
        "overlay listed in /proc/filesystems" if ok else "missing",
        "load the module: modprobe overlay",
    )


def _seccomp() -> Check:
    status = Path("/proc/self/status").read_text()
    try:
        from .box.seccomp import native_arch

        native_arch()
        library = True
    except (OSError, ImportError) as e:
        return Check(
            "seccomp",
            False,
            f"libseccomp unusable: {e}",
            "install libseccomp2 (apt-get install libseccomp2)",
        )
    ok = "Seccomp:" in status and library
    return Check(
        "seccomp",
        ok,
        "filters and libseccomp available" if ok else "kernel lacks it",
        "use a kernel built with CONFIG_SECCOMP_FILTER",
    )


def _listener() -> Check:
    from .box.seccomp import listener_supported

    ok = listener_supported()
    return Check(
        "seccomp user notification",
        ok,
        "forbidden syscalls are reported by name"
        if ok
        else "kernel < 5.0: forbidden syscalls kill with SIGSYS, name unknown",
        "upgrade to Linux 5.0 or later",
        required=False,
    )


def _mount_setattr() -> Check:
    release = os.uname().release.split(".")
    ok = (int(release[0]), int(release[1].split("-")[0])) >= (5, 12)
    return Check(
        "mount_setattr (Linux 5.12+)", ok, os.uname().release, "upgrade the kernel to 5.12 or later"
    )


def _cgroups() -> list[Check]:
    v1, v2 = cgroups.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    checks = []
    if v2 is not None:
        own = cgroups.parse_proc_cgroup(Path("/proc/self/cgroup").read_text()).get("", "/")
        controllers = (v2 / own.lstrip("/") / "cgroup.controllers").read_text().split()
        checks.append(
            Check(
                "cgroup v2 mount",
                True,
                f"{v2} (controllers here: {' '.join(controllers) or 'none'})",
                required=False,
            )
        )
    if v1:
        checks.append(
            Check(
                "cgroup v1 controllers",
                True,
                ", ".join(c for c in cgroups.CgroupV1.CONTROLLERS if c in v1),
                required=False,
            )
        )
    try:
        backend = cgroups.detect()
        checks.append(
            Check(
                "cgroup backend",
                True,
                f"{backend.name}: memory, pids and CPU accounting enforced per box",
            )
        )
    except SandboxError as e:
        checks.append(Check("cgroup backend", False, e.message, e.hint or ""))
    return checks


def _strict_box() -> Check:
    from .request import Request, resolve
    from .streams import BufferSink
    from .supervisor import run_box

    try:
        spec = resolve(Request(argv=["/bin/true"], profile="strict"))
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            report = run_box(spec, devnull, BufferSink(), BufferSink())
        finally:
            os.close(devnull)
    except SandboxError as e:
        return Check("a strict box runs", False, e.message, e.hint or "")
    ok = report.verdict.value == "ok"
    return Check(
        "a strict box runs",
        ok,
        f"/bin/true: {report.verdict.value} in {report.setup_time * 1000:.1f} ms setup"
        if ok
        else report.error or report.verdict.value,
        "see the failed checks above",
    )


def _linked_networks() -> Check:
    """Linked groups need root and nft (their anti-spoofing filter); strict does not."""
    import shutil

    missing = [tool for tool in ("nsenter", "nft") if shutil.which(tool) is None]
    ok = os.geteuid() == 0 and not missing
    if os.geteuid() != 0:
        detail = "need root (they create network namespaces)"
    else:
        detail = "nsenter and nft found" if ok else "missing: " + ", ".join(missing)
    return Check(
        "linked groups",
        ok,
        detail,
        "apt-get install nftables util-linux" if missing else "",
        required=False,
    )


def checks() -> list[Check]:
    """Every check, in the order they are shown."""
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} (rootless)"
    result = [
        Check("running as", True, who, required=False),
        _user_namespaces(),
        _overlayfs(),
        _seccomp(),
        _listener(),
        _mount_setattr(),
        *_cgroups(),
        _linked_networks(),
    ]
    result.append(_strict_box())
    return result


def run_doctor() -> int:
    """Print the checks; 0 if ``strict`` can be honoured here, 1 if not."""
    results = checks()
    for c in results:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        print(f"[{mark}] {c.name}: {c.detail}")
        if not c.ok and c.hint:
            print(f"       fix: {c.hint}")
    failed = [c for c in results if c.required and not c.ok]
    print(
        "strict can be honoured on this host"
        if not failed
        else f"strict cannot be honoured here ({len(failed)} failed check(s))"
    )
    return 1 if failed else 0
