"""RULER-style synthetic long-context tasks, generated offline and deterministically.

RULER (Hsieh et al., 2024) measures long-context retrieval and aggregation with synthetic
tasks whose answers are checked by string match. The tasks here follow its families, but
with our natural-sentence haystack (:mod:`specapprox_vllm.tools.eval.needle`) in place of essays,
so nothing has to be downloaded:

* ``niah_single``: one "special magic number" for one key;
* ``niah_multikey``: the same, with three distractor keys;
* ``niah_multivalue``: four numbers for one key, all of which must be returned;
* ``niah_multiquery``: four keys asked at once;
* ``vt`` (variable tracking): a chain ``VAR A = 12345. VAR B = VAR A. ...`` spread through
  the text; every variable that holds the value must be named;
* ``cwe`` (common-words extraction): a numbered word list; name its 10 most common words;
* ``qa``: short generated "documents" stating who runs which library, one asked about.

Scoring is RULER's ``string_match_all``: the fraction of reference strings that appear,
case-insensitively, in the reply. A case is a chat prompt of about ``length`` tokens in the
target's tokenizer (chat template included), and the same seed always gives the same case.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specapprox_vllm.tools.eval.needle import _ADJ, _NOUNS, _sentence

__all__ = ["TASKS", "EvalCase", "build_haystack", "chat_prompt", "count_tokens", "make_case",
           "random_key", "random_number", "string_match_all"]

_NAMES = ("Alice Moreau", "Bruno Keller", "Chen Wei", "Dara Singh", "Elena Rossi",
          "Farid Haddad", "Greta Olsen", "Hugo Lambert", "Ines Duarte", "Jonas Berg",
          "Keiko Sato", "Liam Walsh", "Maya Cohen", "Nils Ekman", "Olga Petrova", "Pablo Ruiz")
_WORDS = ("apple", "river", "candle", "pencil", "garden", "window", "basket", "ladder",
          "mirror", "feather", "hammer", "blanket", "button", "kettle", "saddle", "rocket",
          "tunnel", "violet", "walnut", "zipper", "anchor", "bottle", "cactus", "dragon",
          "engine", "forest", "guitar", "helmet", "island", "jacket", "kitten", "lemon",
          "marble", "needle", "orange", "parrot", "quartz", "rabbit", "spider", "tomato")


@dataclass(frozen=True)
class EvalCase:
    task: str
    length: int
    seed: int
    messages: list[dict[str, str]]
    answers: tuple[str, ...]
    max_tokens: int
    prompt_tokens: int  # with the chat template (0 without a tokenizer)

    def score(self, text: str) -> float:
        return string_match_all(text, self.answers)


def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's metric: the share of references found in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def _count(tokenizer: Any, text: str) -> int:
    if tokenizer is None:
        return len(text) // 4
    return len(tokenizer.encode(text, add_special_tokens=False))


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJ)}-{rng.choice(_NOUNS)}-{rng.randint(10, 99)}"
        if key not in used:
            used.add(key)
            return key


def _number(rng: random.Random, used: set[str]) -> str:
    while True:
        value = str(rng.randint(1000000, 9999999))
        if value not in used:
            used.add(value)
            return value


def _haystack(rng: random.Random, tokenizer: Any, budget: int, inserts: list[str]) -> str:
    """Natural sentences of about ``budget`` tokens with ``inserts`` at random depths (in
    the given order, so chains keep their order)."""
    sentences: list[str] = []
    while _count(tokenizer, " ".join(sentences)) < max(budget, 1):
        sentences.extend(_sentence(rng) for _ in range(20))
    while len(sentences) > 1 and _count(tokenizer, " ".join(sentences[:-1])) >= budget:
        sentences.pop()
    spots = sorted(rng.randint(0, len(sentences)) for _ in inserts)
    for offset, (spot, text) in enumerate(zip(spots, inserts, strict=True)):
        sentences.insert(spot + offset, text)
    return " ".join(sentences)


# Public names for the helpers other case builders share (tools.eval.multiturn builds its
# haystack and needles with exactly these, so its cases read like these); the underscored
# names stay, for this module and for anything that already imports them.
count_tokens = _count
random_key = _key
random_number = _number
build_haystack = _haystack


TaskFn = Callable[[random.Random], tuple[list[str], str, tuple[str, ...], int]]


def _niah(n_keys: int, n_values: int, n_queries: int) -> TaskFn:
    def build(rng: random.Random) -> tuple[list[str], str, tuple[str, ...], int]:
        keys_used: set[str] = set()
        values_used: set[str] = set()
        keys = [_key(rng, keys_used) for _ in range(max(n_keys, n_queries))]
        facts: list[tuple[str, str]] = []
        for i, key in enumerate(keys):
            for _ in range(n_values if i == 0 else 1):
                facts.append((key, _number(rng, values_used)))
        rng.shuffle(facts)
        inserts = [f"One of the special magic numbers for {k} is: {v}." for k, v in facts]
        asked = keys[:n_queries]
        answers = tuple(v for k, v in facts if k in asked)
        if n_queries > 1:
            q = (f"What are the special magic numbers for {', '.join(asked)} mentioned in the "
                 "provided text? Answer with the numbers only.")
        elif n_values > 1:
            q = (f"What are all the special magic numbers for {asked[0]} mentioned in the "
                 "provided text? Answer with the numbers only.")
        else:
            q = (f"What is the special magic number for {asked[0]} mentioned in the provided "
                 "text? Answer with the number only.")
        return inserts, q, answers, 32 + 16 * len(answers)  # replies restate the question
    return build


def _vt(rng: random.Random) -> tuple[list[str], str, tuple[str, ...], int]:
    value = str(rng.randint(10000, 99999))
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    inserts = [f"VAR {names[0]} = {value}."]
    inserts += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    q = (f"Find all variables that are assigned the value {value} in the text above, "
         "directly or through other variables. Answer with the variable names only.")
    return inserts, q, tuple(names), 64


def _qa(rng: random.Random) -> tuple[list[str], str, tuple[str, ...], int]:
    libraries = rng.sample([f"{a} {n}" for a in _ADJ for n in _NOUNS], 8)
    people = rng.sample(_NAMES, 8)
    inserts = [f"Document {i + 1}: {p} is the head librarian of the {lib} library."
               for i, (p, lib) in enumerate(zip(people, libraries, strict=True))]
    asked = rng.randrange(8)
    q = f"Who is the head librarian of the {libraries[asked]} library? Answer with the name only."
    return inserts, q, (people[asked],), 32


TASKS: dict[str, TaskFn | None] = {
    "niah_single": _niah(1, 1, 1),
    "niah_multikey": _niah(4, 1, 1),
    "niah_multivalue": _niah(1, 4, 1),
    "niah_multiquery": _niah(4, 1, 4),
    "vt": _vt,
    "cwe": None,  # a word list, not a haystack: built by _cwe_case
    "qa": _qa,
}


def _chat(tokenizer: Any, content: str) -> tuple[list[dict[str, str]], int]:
    messages = [{"role": "user", "content": content}]
    if tokenizer is None:
        return messages, 0
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return messages, len(ids)


chat_prompt = _chat  # (messages, prompt tokens with the chat template) of one user message


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def _cwe_content(rng: random.Random, n_words: int) -> tuple[str, tuple[str, ...]]:
    """A list of ``n_words`` entries: 10 common words, each ``n_words // 20`` times (at least
    4), the rest distinct made-up words seen once or twice."""
    common = rng.sample(_WORDS, 10)
    each = max(4, n_words // 20)
    rare: list[str] = []
    while len(rare) < max(0, n_words - 10 * each):
        word = _pseudo_word(rng)
        rare.extend([word] * rng.choice((1, 2)))
    words = common * each + rare[: max(0, n_words - 10 * each)]
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    q = "What are the 10 most common words in the above list? Answer with the words only."
    return f"Below is a numbered list of words.\n\n{listing}\n\nQuestion: {q}", tuple(common)


def make_case(task: str, tokenizer: Any, length: int, seed: int) -> EvalCase:
    """One case of ``task`` whose chat prompt has about ``length`` tokens."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    rng = random.Random(f"{task}:{length}:{seed}")
    if task == "cwe":
        n_words = max(40, length // 7)  # "17. walnut " is 6-7 tokens
        content, answers = _cwe_content(rng, n_words)
        messages, n = _chat(tokenizer, content)
        return EvalCase(task, length, seed, messages, answers, 96, n)
    build = TASKS[task]
    assert build is not None
    inserts, question, answers, max_tokens = build(rng)
    overhead = _count(tokenizer, " ".join(inserts) + question) + 40
    haystack = _haystack(rng, tokenizer, max(length - overhead, 16), inserts)
    content = f"Read the text and answer the question.\n\n{haystack}\n\nQuestion: {question}"
    messages, n = _chat(tokenizer, content)
    return EvalCase(task, length, seed, messages, answers, max_tokens, n)
