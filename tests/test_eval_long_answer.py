"""The long-answer fidelity eval's metrics against naive implementations, its cases, and its
summary by hand. No server here: the eval itself runs against one (docs/results.md)."""

from __future__ import annotations

import functools
import random

import pytest

from specapprox_vllm.tools.eval.long_answer import (
    common_prefix,
    lcs_f1,
    make_case,
    markdown_table,
    summarize,
    unrelated_floor,
)


def naive_lcs(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    @functools.cache
    def go(i: int, j: int) -> int:
        if i == len(a) or j == len(b):
            return 0
        if a[i] == b[j]:
            return 1 + go(i + 1, j + 1)
        return max(go(i + 1, j), go(i, j + 1))

    return go(0, 0)


def test_lcs_f1_equals_the_textbook_recursion() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = tuple(rng.randrange(4) for _ in range(rng.randrange(0, 12)))
        b = tuple(rng.randrange(4) for _ in range(rng.randrange(0, 12)))
        lcs = naive_lcs(a, b)
        if not a or not b:
            want = float(a == b)
        elif lcs == 0:
            want = 0.0
        else:
            want = 2 * lcs / (len(a) + len(b))  # 2PR/(P+R) with P = l/|a|, R = l/|b|
        assert lcs_f1(list(a), list(b)) == pytest.approx(want)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("length", [1024, 4096])
def test_cases_are_deterministic_sized_and_state_their_needle(tok, length: int) -> None:
    case = make_case(tok, length, seed=2)
    assert case == make_case(tok, length, seed=2)
    assert case != make_case(tok, length, seed=3)
    assert abs(case.prompt_tokens - length) <= 0.1 * length
    text = case.messages[0]["content"]
    assert text.count(f"is: {case.needle}.") == 1
    key = text.split("The special magic number for ")[1].split(" is:")[0]
    assert text.endswith(f"Include the special magic number for {key}.")


def test_summary_by_hand() -> None:
    def rec(setting, prefix, f1, needle, applied, n=100):
        return {"setting": setting, "prefix": prefix, "lcs_f1": f1, "identical": f1 == 1.0,
                "needle": needle, "reply_tokens": n, "approx": {"applied": applied}}

    records = [rec("none", 100, 1.0, 1.0, False), rec("none", 80, 1.0, 0.0, False),
               rec("speckv@256", 33, 0.5, 1.0, True, 90), rec("speckv@256", 100, 1.0, 0.0,
                                                                False, 110),
               {"setting": "speckv@256", "error": "boom"},
               {"setting": "speckv@256", "lcs_f1": None}]
    s = summarize(records)
    assert s["none"] == {"n": 2, "prefix": 90.0, "lcs_f1": 1.0, "identical": 1.0,
                         "needle": 0.5, "reply_tokens": 100.0, "compressed": 0.0}
    assert s["speckv@256"] == {"n": 2, "prefix": 66.5, "lcs_f1": 0.75, "identical": 0.5,
                               "needle": 0.5, "reply_tokens": 100.0, "compressed": 0.5}
    table = markdown_table(s)
    assert "| speckv@256 | 2 | 100.0 | 66.5 | 0.750 | 0.50 | 0.50 | 0.50 |" in table


def test_unrelated_floor_is_the_mean_over_ordered_pairs() -> None:
    a, b, c = [1, 2, 3], [1, 2, 4], [9]
    pairs = [lcs_f1(x, y) for x, y in ((a, b), (a, c), (b, a), (b, c), (c, a), (c, b))]
    assert unrelated_floor([a, b, c]) == pytest.approx(round(sum(pairs) / 6, 3))
    assert unrelated_floor([a]) is None
