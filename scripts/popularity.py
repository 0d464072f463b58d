#!/usr/bin/env python3
"""The most-popular baseline on a prepared split's stored candidates.

    python3 scripts/popularity.py movielens-llara [--part test] [--limit N]

Ranks each row's candidates by how often the item is a training row's target and reports
HR@1 with ties split (a row whose target shares the top count with k-1 other candidates counts
1/k), with its 95% Wilson interval. It reads the split `rsllm data prepare` wrote under
$RSLLM_CACHE_DIR (default ~/.cache/rsllm)/prepared/<split>/, and needs no model: it says how
much of an ID-only recommender's HR@1 on these candidates popularity alone explains.
"""
import argparse
import collections
import json
import math
import os
import sys


def wilson(hits: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", help="a prepared split's folder name, e.g. movielens-llara, steam-valtrain-llara")
    ap.add_argument("--part", default="test", choices=["test", "val"])
    ap.add_argument("--limit", type=int, help="only the first N rows (as `--test-limit`)")
    args = ap.parse_args()
    cache = os.environ.get("RSLLM_CACHE_DIR", os.path.expanduser("~/.cache/rsllm"))
    folder = os.path.join(cache, "prepared", args.split)
    try:
        with open(os.path.join(folder, "train.jsonl")) as f:
            counts = collections.Counter(json.loads(line)["target"] for line in f)
        with open(os.path.join(folder, f"{args.part}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    except FileNotFoundError as e:
        print(f"popularity: {e.filename} is missing: run `rsllm data prepare` for {args.split} first", file=sys.stderr)
        return 1
    if args.limit is not None:
        rows = rows[: args.limit]
    hits = 0.0
    for row in rows:
        top = max(counts[c] for c in row["candidates"])
        tied = [c for c in row["candidates"] if counts[c] == top]
        if row["target"] in tied:
            hits += 1 / len(tied)
    n = len(rows)
    low, high = wilson(hits, n)
    print(json.dumps({"split": args.split, "part": args.part, "n": n, "hr1": hits / n if n else 0.0,
                      "low": low, "high": high, "train_targets": sum(counts.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
