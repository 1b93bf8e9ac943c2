"""Run one fuzz target under atheris: ``python fuzz/fuzz.py TARGET [libFuzzer options]``.

Targets are in ``fuzz/harnesses.py``. ``fuzz/run.sh`` runs them all with their corpora.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris

with atheris.instrument_imports():
    import harnesses


def main() -> None:
    target = harnesses.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
