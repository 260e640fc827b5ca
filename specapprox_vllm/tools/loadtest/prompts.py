"""Prompts for a load test: synthetic long-context prompts of an exact token length, or a
JSONL file of prompts.

Why exact lengths: approximate-inference methods act on prompts longer than their budget, so a
test of "2048-token prompts" must really send 2048 tokens of the target's tokenizer. The text
is built from common English words and then fitted with the tokenizer (encode, cut, decode,
re-encode), because decoding and re-encoding a cut token list does not always round-trip.

Why a per-run tag at the start of every synthetic prompt: servers with prefix caching (ours and
vLLM's default) would otherwise serve the second setting of ``--compare`` from the cache that
the first filled, and the comparison would measure the cache, not the method.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river garden window market paper music table summer winter bridge island "
    "letter answer river mountain forest ocean village station engine signal method budget "
    "cache token window draft target memory record report planet garden harbor lantern"
).split()
TAIL = "\n\nSummarize the text above in one sentence."
MAX_FIT_ROUNDS = 8


class Tokenizer(Protocol):
    """The target's tokenizer, local or behind the server's ``/tokenize``."""

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: list[int]) -> str: ...


class LocalTokenizer:
    """An HF tokenizer folder (no hub access: ``local_files_only``)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    async def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    async def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class ServerTokenizer:
    """vLLM's ``/tokenize`` and ``/detokenize`` endpoints (the server's own tokenizer, so the
    counts are the target's by construction)."""

    def __init__(self, client: httpx.AsyncClient, root_url: str, model: str) -> None:
        self.client, self.root, self.model = client, root_url.rstrip("/"), model

    async def encode(self, text: str) -> list[int]:
        r = await self.client.post(f"{self.root}/tokenize", json={
            "model": self.model, "prompt": text, "add_special_tokens": False})
        r.raise_for_status()
        return list(r.json()["tokens"])

    async def decode(self, ids: list[int]) -> str:
        r = await self.client.post(f"{self.root}/detokenize",
                                   json={"model": self.model, "tokens": ids})
        r.raise_for_status()
        return str(r.json()["prompt"])


@dataclass
class Prompt:
    """One request's input: a plain prompt (completions) or chat messages, and its output
    length."""

    text: str | None
    messages: list[dict[str, Any]] | None
    output_len: int
    input_tokens: int | None = None   # tokens of ``text`` as fitted (synthetic prompts only)

    def as_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.text or ""}]


async def fit_text(tok: Tokenizer, head: str, body_words: list[str], n_tokens: int) -> tuple[
        str, int]:
    """``head + body + TAIL`` with exactly ``n_tokens`` tokens when the tokenizer allows it
    (otherwise the closest found), and its token count."""
    fixed = len(await tok.encode(head + TAIL))
    want = max(n_tokens - fixed, 1)
    body_ids = (await tok.encode(" ".join(body_words)))[:want]
    text, count = "", 0
    for _ in range(MAX_FIT_ROUNDS):
        text = head + (await tok.decode(body_ids)) + TAIL
        count = len(await tok.encode(text))
        if count == n_tokens:
            break
        if count > n_tokens:
            body_ids = body_ids[: max(len(body_ids) - (count - n_tokens), 1)]
        else:
            extra = await tok.encode(" " + " ".join(body_words[:n_tokens - count + 2]))
            body_ids = body_ids + extra[: n_tokens - count]
    return text, count


async def synthetic_prompts(tok: Tokenizer, num: int, input_len: int, output_len: int,
                            seed: int, run_tag: str | None) -> list[Prompt]:
    """``num`` prompts of ``input_len`` tokens. The body of prompt ``i`` depends only on
    ``(seed, i)``; ``run_tag`` (or nothing) prefixes it to defeat cross-run prefix caching."""
    if input_len < 16:
        raise ValueError("--input-len must be at least 16 tokens")
    out = []
    for i in range(num):
        rng = random.Random(seed * 1_000_003 + i)
        words = [rng.choice(WORDS) for _ in range(input_len + 16)]
        head = f"[{run_tag}-{i}] " if run_tag else ""
        text, count = await fit_text(tok, head, words, input_len)
        out.append(Prompt(text=text, messages=None, output_len=output_len, input_tokens=count))
    return out


def load_dataset(path: Path, num: int, default_output_len: int, seed: int,
                 shuffle: bool) -> list[Prompt]:
    """JSONL, one object a line: ``{"prompt": str}`` or ``{"messages": [...]}``, optionally
    ``"output_len"`` or ``"max_tokens"``. Cycles through the file when ``num`` exceeds it."""
    rows: list[Prompt] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not (isinstance(obj.get("prompt"), str)
                                             or isinstance(obj.get("messages"), list)):
            raise ValueError(f"{path}:{lineno}: needs a 'prompt' string or a 'messages' list")
        out_len = obj.get("output_len", obj.get("max_tokens", default_output_len))
        if not isinstance(out_len, int) or out_len < 1:
            raise ValueError(f"{path}:{lineno}: output_len must be a positive integer")
        rows.append(Prompt(text=obj.get("prompt"), messages=obj.get("messages"),
                           output_len=out_len))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    if shuffle:
        random.Random(seed).shuffle(rows)
    return [rows[i % len(rows)] for i in range(num)]


def tag_prompt(p: Prompt, run_tag: str | None, index: int) -> Prompt:
    """A dataset prompt with the run tag in front of its text (or its first message), so that
    ``--compare`` settings do not share prefix-cache entries."""
    if not run_tag:
        return p
    head = f"[{run_tag}-{index}] "
    if p.messages is not None:
        msgs = [dict(m) for m in p.messages]
        for m in msgs:
            if isinstance(m.get("content"), str):
                m["content"] = head + m["content"]
                break
        return Prompt(text=None, messages=msgs, output_len=p.output_len)
    return Prompt(text=head + (p.text or ""), messages=None, output_len=p.output_len)
