"""Sizes and durations: every accepted spelling, every refusal."""

import pytest

from sandbox.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    (0, 0), (17, 17), ("512", 512), ("1K", 1024), ("64M", 64 << 20), ("1G", 1 << 30),
    ("1.5K", 1536), ("2MiB", 2 << 20), ("3kb", 3072), (" 4m ", 4 << 20),
])
def test_sizes_parse_with_binary_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "M", "-1", "1Q", "1e9", True, None, 1.5, "inf", -3])
def test_bad_sizes_are_refused_with_a_hint(bad):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(bad)


@pytest.mark.parametrize(("text", "expected"), [
    (2, 2.0), (0.25, 0.25), ("2", 2.0), ("2.5s", 2.5), ("500ms", 0.5), ("1m", 60.0),
])
def test_durations_parse(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, -1, "0s", "abc", "1h", True, float("nan"), float("inf"),
                                 10**9])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_format_size_round_trips():
    for value in (1 << 30, 64 << 20, 4096, 1000):
        assert parse_size(format_size(value)) == value


@pytest.mark.parametrize(("seconds", "text"), [(10.0, "10s"), (0.25, "250ms"), (1.5, "1.5s"),
                                               (0.0, "0s"), (60, "60s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    if seconds:
        assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("name", "value", "text"), [
    ("memory", 256 << 20, "256M"), ("fsize", 1000, "1000 bytes"), ("wall_time", 2.5, "2.5s"),
    ("extra_time", 0.0, "0s"), ("cpu_quota", 1.5, "1.5 CPUs"), ("cpus", (0, 1, 2, 5), "0-2,5"),
    ("cpus", None, "all"), ("root_size", None, "none (read-only root)"), ("pids", 16, "16"),
    ("cpu_time", None, "none"),
])
def test_limits_are_shown_with_their_units(name, value, text):
    from sandbox.limits import LIMITS

    assert LIMITS[name].format(value) == text


def test_a_size_too_large_for_the_kernel_is_refused_as_a_number_too():
    """2^70 would wrap: tmpfs reads size=2^70 as 0, which is no limit at all."""
    with pytest.raises(ValueError, match="4 EiB"):
        parse_size(1 << 70)
    assert parse_size((1 << 62) - 1) == (1 << 62) - 1
