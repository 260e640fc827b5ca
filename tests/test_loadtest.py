"""The load tester and vLLM's own benchmark against a real server (shared with
test_metrics.py): the installed ``specapprox-loadtest`` console script must report the
successes of ``none`` and the 400s of a setting the server rejects, and write JSONL, summary
JSON and PNGs; ``vllm bench serve --backend openai-chat`` must finish with 0 failures."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from specapprox_vllm.policies import METHODS
from specapprox_vllm.tools.loadtest.prompts import LocalTokenizer, synthetic_prompts
from tests.conftest import ROOT, SMOLLM2_DIR
from tests.server_utils import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.model]
MODEL = "SmolLM2-135M-Instruct"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rejected_setting(base_url: str) -> str:
    """A ``--compare`` item this server answers with 400: a method that is not live yet, or
    (once every method is live) settings that fail validation."""
    for method in METHODS[1:]:
        r = httpx.post(f"{base_url}/v1/chat/completions", timeout=600, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "approx": {"method": method}})
        if r.status_code == 400:
            return method
        assert r.status_code == 200, r.text
    return '{"method": "speckv", "kv_budget": 0}'


@pytest.mark.timeout(900)
def test_loadtest_cli_reports_successes_failures_and_writes_files(
        live_server: ServerProcess, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "specapprox-loadtest"
    assert exe.is_file(), "console script missing: pip install -e . (scripts/setup.sh)"
    bad = rejected_setting(live_server.base_url)
    compare = f'["none", {bad}]' if bad.startswith("{") else f"none,{bad}"
    out = tmp_path / "lt"
    proc = subprocess.run(
        [str(exe), "--base-url", live_server.base_url, "--num-prompts", "8", "--input-len",
         "512", "--output-len", "16", "--max-concurrency", "4", "--ignore-eos",
         "--compare", compare, "--goodput", "ttft:600000", "tpot:600000", "--seed", "1",
         "--result-dir", str(out), "--plot", "--disable-tqdm"],
        capture_output=True, text=True, timeout=800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    blocks = text.split(" Serving Benchmark Result ")[1:]
    assert len(blocks) == 2 and "Comparison" in text
    assert "Successful requests:                     8" in blocks[0]
    assert "Failed requests:                         0" in blocks[0]
    assert "Request goodput (req/s):" in blocks[0]
    assert "Methods reported:                        none=8" in blocks[0]
    assert "Failed requests:                         8" in blocks[1]
    assert "By HTTP status:                          400=8" in blocks[1]
    assert "By error type:                           BadRequestError=8" in blocks[1]

    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    ok = [r for r in rows if r["setting"] == "none"]
    assert all(r["success"] and r["status"] == 200 for r in ok)
    for r in ok:
        assert r["completion_tokens"] == 16 and len(r["itl"]) >= 1 and r["tpot"] > 0
        assert r["prompt_tokens"] > 512  # 512 tokens of user text plus the chat template
        assert r["approx"]["method"] == "none"
        assert r["approx"]["prompt_tokens_in"] == r["prompt_tokens"]
        assert 0 < r["ttft"] <= r["last_token"] <= r["e2e"]
    failed = [r for r in rows if r["setting"] != "none"]
    assert all(not r["success"] and r["status"] == 400 and r["error_type"] == "BadRequestError"
               for r in failed)

    summary = json.loads((out / "summary.json").read_text())
    none = summary["settings"]["none"]
    assert none["completed"] == 8 and none["total_output_tokens"] == 8 * 16
    assert none["total_input_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert none["input_tokens_fitted"] == [512] * 5  # exact lengths, by the server's count
    assert none["goodput"]["good_requests"] == 8
    assert none["approx"]["prompt_tokens_in"]["sum"] == none["total_input_tokens"]
    other = [v for k, v in summary["settings"].items() if k != "none"][0]
    assert other["failures"]["by_status"] == {"400": 8}
    for png in ("latency_cdf.png", "throughput.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


@pytest.mark.timeout(900)
def test_synthetic_prompt_lengths_agree_with_the_server(live_server: ServerProcess) -> None:
    tok = LocalTokenizer(str(SMOLLM2_DIR))
    prompts = asyncio.run(synthetic_prompts(tok, 3, 300, 8, seed=5, run_tag="t0"))
    for p in prompts:
        r = httpx.post(f"{live_server.base_url}/tokenize", timeout=60, json={
            "model": MODEL, "prompt": p.text, "add_special_tokens": False})
        assert r.json()["count"] == p.input_tokens == 300


@pytest.mark.timeout(900)
def test_vllm_bench_serve_openai_chat_has_no_failures(
        live_server: ServerProcess, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "vllm_bench_serve.py"),
           "--backend", "openai-chat", "--base-url", live_server.base_url,
           "--endpoint", "/v1/chat/completions", "--model", MODEL,
           "--tokenizer", str(SMOLLM2_DIR), "--dataset-name", "random",
           "--random-input-len", "128", "--random-output-len", "8", "--num-prompts", "8",
           "--max-concurrency", "4", "--seed", "0", "--save-result", "--result-dir",
           str(tmp_path), "--result-filename", "bench.json", "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    saved = tmp_path / "bench.json"
    assert saved.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(saved.read_text())
    assert (result["completed"], result["failed"]) == (8, 0), proc.stdout[-3000:]
    assert result["total_output_tokens"] > 0
    assert proc.returncode == 0, proc.stderr[-3000:]
