"""Every stored fuzz input (seeds and past crash inputs) still runs cleanly through its target."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import harnesses

CASES = [(target, path) for target in harnesses.TARGETS for path in harnesses.corpus(target)]


def test_every_target_has_a_corpus():
    assert {target for target, _ in CASES} == set(harnesses.TARGETS)


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input_is_handled(target, path):
    harnesses.TARGETS[target](path.read_bytes())
