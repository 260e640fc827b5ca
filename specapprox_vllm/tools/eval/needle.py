"""Needle-in-a-haystack prompts, deterministic from a seed.

A haystack of ordinary English sentences (drawn from a fixed bank and a few templates, so it
reads like prose rather than random tokens), one "needle" sentence carrying a key -> number
fact at a chosen depth, and a question about that key at the end, wrapped in the model's chat
template. The answer is a 6-digit number, checked by substring.

Why this test: the needle is far from both ends of a long prompt, so a method that keeps only
recent tokens (StreamingLLM) loses it, while a method that keeps what the answer attends to
(SpecKV with a good draft) keeps it. Nothing here depends on vLLM or torch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["NeedleCase", "make_needle_case", "needle_suite"]

_SENTENCES = (
    "The morning train was late again, so most passengers read the newspaper on the platform.",
    "A good garden needs patience more than it needs expensive tools.",
    "The old library kept its maps in a cold room on the second floor.",
    "Many small towns hold a market every Saturday where farmers sell fresh bread and cheese.",
    "She learned to play the piano by listening to records her grandfather left behind.",
    "The river freezes every winter, and children skate on it when the ice is thick enough.",
    "Engineers tested the bridge for weeks before it opened to traffic.",
    "A quiet walk after dinner often helps people sleep better at night.",
    "The museum added a new wing for paintings from the nineteenth century.",
    "Bakers start work long before sunrise so that the shelves are full by seven.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Sailors once used the stars to find their way across the open sea.",
    "Most of the apples in the valley are picked by hand in early autumn.",
    "The teacher asked the class to write a short story about their favourite place.",
    "Heavy rain flooded the lower streets, but the shops reopened the next day.",
    "The company moved its offices to a brick building near the harbour.",
    "A cup of tea and a warm blanket make a long evening feel shorter.",
    "Birds gather on the power lines before they fly south for the winter.",
    "The mountain trail is steep near the top, and hikers usually rest at the old cabin.",
    "He repaired the bicycle himself, using a manual he found in the attic.",
    "The festival ended with music in the square and lanterns along the canal.",
    "Scientists measured the temperature of the lake every month for ten years.",
    "The kitchen smelled of cinnamon because someone had baked rolls that afternoon.",
    "Fog rolled in from the coast and hid the lighthouse for most of the day.",
    "The new bus line connects the university with the hospital and the station.",
    "Her notebook was full of sketches of buildings she had seen while travelling.",
    "The farmers worried that the dry summer would ruin the wheat harvest.",
    "On clear nights the whole village can see the lights of the city across the bay.",
    "The orchestra rehearsed the symphony three times before the concert.",
    "A stray cat slept every afternoon on the warm steps of the post office.",
)
_TEMPLATES = (
    "In {year}, the {place} in {town} {event}.",
    "People in {town} still talk about the day the {place} {event}.",
    "According to local records, the {place} of {town} {event} in {year}.",
)
_PLACES = ("town hall", "old mill", "harbour office", "school", "theatre", "market hall")
_TOWNS = ("Alderby", "Brookfield", "Cresthaven", "Dunmore", "Elmstead", "Fairhollow", "Glenwick")
_EVENTS = (
    "was painted a bright shade of green",
    "opened its doors to visitors for the first time",
    "was rebuilt after a long and difficult winter",
    "hosted a dance that lasted until midnight",
    "changed its opening hours to suit the farmers",
)
_ADJ = ("silver", "crimson", "amber", "cobalt", "emerald", "ivory", "scarlet", "golden")
_NOUNS = ("falcon", "harbour", "lantern", "orchard", "compass", "glacier", "meadow", "violin")


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kw: Any) -> Any: ...


@dataclass(frozen=True)
class NeedleCase:
    """One needle prompt.

    Attributes:
        seed, depth: what generated it (depth = fraction of the haystack before the needle).
        key: the phrase the question asks about; answer: the 6-digit number.
        messages: chat messages (one user turn); prompt_ids: them through the chat template
            with the generation prompt (empty if no tokenizer was given).
        needle_char: character offset of the needle inside the user message.
    """

    seed: int
    depth: float
    key: str
    answer: str
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    needle_char: int

    def is_correct(self, text: str) -> bool:
        """Whether a completion contains the answer."""
        return self.answer in text.replace(",", "").replace(" ", "")


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_TEMPLATES).format(
            year=rng.randint(1850, 2015),
            place=rng.choice(_PLACES),
            town=rng.choice(_TOWNS),
            event=rng.choice(_EVENTS),
        )
    return rng.choice(_SENTENCES)


def make_needle_case(
    tokenizer: _Tokenizer | None,
    context_tokens: int = 2000,
    seed: int = 0,
    depth: float = 0.5,
) -> NeedleCase:
    """Build a case whose haystack has about ``context_tokens`` tokens (needle at ``depth``).

    With ``tokenizer=None`` the length is estimated at 4 characters per token and
    ``prompt_ids`` is empty (for callers that tokenize server-side).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = f"{rng.choice(_ADJ)} {rng.choice(_NOUNS)}"
    answer = str(rng.randint(100000, 999999))
    needle = f"The secret number of the {key} is {answer}."

    def n_tokens(text: str) -> int:
        if tokenizer is None:
            return len(text) // 4
        return len(tokenizer.encode(text, add_special_tokens=False))

    sentences: list[str] = []
    # grow in chunks, measuring the real token count now and then (tokenizing is not free)
    while True:
        sentences.extend(_sentence(rng) for _ in range(20))
        if n_tokens(" ".join(sentences)) >= context_tokens:
            break
    while len(sentences) > 1 and n_tokens(" ".join(sentences[:-1])) >= context_tokens:
        sentences.pop()
    at = round(depth * len(sentences))
    before = " ".join(sentences[:at])
    after = " ".join(sentences[at:])
    haystack = " ".join(s for s in (before, needle, after) if s)
    question = f"What is the secret number of the {key}? Answer with the number only."
    content = f"Read the text and answer the question.\n\n{haystack}\n\nQuestion: {question}"
    messages = [{"role": "user", "content": content}]
    ids: list[int] = []
    if tokenizer is not None:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        ids = [int(t) for t in out]
    return NeedleCase(
        seed=seed,
        depth=depth,
        key=key,
        answer=answer,
        messages=messages,
        prompt_ids=ids,
        needle_char=content.index(needle),
    )


def needle_suite(
    tokenizer: _Tokenizer | None,
    n: int,
    context_tokens: int = 2000,
    seed: int = 0,
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> list[NeedleCase]:
    """``n`` cases with seeds ``seed, seed+1, ...`` and depths cycling through ``depths``."""
    return [
        make_needle_case(tokenizer, context_tokens, seed + i, depths[i % len(depths)])
        for i in range(n)
    ]
