"""The cost-curve benchmark's arithmetic (specapprox_vllm/tools/bench/costs.py), against
figures worked out by hand: the fitted exponent, the steady-state decode rate, the ratios, the
request body of each method and the report it writes. No server: the serving part is the
load tester's, tested in tests/test_loadtest*.py."""

from __future__ import annotations

import argparse
import json

import pytest

from specapprox_vllm.tools.bench import costs


def test_fit_recovers_a_power_law() -> None:
    xs = [1024.0, 2048.0, 4096.0, 8192.0]
    f = costs.fit(xs, [3e-6 * x**2 for x in xs])
    assert f is not None
    assert f["exponent"] == pytest.approx(2.0, abs=1e-3)
    assert f["per_1k_at_max"] == pytest.approx(1e3 * 3e-6 * 8192, rel=1e-3)
    assert costs.fit([1024.0], [1.0]) is None  # one point fits nothing
    assert costs.fit([1024.0, 2048.0], [0.0, 0.0]) is None  # a cost never measured


def test_steady_decode_counts_tokens_after_the_last_first_token() -> None:
    # request a: first token at 1 s, then 2, 3, 4; request b starts at 0.5, first token at
    # 2.5 s, then 3.5, 4.5. From 2.5 s (b's first token) to 4.5 s (the last token) four
    # tokens arrive: a's 3 and 4, b's 3.5 and 4.5 -> 4 / 2 s = 2 tok/s.
    reqs = [{"success": True, "start": 0.0, "ttft": 1.0, "itl": [1.0, 1.0, 1.0],
             "last_token": 4.0},
            {"success": True, "start": 0.5, "ttft": 2.0, "itl": [1.0, 1.0],
             "last_token": 4.0},
            {"success": False, "start": 0.0, "ttft": None, "itl": [], "last_token": None}]
    assert costs.steady_decode(reqs) == pytest.approx(2.0)
    assert costs.steady_decode([]) is None


def _args(**kw: object) -> argparse.Namespace:
    base = {"kv_budget": 256, "prompt_budget": 1024, "cascade_prompt_budget": 2048}
    return argparse.Namespace(**(base | kw))


def test_request_body_follows_the_policy_facts() -> None:
    assert costs.approx_body("none", _args()) == {"method": "none"}
    assert costs.approx_body("snapkv", _args()) == {"method": "snapkv", "kv_budget": 256}
    assert costs.approx_body("specpc", _args()) == {"method": "specpc", "prompt_budget": 1024}
    assert costs.approx_body("speckv_pc", _args()) == {
        "method": "speckv_pc", "kv_budget": 256, "prompt_budget": 2048}
    assert costs.approx_body("speckv+lookahead=16+window=8", _args()) == {
        "method": "speckv", "kv_budget": 256, "lookahead": 16, "window": 8}
    with pytest.raises(Exception, match="nosuch"):
        costs.approx_body("nosuch", _args())


def _cell(method: str, length: int, ttft: float, decode: float) -> dict:
    return {"method": method, "prompt_len": length, "max_tokens": 32, "concurrency": 1,
            "prompt_tokens_median": float(length), "ttft_p50_s": ttft,
            "output_tok_s": 32 / (ttft + 31 / decode), "decode_tok_s": decode,
            "per_request_decode_tok_s_median": decode, "steady_decode_tok_s": decode,
            "draft_ms_median": 0.0, "score_ms_median": None, "select_ms_median": 1.0,
            "approx_applied": 0 if method == "none" else 2, "requests_ok": 2, "fallbacks": 0,
            "peak_running": 1, "requests": []}


def test_report_writes_ratios_fits_table_and_plot(tmp_path) -> None:
    # none: TTFT linear in L; speckv: TTFT quadratic, twice full's at 2048
    cells = [_cell("none", 1024, 1.0, 10.0), _cell("speckv", 1024, 0.5, 40.0),
             _cell("none", 2048, 2.0, 5.0), _cell("speckv", 2048, 2.0, 40.0)]
    res = {"mode": "lengths", "methods": ["none", "speckv"], "server": "test",
           "cells": cells}
    out = tmp_path / "c.json"
    assert costs.report(res, out) == 0
    saved = json.loads(out.read_text())
    by = {(c["method"], c["prompt_len"]): c for c in saved["cells"]}
    assert by[("speckv", 1024)]["ttft_p50_s_vs_none"] == 0.5
    assert by[("speckv", 2048)]["per_request_decode_tok_s_median_vs_none"] == 8.0
    assert saved["fits"]["none"]["ttft"]["exponent"] == pytest.approx(1.0)
    assert saved["fits"]["speckv"]["ttft"]["exponent"] == pytest.approx(2.0)
    assert saved["fits"]["speckv"]["decode_s_per_token"]["exponent"] == pytest.approx(0.0)
    assert saved["fits"]["none"]["score_ms"] is None  # never measured: no fit
    md = out.with_suffix(".md").read_text()
    assert "| speckv | 2048.0 | 32 | 1 |" in md
    assert "| speckv | 2.0 |" in md  # the fits table: TTFT exponent 2
    assert out.with_suffix(".png").stat().st_size > 0
