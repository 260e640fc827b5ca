"""Vectorised policies vs. the naive loops of ``naive_policies.py``, plus config tests.

Index outputs must be identical. Attention probabilities are compared with a tolerance (a
batched matmul and a per-row matrix-vector product round differently), and every exact
index comparison starts from the same probabilities, so no test depends on float luck.
Ties are provoked by quantising scores to a few levels.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from naive_policies import (
    naive_offsets,
    naive_pool,
    naive_speckv_scores,
    naive_speckv_select,
    naive_specpc_scores,
    naive_specpc_select,
    naive_streamingllm,
    naive_topk,
    naive_window_probs,
)
from pydantic import ValidationError

from specapprox_vllm.policies import (
    METHODS,
    POLICIES,
    build_policy,
    first_occurrences,
    get_policy,
    grouped_window_scores,
    load_method_defaults,
    make_approx_config,
    neighbor_offsets,
    pool1d,
    speckv_select,
    speckv_select_qk,
    specpc_record_scores,
    specpc_select,
    specpc_token_scores,
    streamingllm_select,
    topk_desc,
    window_probs,
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
N_CASES = 200


def _scores(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Non-negative scores; half the cases quantised to a few levels to force ties."""
    x = torch.rand(shape, generator=gen)
    if torch.rand((), generator=gen) < 0.5:
        levels = int(torch.randint(2, 6, (), generator=gen))
        x = torch.floor(x * levels) / levels
    return x.to(dtype)


def _as_lists(x: torch.Tensor | None) -> list | None:
    return None if x is None else x.tolist()


# ---------------------------------------------------------------- shared building blocks


def test_topk_desc_matches_sorted_key() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(N_CASES):
        n = int(torch.randint(1, 80, (), generator=gen))
        k = int(torch.randint(0, n + 1, (), generator=gen))
        x = _scores(gen, (n,), DTYPES[int(torch.randint(0, 3, (), generator=gen))])
        got = topk_desc(x, k).tolist()
        assert got == naive_topk(x.float().tolist(), k)


def test_topk_desc_ties_go_to_lower_index() -> None:
    x = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.5, -0.0, 1.0])
    assert topk_desc(x, 7).tolist() == [1, 3, 6, 2, 4, 0, 5]
    assert topk_desc(x[None].expand(3, -1), 2).tolist() == [[1, 3]] * 3


def test_pool1d_centred_odd_and_even() -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(N_CASES):
        n = int(torch.randint(1, 60, (), generator=gen))
        kernel = int(torch.randint(1, 12, (), generator=gen))
        rows = int(torch.randint(1, 4, (), generator=gen))
        x = _scores(gen, (rows, n), torch.float32)
        got = pool1d(x, kernel)
        assert got.shape == x.shape
        assert got.tolist() == [naive_pool(r, kernel) for r in x.tolist()]
    # even kernel: one more step to the right than to the left
    x = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert pool1d(x, 4).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="kernel"):
        pool1d(x, 0)


def test_neighbor_offsets_order() -> None:
    assert neighbor_offsets(32).tolist()[:5] == [0, -1, 1, -2, 2]
    assert neighbor_offsets(32).tolist()[-3:] == [-15, 15, 16]
    assert sorted(neighbor_offsets(32).tolist()) == list(range(-15, 17))
    for n in range(0, 70):
        assert neighbor_offsets(n).tolist() == naive_offsets(n), n


def test_first_occurrences() -> None:
    rng = random.Random(3)
    for _ in range(N_CASES):
        upper = rng.randint(1, 30)
        seq = [rng.randrange(upper) for _ in range(rng.randint(0, 60))]
        want = list(dict.fromkeys(seq))
        assert first_occurrences(torch.tensor(seq, dtype=torch.long), upper).tolist() == want


def test_window_probs_matches_naive_softmax() -> None:
    gen = torch.Generator().manual_seed(4)
    for case in range(N_CASES):
        dtype = DTYPES[case % 3]
        h_kv = int(torch.randint(1, 4, (), generator=gen))
        g = int(torch.randint(1, 4, (), generator=gen))
        s = int(torch.randint(1, 70, (), generator=gen))
        wq = int(torch.randint(1, s + 1, (), generator=gen))
        d = (8, 16, 32)[case % 3]
        q = torch.randn(wq, h_kv * g, d, generator=gen).to(dtype)
        k = torch.randn(s, h_kv, d, generator=gen).to(dtype)
        got = window_probs(q, k)
        assert got.dtype == torch.float32 and got.shape == (h_kv * g, wq, s)
        want = naive_window_probs(q, k)
        torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=1e-6)
        # causal inside the window: query i never sees keys after position s - wq + i
        assert torch.all(got.triu(diagonal=s - wq + 1) == 0)


# ---------------------------------------------------------------- SpecKV / SnapKV-style


def _speckv_case(gen: torch.Generator) -> tuple[int, int, int, int]:
    window = int(torch.randint(0, 9, (), generator=gen))
    budget = window + int(torch.randint(0, 20, (), generator=gen))
    budget = max(budget, 1)
    prompt_len = max(window + 1, budget + int(torch.randint(-3, 60, (), generator=gen)))
    kernel = int(torch.randint(1, 10, (), generator=gen))
    return window, budget, prompt_len, kernel


def test_speckv_select_matches_naive() -> None:
    gen = torch.Generator().manual_seed(5)
    for case in range(N_CASES):
        window, budget, prompt_len, kernel = _speckv_case(gen)
        h_kv = int(torch.randint(1, 5, (), generator=gen))
        scores = _scores(gen, (h_kv, prompt_len - window - 1), DTYPES[case % 3])
        got = speckv_select(scores, prompt_len, budget, window, kernel)
        want = naive_speckv_select(scores.float().tolist(), prompt_len, budget, window, kernel)
        assert _as_lists(got) == want, (window, budget, prompt_len, kernel)
        if got is not None:
            assert got.shape == (h_kv, budget) and int(got.max()) <= prompt_len - 2


def test_speckv_from_qk_matches_naive_chain() -> None:
    """Window queries of ``P + D`` -> grouped scores -> selection, with n draft tokens."""
    gen = torch.Generator().manual_seed(6)
    for case in range(N_CASES):
        dtype = DTYPES[case % 3]
        window, budget, prompt_len, kernel = _speckv_case(gen)
        n = int(torch.randint(0, 5, (), generator=gen))
        h_kv = int(torch.randint(1, 4, (), generator=gen))
        g = int(torch.randint(1, 4, (), generator=gen))
        wq = window + n + 1
        q = torch.randn(wq, h_kv * g, 16, generator=gen).to(dtype)
        k = torch.randn(prompt_len + n, h_kv, 16, generator=gen).to(dtype)
        got = speckv_select_qk(q, k, prompt_len, budget, window, kernel)
        if prompt_len <= budget:
            assert got is None
            continue
        probs = window_probs(q, k)  # exactness of the softmax itself: test above
        n_keys = prompt_len - window - 1
        naive_scores = naive_speckv_scores(probs, h_kv, n_keys)
        assert grouped_window_scores(q, k, n_keys).tolist() == naive_scores
        want = naive_speckv_select(naive_scores, prompt_len, budget, window, kernel)
        assert _as_lists(got) == want


def test_speckv_edges() -> None:
    scores = torch.rand(2, 40 - 8 - 1)
    # L = C + 1: nothing is dropped, P[L-1] is re-fed
    assert speckv_select(scores, 40, 39, 8, 7).tolist() == [list(range(39))] * 2
    assert speckv_select(torch.rand(2, 31), 40, 40, 8, 7) is None
    kept = speckv_select(scores, 40, 20, 8, 7)
    assert kept.shape == (2, 20)
    assert kept[:, -8:].tolist() == [list(range(31, 39))] * 2  # the window P[L-W-1..L-2]
    with pytest.raises(ValueError, match="L - W - 1"):
        speckv_select(torch.rand(2, 30), 40, 20, 8, 7)


# ---------------------------------------------------------------- StreamingLLM


def test_streamingllm_matches_naive() -> None:
    rng = random.Random(7)
    for _ in range(N_CASES):
        budget = rng.randint(1, 40)
        sink = rng.randint(0, budget)
        prompt_len = rng.randint(1, 100)
        got = streamingllm_select(prompt_len, budget, sink)
        assert _as_lists(got) == naive_streamingllm(prompt_len, budget, sink)
    assert streamingllm_select(11, 10, 4).tolist() == list(range(10))  # L = C + 1: all kept
    policy = build_policy(make_approx_config("streamingllm", {"kv_budget": 8}))
    keys = torch.zeros(20, 3, 4)  # [L, H_kv, D]: StreamingLLM reads only their shape
    assert policy.select_kv_once(20, None, keys).tolist() == [[0, 1, 2, 3, 15, 16, 17, 18]] * 3
    with pytest.raises(ValueError, match="sink_tokens"):
        streamingllm_select(20, 4, 5)


# ---------------------------------------------------------------- SpecPC


def test_specpc_select_matches_naive() -> None:
    gen = torch.Generator().manual_seed(8)
    for case in range(N_CASES):
        window = int(torch.randint(0, 12, (), generator=gen))
        budget = max(1, window + int(torch.randint(0, 40, (), generator=gen)))
        prompt_len = int(torch.randint(1, 160, (), generator=gen))
        kernel = int(torch.randint(1, 12, (), generator=gen))
        neighbors = int(torch.randint(0, 12, (), generator=gen))
        score = _scores(gen, (prompt_len,), DTYPES[case % 3])
        got = specpc_select(score, budget, window, kernel, neighbors)
        want = naive_specpc_select(score.float().tolist(), budget, window, kernel, neighbors)
        assert _as_lists(got) == want, (window, budget, prompt_len, kernel, neighbors)
        if got is not None:
            assert got.numel() == budget
            assert set(range(prompt_len - window, prompt_len)) <= set(got.tolist())


def test_specpc_token_scores_match_naive() -> None:
    gen = torch.Generator().manual_seed(9)
    for case in range(N_CASES):
        prompt_len = int(torch.randint(2, 40, (), generator=gen))
        window = int(torch.randint(1, prompt_len + 1, (), generator=gen))
        n_layers = int(torch.randint(1, 5, (), generator=gen))
        start_layer = int(torch.randint(0, n_layers, (), generator=gen))
        steps = int(torch.randint(1, 4, (), generator=gen))  # prefill + decode steps
        heads = int(torch.randint(1, 4, (), generator=gen))
        weighted = bool(case % 2)
        raw = []
        for step in range(steps):
            rows = window if step == 0 else 1
            keys = prompt_len + step
            shape = (heads, rows, keys)
            raw.append(
                [
                    None if layer < start_layer else _scores(gen, shape, torch.float32)
                    for layer in range(n_layers)
                ]
            )
        reduced = [
            [
                None if p is None else specpc_record_scores(p, window if s == 0 else 0, weighted)
                for p in layers
            ]
            for s, layers in enumerate(raw)
        ]
        got = specpc_token_scores(reduced, prompt_len, start_layer)
        want = naive_specpc_scores(raw, prompt_len, window, start_layer, weighted)
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)


def test_specpc_weighting_only_on_prompt_rows() -> None:
    probs = torch.ones(1, 5, 3)  # 4 prompt rows + 1 draft row in one prefill record
    assert specpc_record_scores(probs, 4, True).tolist() == [1.0, 1.0, 1.0]
    probs[:, 4] = 0.5
    assert specpc_record_scores(probs, 4, True).tolist() == [1.0, 1.0, 1.0]  # row 3 weighs 1
    probs[:, 3] = 0.25
    got = specpc_record_scores(probs, 4, True)
    torch.testing.assert_close(got, torch.full((3,), 2 / 3))  # max(1 * 2/3, 0.25 * 1, 0.5)
    assert specpc_record_scores(probs, 4, False).tolist() == [1.0, 1.0, 1.0]


def test_specpc_edges() -> None:
    assert specpc_select(torch.rand(10), 10, 4, 3, 3) is None  # L <= C
    assert specpc_select(torch.rand(10), 5, 12, 3, 3) is None  # L < W
    score = torch.zeros(100)
    score[50] = 1.0
    got = specpc_select(score, 10, 4, 1, 6).tolist()
    # window 96..99 first, then 50 and its neighbours -2..+3 fill the budget of 10
    assert got == [48, 49, 50, 51, 52, 53, 96, 97, 98, 99]
    got = specpc_select(score, 9, 4, 1, 6).tolist()
    assert got == [48, 49, 50, 51, 52, 96, 97, 98, 99]  # +3 comes last in the order
    got = specpc_select(score, 12, 4, 1, 6).tolist()
    assert got == [0, 1, 48, 49, 50, 51, 52, 53, 96, 97, 98, 99]  # next: top 2 = index 0


# ---------------------------------------------------------------- policies and configs


def test_registry_and_flags() -> None:
    assert set(POLICIES) == set(METHODS)
    flags = {m: (p.needs_draft, p.compresses_prompt, p.compresses_kv) for m, p in POLICIES.items()}
    assert flags == {
        "none": (False, False, False),
        "speckv": (True, False, True),
        "snapkv": (False, False, True),
        "streamingllm": (False, False, True),
        "specpc": (True, True, False),
        "speckv_pc": (True, True, True),
    }
    with pytest.raises(ValueError, match="unknown approx method"):
        get_policy("h2o")


def test_policy_objects_delegate_to_functions() -> None:
    gen = torch.Generator().manual_seed(10)
    speckv = build_policy(make_approx_config("speckv", {"kv_budget": 20, "window": 4}))
    assert speckv.draft_tokens(100) == 32 and speckv.draft_tokens(10) == 10
    n = 3
    q = torch.randn(len(speckv.kv_rows(50, n)), 6, 8, generator=gen)
    k = torch.randn(50 + n, 2, 8, generator=gen)
    assert torch.equal(speckv.select_kv_once(50, q, k), speckv_select_qk(q, k, 50, 20, 4, 7))
    assert speckv.select_kv_once(20, q, k) is None
    snap = build_policy(make_approx_config("snapkv", {"kv_budget": 20, "window": 4}))
    assert snap.draft_tokens(100) == 0 and len(snap.kv_rows(50, 0)) == 5
    casc = build_policy(make_approx_config("speckv_pc", {"kv_budget": 20, "window": 4}))
    # the cascade drafts SpecKV's n (ALGORITHMS.md, corrected): max_tokens, capped (32)
    assert casc.draft_tokens(500) == 32 and casc.draft_tokens(10) == 10
    assert 3000 - casc.prompt_rows(3000, 20).start == 64
    assert torch.equal(casc.select_kv_once(50, q, k), speckv_select_qk(q, k, 50, 20, 4, 7))
    pc = build_policy(make_approx_config("specpc", {"prompt_budget": 16, "window": 4}))
    score = torch.rand(40, generator=gen)
    assert torch.equal(pc.select_prompt(score), specpc_select(score, 16, 4, 32, 32))
    assert pc.applies(17) and not pc.applies(16)


def test_method_yaml_defaults_match_algorithms_md() -> None:
    d = load_method_defaults(REPO / "configs" / "methods")
    assert set(d) == set(METHODS)
    cfg = {m: make_approx_config(m, defaults=d[m]) for m in METHODS}
    assert cfg["speckv"].model_dump() == {
        "method": "speckv",
        "kv_budget": 256,
        "window": 32,
        "kernel": 7,
        "lookahead": None,
        "max_lookahead": 32,
    }
    assert cfg["snapkv"].lookahead == 0 and cfg["snapkv"].kernel == 7
    assert cfg["streamingllm"].sink_tokens == 4 and cfg["streamingllm"].kv_budget == 256
    assert cfg["specpc"].model_dump() == {
        "method": "specpc",
        "prompt_budget": 1024,
        "window": 64,
        "lookahead": 1,
        "kernel": 32,
        "neighbors": 32,
        "start_layer": 8,
        "weighted_query": True,
    }
    c = cfg["speckv_pc"]
    assert (
        c.prompt_budget,
        c.pc_kernel,
        c.neighbors,
        c.kv_budget,
        c.window,
        c.kernel,
        c.lookahead,
        c.max_lookahead,
    ) == (2048, 32, 32, 256, 32, 7, None, 32)
    # the class defaults are the same paper defaults
    for m in METHODS:
        assert make_approx_config(m) == cfg[m]
    assert load_method_defaults(REPO / "configs") == d


@pytest.mark.parametrize(
    ("method", "overrides", "field"),
    [
        ("speckv", {"kv_budget": 16}, "kv_budget"),
        ("speckv", {"kv_budget": 0, "window": 0}, "kv_budget"),
        ("speckv", {"kernel": 0}, "kernel"),
        ("speckv", {"kernal": 5}, "kernal"),
        ("snapkv", {"lookahead": 3}, "lookahead"),
        ("specpc", {"prompt_budget": 32}, "prompt_budget"),
        ("specpc", {"neighbors": -1}, "neighbors"),
        ("specpc", {"sink_tokens": 4}, "sink_tokens"),
        ("streamingllm", {"kv_budget": 2}, "sink_tokens"),
        ("speckv_pc", {"prompt_budget": 10}, "pc_window"),
        ("speckv_pc", {"kv_budget": 8}, "kv_budget"),
        ("h2o", {}, "method"),
        ("speckv", {"method": "snapkv"}, "method"),
    ],
)
def test_config_errors_name_the_field(method: str, overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        make_approx_config(method, overrides)
    if method in METHODS and "method" not in overrides:
        assert isinstance(info.value, ValidationError)


def test_overrides_beat_yaml_defaults(tmp_path: Path) -> None:
    (tmp_path / "speckv.yaml").write_text("method: speckv\nkv_budget: 512\nwindow: 16\n")
    d = load_method_defaults(tmp_path)
    cfg = make_approx_config("speckv", {"window": 8}, d["speckv"])
    assert (cfg.kv_budget, cfg.window, cfg.kernel) == (512, 8, 7)
    (tmp_path / "snapkv.yaml").write_text("method: speckv\n")
    with pytest.raises(ValueError, match="file name"):
        load_method_defaults(tmp_path)
    (tmp_path / "snapkv.yaml").write_text("kv_budget: 4\n")
    with pytest.raises(ValueError, match="(?s)snapkv.yaml.*kv_budget"):
        load_method_defaults(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this run")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(11)
    for _ in range(20):
        q = torch.randn(40, 9, 64, generator=gen, dtype=torch.float32).bfloat16()
        k = torch.randn(300, 3, 64, generator=gen).bfloat16()
        cpu_probs = window_probs(q, k)
        assert torch.equal(pool1d(cpu_probs, 7).cuda().cpu(), pool1d(cpu_probs.cuda(), 7).cpu())
        scores = cpu_probs.amax(dim=1)
        assert torch.equal(topk_desc(scores, 100), topk_desc(scores.cuda(), 100).cpu())
        s = _scores(gen, (300,), torch.float32)
        want = specpc_select(s, 64, 8, 7, 7)
        assert torch.equal(want, specpc_select(s.cuda(), 64, 8, 7, 7).cpu())

