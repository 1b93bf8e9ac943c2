"""Interactor for "guess the number": the jury's side of an interactive problem.

Reads guesses from the solution (its stdin), answers "<", ">" or "=" (its stdout), and gives
the verdict on stderr and in its exit code: 0 accepted, 1 wrong answer.
"""

import sys

secret = int(sys.argv[1])
limit = 20
for turn in range(1, limit + 1):
    line = sys.stdin.readline()
    if not line:
        print(f"wrong answer: the solution stopped after {turn - 1} guesses", file=sys.stderr)
        sys.exit(1)
    try:
        guess = int(line)
    except ValueError:
        print(f"wrong answer: {line.strip()!r} is not a number", file=sys.stderr)
        sys.exit(1)
    if guess == secret:
        print("=", flush=True)
        print(f"accepted in {turn} guesses", file=sys.stderr)
        sys.exit(0)
    print("<" if secret < guess else ">", flush=True)
print(f"wrong answer: no guess in {limit} turns", file=sys.stderr)
sys.exit(1)
