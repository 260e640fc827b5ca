"""The RULER-style task generator and the sweep's aggregation, against hand-checked
expectations (recounting words, finding each needle in the text, means computed by hand)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from specapprox_vllm.tools.eval.ruler import TASKS, make_case, string_match_all
from specapprox_vllm.tools.eval.sweep import Setting, settings, summarize


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_cases_are_deterministic_sized_and_answerable(tok, task: str, length: int) -> None:
    case = make_case(task, tok, length, seed=3)
    again = make_case(task, tok, length, seed=3)
    assert case == again
    assert case != make_case(task, tok, length, seed=4)
    assert abs(case.prompt_tokens - length) <= 0.1 * length, case.prompt_tokens
    text = case.messages[0]["content"]
    if task == "cwe":
        words = re.findall(r"\d+\. (\w+)", text)
        counts = Counter(words)
        top = sorted(counts, key=lambda w: -counts[w])[:10]
        assert set(top) == set(case.answers)
        assert min(counts[w] for w in case.answers) > max(
            c for w, c in counts.items() if w not in case.answers)
    else:
        for answer in case.answers:  # every answer is stated in the text
            assert answer in text
    if task.startswith("niah"):
        assert len(re.findall(r"One of the special magic numbers for", text)) == {
            "niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4,
            "niah_multiquery": 4}[task]


def test_string_match_all() -> None:
    assert string_match_all("The numbers are 12 and 34.", ("12", "34")) == 1.0
    assert string_match_all("only 12", ["12", "34", "56", "78"]) == 0.25
    assert string_match_all("ALICE moreau", ("Alice Moreau",)) == 1.0
    assert string_match_all("", ("x",)) == 0.0


def test_settings_grid_and_requests() -> None:
    grid = settings(["none", "snapkv", "specpc", "speckv_pc"], [128, 256], [512])
    assert [s.label for s in grid] == ["none", "snapkv@128", "snapkv@256", "specpc@512",
                                       "speckv_pc@128", "speckv_pc@256"]
    assert Setting("specpc", 512).approx() == {"method": "specpc", "prompt_budget": 512}
    assert Setting("speckv_pc", 128).approx(2048) == {
        "method": "speckv_pc", "kv_budget": 128, "prompt_budget": 2048}


def test_a_lookahead_cap_reaches_only_the_methods_that_have_one() -> None:
    grid = settings(["speckv", "snapkv", "specpc", "speckv_pc"], [128], [512], max_lookahead=64)
    assert [s.label for s in grid] == [
        "none", "speckv+max_lookahead=64@128", "snapkv@128", "specpc@512",
        "speckv_pc+max_lookahead=64@128"]
    assert grid[1].approx() == {"method": "speckv", "kv_budget": 128, "max_lookahead": 64}
    # the request the server receives is one its config accepts, with the cap in force
    from specapprox_vllm.policies import get_policy, make_approx_config

    for s in grid[1:]:
        cfg = make_approx_config(s.method, overrides={k: v for k, v in s.approx().items()
                                                      if k != "method"})
        n = get_policy(s.method)(cfg).draft_tokens(96)
        assert n == (64 if s.max_lookahead else 1 if s.method == "specpc" else 0)


def test_summary_drops_cells_full_attention_cannot_do() -> None:
    def rec(setting: str, task: str, length: int, score: float) -> dict:
        return {"setting": setting, "task": task, "length": length, "score": score}

    records = [rec("none", "a", 1, 1.0), rec("none", "a", 1, 0.5),  # full 0.75: kept
               rec("none", "b", 1, 0.0), rec("none", "b", 1, 0.5),  # full 0.25: dropped
               rec("none", "a", 2, 1.0), rec("none", "a", 2, 1.0),
               rec("x@1", "a", 1, 0.0), rec("x@1", "a", 1, 1.0),
               rec("x@1", "b", 1, 1.0), rec("x@1", "b", 1, 1.0),
               rec("x@1", "a", 2, 1.0), rec("x@1", "a", 2, 0.0)]
    s = summarize(records, min_full=0.5)
    assert s["kept_cells"] == [["a", 1], ["a", 2]]
    assert s["dropped_cells"] == [{"task": "b", "length": 1, "full": 0.25}]
    assert s["settings"]["none"]["mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert s["settings"]["x@1"]["mean"] == pytest.approx(0.5)
    assert s["settings"]["x@1"]["by_length"] == {"1": 0.5, "2": 0.5}
    assert s["min_samples_per_cell"] == 2


def test_markdown_table_lists_kept_cells_and_says_what_was_dropped() -> None:
    from specapprox_vllm.tools.eval.sweep import markdown_table

    records = [{"setting": s, "task": t, "length": n, "score": v} for s, t, n, v in [
        ("none", "a", 1, 1.0), ("none", "b", 1, 0.0), ("x@1", "a", 1, 0.5),
        ("x@1", "b", 1, 1.0)]]
    md = markdown_table(summarize(records, min_full=0.5))
    lines = md.splitlines()
    assert lines[0] == "| setting | mean | a | 1 |"
    assert lines[2] == "| none (full) | 1.00 | 1.00 | 1.00 |"
    assert lines[3] == "| x@1 | 0.50 | 0.50 | 0.50 |"  # b dropped: not averaged in
    assert "Dropped: b at 1 tokens (full attention 0.00 < 0.5)." in md
    assert "at least 1" in md
