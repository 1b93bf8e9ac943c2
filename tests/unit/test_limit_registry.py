"""The limit registry (sandbox/limits.py) is the one table: every view of a limit is derived from
it, and each backend reports exactly the limits the registry says it enforces."""

import dataclasses
import typing

import pytest

from sandbox.box import rlimits, treelimits
from sandbox.box.plan import RootPlan
from sandbox.errors import ConfigError
from sandbox.limits import LIMITS, Enforcer, LimitKeywords, Limits, Order, parse_limits
from sandbox.report import StopReason
from sandbox.verdict import KILL_VERDICTS

#: One value for every limit, as a user writes it.
EVERY_LIMIT = {
    "wall_time": "2s", "cpu_time": "1s", "memory": "64M", "pids": 8, "fsize": "1M",
    "address_space": "128M",
    "open_files": 32, "stack": "8M", "output": "1M", "tmp_size": "2M", "work_size": "2M",
    "extra_time": "100ms", "cpu_quota": 1.5, "cpus": "0", "root_size": "4M",
}


def every_limit() -> Limits:
    return Limits().merged(**parse_limits(EVERY_LIMIT, lambda k, p: ValueError(k, p)))


def enforced_by(enforcer: Enforcer, cgroup: bool) -> set[str]:
    return {
        name for name, e in LIMITS.items()
        if enforcer in (e.enforcers if cgroup else e.without_cgroup)
    }


def test_every_field_of_limits_is_an_entry_and_every_entry_is_complete():
    assert list(LIMITS) == [f.name for f in dataclasses.fields(Limits)]
    assert set(EVERY_LIMIT) == set(LIMITS)
    flags = [e.flag for e in LIMITS.values()]
    assert len(set(flags)) == len(flags) and all(f.startswith("--") for f in flags)
    for name, entry in LIMITS.items():
        assert entry.name == name and entry.help and entry.enforcers, name


def test_the_api_keywords_are_the_registry():
    assert set(typing.get_type_hints(LimitKeywords)) == set(LIMITS)
    import inspect

    import sandbox

    kinds = {p.kind for p in inspect.signature(sandbox.run).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD in kinds
    with pytest.raises(ConfigError, match="unknown limit"):
        sandbox.run(["true"], wall_tme="1s")  # type: ignore[call-arg]


def test_the_cli_has_one_flag_per_entry():
    import argparse

    from sandbox.cli import _exec_arguments

    exec_parser = argparse.ArgumentParser()
    _exec_arguments(exec_parser)
    by_flag = {o: a.dest for a in exec_parser._actions for o in a.option_strings}
    for name, entry in LIMITS.items():
        assert by_flag[entry.flag] == name


def test_each_limit_that_kills_has_its_reason_and_verdict():
    for name, entry in LIMITS.items():
        if entry.verdict is not None:
            assert entry.reason is StopReason(name)
            assert KILL_VERDICTS[StopReason(name)] is entry.verdict
    assert set(KILL_VERDICTS) == {
        e.reason for e in LIMITS.values() if e.reason is not None
    } | {StopReason.FORBIDDEN_SYSCALL, StopReason.PEER_EXITED}


def test_ceilings_follow_each_limits_order():
    from sandbox.limits import clamp_to

    ceilings = {n: getattr(every_limit(), n) for n, e in LIMITS.items()
                if e.order is not Order.UNORDERED}
    clamped, lowered = clamp_to(Limits(), ceilings)
    for name, entry in LIMITS.items():
        if entry.order is Order.ABSENT_IS_TIGHTEST:
            assert getattr(clamped, name) is None  # a ceiling never fills it in
        elif entry.order is Order.ORDERED:
            asked = getattr(Limits(), name)
            expected = ceilings[name] if asked is None else min(asked, ceilings[name])
            assert getattr(clamped, name) == expected, name
    assert {n for n, *_ in lowered} <= set(ceilings)


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "no-cgroup"])
def test_rlimits_set_and_report_exactly_the_registry_s_rlimit_limits(cgroup):
    limits = every_limit()
    table, applied = rlimits.table(limits, fallback=not cgroup)
    assert set(applied) - {"core"} == enforced_by(Enforcer.RLIMIT, cgroup)
    import resource

    set_values = dict(table)
    assert len(set_values) == len(table)  # one entry per rlimit: the lowest of its limits
    for name, limit in applied.items():
        which = getattr(resource, limit.mechanism)
        sharing = [a.value for a in applied.values() if a.mechanism == limit.mechanism]
        assert set_values[which] == min(sharing), name


def test_the_box_init_reports_exactly_the_registry_s_tree_limits():
    limits = every_limit()
    tree = rlimits.tree_limits(limits, fallback=True)
    assert tree is not None
    assert set(treelimits.applied(tree, limits)) == enforced_by(Enforcer.BOX_INIT, False)
    assert rlimits.tree_limits(limits, fallback=False) is None


def test_the_root_plan_reports_exactly_the_registry_s_mount_limits():
    limits = every_limit()
    plan = RootPlan((), (), limits.tmp_size, limits.work_size, "/box", False, 1000, 1000,
                    root_size=limits.root_size)
    applied = plan.applied()
    assert set(applied) == enforced_by(Enforcer.MOUNTS, True)
    assert all(applied[n].value == getattr(limits, n) for n in applied)
    from dataclasses import replace

    from sandbox.box.plan import HostDir

    build = replace(plan, build_dir=HostDir.__new__(HostDir))  # a build step mounts no work dir
    assert "work_size" not in build.applied()


def test_without_a_cgroup_nothing_claims_cgroup_limits():
    assert enforced_by(Enforcer.CGROUP, False) == set()
    assert LIMITS["cpu_quota"].without_cgroup == () and LIMITS["cpus"].without_cgroup == ()


def test_the_documented_registry_is_the_registry():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "limits.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines()
            if line.startswith("| `")}
    for name, e in LIMITS.items():
        without = ", ".join(x.value for x in e.without_cgroup) or "refused"
        cells = [f"`{name}`", f"`{e.flag}`", e.unit.value, e.order.value,
                 ", ".join(x.value for x in e.enforcers), without,
                 e.verdict.value if e.verdict else "-"]
        assert rows.get(name) == "| " + " | ".join(cells) + " |", name


@pytest.mark.parametrize("name", list(LIMITS))
def test_without_a_cgroup_a_limit_runs_only_as_the_registry_allows(name):
    """Fail closed: a limit nothing enforces without a cgroup is refused; one an rlimit stands
    in for needs the profile's fallback; the rest run."""
    import dataclasses

    from sandbox.errors import HostError
    from sandbox.request import Request, resolve
    from sandbox.spec import Fallback
    from sandbox.supervisor import _check_host

    spec = resolve(Request(argv=["true"]))
    only = Limits(**{name: getattr(every_limit(), name)})
    spec = dataclasses.replace(spec, limits=only)
    entry = LIMITS[name]
    refused = not entry.without_cgroup or entry.needs_fallback
    no_cgroup = HostError("no cgroup here")
    if refused:
        with pytest.raises(HostError, match=name):
            _check_host(spec, no_cgroup)
    else:
        _check_host(spec, no_cgroup)
    allowed = dataclasses.replace(spec.profile, fallback=Fallback.RLIMIT)
    if entry.without_cgroup:
        _check_host(dataclasses.replace(spec, profile=allowed), no_cgroup)
