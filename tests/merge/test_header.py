"""Property tests of the header parser and the planner on random, valid and mutated headers (see
header_strategies.py; bench/fuzz_headers.py runs the same properties 100,000 times)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from tests.merge.header_strategies import (
    check_parse,
    check_plan,
    header_pairs,
    mutated_headers,
    plan_options,
    random_headers,
    valid_headers,
)

EXAMPLES = {"random": 600, "valid": 400, "mutated": 1400, "pairs": 600}  # 3,000 in all
_fast = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.slow
@settings(max_examples=EXAMPLES["random"], **_fast)
@given(random_headers())
def test_random_bytes_and_json_never_crash_the_parser(case):
    check_parse(*case)


@settings(max_examples=EXAMPLES["valid"], **_fast)
@given(valid_headers())
def test_valid_headers_are_accepted(case):
    header, size = case
    raw = json.dumps(header).encode()
    assert check_parse(raw, size) is not None  # a hardened parser that refuses good files is no use


@pytest.mark.slow
@settings(max_examples=EXAMPLES["mutated"], **_fast)
@given(mutated_headers(), mutated_headers(), plan_options)
def test_mutated_headers_never_crash_the_parser_or_the_planner(cur, prev, options):
    parsed_cur, parsed_prev = check_parse(*cur), check_parse(*prev)
    if parsed_cur is not None and parsed_prev is not None:
        check_plan((*prev, parsed_prev), (*cur, parsed_cur), options)


@pytest.mark.slow
@settings(max_examples=EXAMPLES["pairs"], **_fast)
@given(header_pairs(), plan_options)
def test_planner_on_related_headers(pair, options):
    prev, cur = pair
    parsed_prev, parsed_cur = check_parse(*prev), check_parse(*cur)
    assert parsed_prev is not None and parsed_cur is not None
    check_plan((*prev, parsed_prev), (*cur, parsed_cur), options)
