#!/usr/bin/env python3
"""Two evaluations of the same test rows compared row by row.

    python3 scripts/paired-rows.py A/rows-rsllm.csv B/rows-text-only.csv

Reads two `rows-*.csv` files written by `rsllm eval` or `rsllm pipeline` and prints, for each
ranking they both have (generative: LLaRA's rule; ranking by likelihood; the alignment heads;
likelihood + alignment), the hits of each, the rows only the first gets right, the rows only
the second does, and the exact McNemar two-sided p over those rows. The pipeline's report
pairs the methods of one run; this pairs runs (another seed, another setting). Standard
library only.
"""

import csv
import sys
from math import comb

# (label, column, is the row a hit)
RANKINGS = [
    ("generative", "correct", lambda v: v == "true"),
    ("likelihood", "rank", lambda v: v == "0"),
    ("heads", "alignment_rank", lambda v: v == "0"),
    ("likelihood + alignment", "combined_rank", lambda v: v == "0"),
]


def exact_mcnemar_p(b: int, c: int) -> float:
    """Twice the binomial(b + c, 1/2) tail at min(b, c), at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    first, second = (read_rows(p) for p in sys.argv[1:])
    key = lambda rows: [(r["row"], r["target"]) for r in rows]  # noqa: E731
    if key(first) != key(second):
        print(
            f"{sys.argv[1]} and {sys.argv[2]} do not hold the same rows "
            f"({len(first)} and {len(second)} rows, or other targets): nothing to pair",
            file=sys.stderr,
        )
        return 1
    n = len(first)
    for label, column, hit in RANKINGS:
        # Columns are empty where a mode did not run (no heads in a text-only stage).
        if not all(r.get(column) for r in first + second):
            continue
        a = [hit(r[column]) for r in first]
        b = [hit(r[column]) for r in second]
        only_a = sum(x and not y for x, y in zip(a, b))
        only_b = sum(y and not x for x, y in zip(a, b))
        p = exact_mcnemar_p(only_a, only_b)
        print(
            f"{label}: {sum(a)}/{n} against {sum(b)}/{n}; "
            f"only the first {only_a}, only the second {only_b}, p = {p:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
