"""Fuzz the safetensors header parser and the planner: 100,000 random, valid and mutated headers by default.

    python bench/fuzz_headers.py [--examples 100000] [--seed 0]

Runs the properties of tests/merge/header_strategies.py (the CI test runs the same ones a few thousand
times) and reports how many examples ran and every failure: any exception other than MergeError, or a broken
invariant (accepted header that does not tile its buffer, that the reference reader refuses, or a plan whose
output header the parser refuses). Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.merge.header_strategies import (  # noqa: E402
    check_parse,
    check_plan,
    header_pairs,
    mutated_headers,
    plan_options,
    random_headers,
    valid_headers,
)

SHARES = {"random": 0.25, "valid": 0.15, "mutated": 0.4, "pairs": 0.2}


def _random(case):
    check_parse(*case)


def _valid(case):
    header, size = case
    assert check_parse(json.dumps(header).encode(), size) is not None, "valid header refused"


def _mutated(cur, prev, options):
    parsed_cur, parsed_prev = check_parse(*cur), check_parse(*prev)
    if parsed_cur is not None and parsed_prev is not None:
        check_plan((*prev, parsed_prev), (*cur, parsed_cur), options)


def _pairs(pair, options):
    prev, cur = pair
    parsed_prev, parsed_cur = check_parse(*prev), check_parse(*cur)
    assert parsed_prev is not None and parsed_cur is not None, "valid header refused"
    check_plan((*prev, parsed_prev), (*cur, parsed_cur), options)


PROPERTIES = {
    "random": (_random, (random_headers(),)),
    "valid": (_valid, (valid_headers(),)),
    "mutated": (_mutated, (mutated_headers(), mutated_headers(), plan_options)),
    "pairs": (_pairs, (header_pairs(), plan_options)),
}


def run(name: str, n: int, seed_value: int, failures: list) -> int:
    fn, strategies = PROPERTIES[name]
    count = 0

    @seed(seed_value)
    @settings(
        max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(st.tuples(*strategies))
    def prop(args):
        nonlocal count
        count += 1
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded, so that one run reports every failure
            where = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(
                (name, f"{type(e).__name__}: {str(e)[:200]}", f"{where.filename}:{where.lineno}", repr(args)[:300])
            )

    prop()
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    failures: list = []
    total, t0 = 0, time.perf_counter()
    for name, share in SHARES.items():
        n = max(1, round(args.examples * share))
        t = time.perf_counter()
        ran = run(name, n, args.seed, failures)
        total += ran
        print(f"{name:8s} {ran:7d} examples in {time.perf_counter() - t:6.1f} s")
    print(f"total    {total:7d} examples in {time.perf_counter() - t0:6.1f} s, {len(failures)} failures")
    kinds = collections.Counter((f[0], f[1].split(":")[0], f[2]) for f in failures)
    for (prop, kind, where), k in kinds.most_common():
        example = next(f for f in failures if (f[0], f[1].split(":")[0], f[2]) == (prop, kind, where))
        print(f"  {k} x {prop}: {example[1]} at {where}\n      e.g. {example[3]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
