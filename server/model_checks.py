"""Start-up checks of the configured models: what would otherwise fail on the first request,
or serve wrong results without a word.

* **The draft's vocabulary.** SpecPC and the cascade hand the draft's token ids to the target
  as the lookahead ``D`` and score the target's prompt positions with the draft's attention;
  a draft with another tokenizer would make both meaningless, silently. Compared before any
  engine starts: the token -> id maps (added tokens included) and the special tokens, not
  the file names.
* **What KV compaction can serve** (the target's attention layers, asked from its worker
  once the engine is up, :data:`specapprox_vllm.wire.RPC.KV_SUPPORT`): compacted keys are
  re-rotated to their new positions, which needs a RoPE that re-rotation reproduces, and
  every layer must attend to the whole prefix (no sliding window).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.config import ConfigError, ServerConfig

MAX_EXAMPLES = 3


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"model {path!r} is not a local folder (no hub names are loaded)")
    return AutoTokenizer.from_pretrained(path)


def vocabulary_differences(target: Any, draft: Any) -> list[str]:
    """What differs between two tokenizers' vocabularies (empty: the same ids mean the same
    tokens): size, tokens with other ids or missing, special tokens."""
    tv, dv = target.get_vocab(), draft.get_vocab()
    out = []
    if len(tv) != len(dv):
        out.append(f"{len(tv)} tokens in the target's vocabulary, {len(dv)} in the draft's")
    moved = [(tok, i, dv.get(tok)) for tok, i in sorted(tv.items(), key=lambda kv: kv[1])
             if dv.get(tok) != i]
    if moved:
        examples = ", ".join(f"{tok!r}: {i} vs {'missing' if j is None else j}"
                             for tok, i, j in moved[:MAX_EXAMPLES])
        out.append(f"{len(moved)} tokens have another id or none in the draft ({examples})")
    extra = len(set(dv) - set(tv))
    if extra:
        out.append(f"{extra} draft tokens are not in the target's vocabulary")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(target, name, None), getattr(draft, name, None)
        if a != b:
            out.append(f"{name}: {a!r} vs {b!r}")
    return out


def check_draft_tokenizer(cfg: ServerConfig) -> None:
    """Refuse a separate draft whose tokenizer differs from the target's (ConfigError naming
    both models and what differs). A self-draft or a truncated target shares it by
    construction."""
    from server.engines import needs_draft

    if not needs_draft(cfg) or cfg.draft.model == cfg.target.model:
        return
    diff = vocabulary_differences(_tokenizer(cfg.target.model), _tokenizer(cfg.draft.model))
    if diff:
        raise ConfigError(
            f"draft model {cfg.draft.model} does not share the target's tokenizer "
            f"({cfg.target.model}): " + "; ".join(diff) + ". The draft's token ids are "
            "handed to the target, so both must use one vocabulary.")


async def check_kv_support(target: Any) -> None:
    """Refuse a target whose attention KV compaction cannot serve exactly (ConfigError with
    the worker's reasons), right after its engine started."""
    from specapprox_vllm.wire import RPC

    problems = sorted({p for worker in await target.collective_rpc(RPC.KV_SUPPORT)
                       for p in worker})
    if problems:
        raise ConfigError(
            f"target model {target.model_config.model} cannot be served by KV compaction: "
            + "; ".join(problems))
