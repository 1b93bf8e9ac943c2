#!/usr/bin/env bash
# Fuzz every target for SECONDS each (default 60), growing fuzz/corpus/<target>/.
# A crash input is written to fuzz/crashes/<target>/; fix the bug, then move the input into
# the target's corpus so tests/unit/test_fuzz_corpus.py replays it forever.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
.ci/install
.venv/bin/python -c 'import atheris' 2>/dev/null || .venv/bin/pip install -q atheris
targets=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "fuzz"); import harnesses; print(" ".join(harnesses.TARGETS))')
status=0
for target in $targets; do
    mkdir -p "fuzz/corpus/$target" "fuzz/crashes/$target"
    echo "== $target ($seconds s)"
    .venv/bin/python fuzz/fuzz.py "$target" "fuzz/corpus/$target" \
        -max_total_time="$seconds" -artifact_prefix="fuzz/crashes/$target/" \
        -max_len=4096 -print_final_stats=1 2>&1 | tail -4 || status=1
done
exit $status
