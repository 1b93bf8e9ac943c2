"""Sizes and durations: every accepted spelling, every refusal."""

import pytest

from sandbox.units import format_size, parse_duration, parse_size


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
