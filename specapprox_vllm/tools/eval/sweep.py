"""The accuracy sweep's grid and its aggregation (pure Python; the HTTP side lives in
:mod:`specapprox_vllm.tools.eval.accuracy`).

A *setting* is one ``approx`` object (a method at a budget). Every case of every (task,
length) cell is served once per setting; full attention (:data:`REFERENCE`) is the
reference. Cells where it scores below ``min_full`` are dropped from the averages
(RULER-style calibration: a 135M model cannot do every task, and a method cannot lose
accuracy the model never had), and the report says which.

Which budget a method takes is a fact of its policy: a KV method (``compresses_kv``) sweeps
``kv_budget``, a prompt method (``compresses_prompt``) ``prompt_budget``; a method that does
both (the cascade) sweeps ``kv_budget`` at a fixed ``prompt_budget``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from specapprox_vllm.policies import DEFAULT_METHOD, get_policy

#: The setting every other one is compared with: full attention, no budget.
REFERENCE = DEFAULT_METHOD


def int_list(text: str) -> list[int]:
    """A comma-separated flag (``--lengths 1024,4096``, ``--kv-budgets``) as integers."""
    return [int(x) for x in text.split(",") if x]


def compresses(method: str) -> bool:
    """Whether ``method`` takes a budget at all (the reference takes none)."""
    policy = get_policy(method)
    return policy.compresses_kv or policy.compresses_prompt


def caps_lookahead(method: str) -> bool:
    """Whether ``method``'s lookahead ``n`` is the request's ``max_tokens`` capped by a
    ``max_lookahead`` setting (SpecKV and the cascade)."""
    return "max_lookahead" in get_policy(method).config_cls.model_fields


@dataclass(frozen=True)
class Setting:
    method: str
    budget: int | None  # the swept budget (KV entries, or prompt tokens for a prompt method)
    max_lookahead: int | None = None  # the lookahead cap, when not the method's default

    @property
    def label(self) -> str:
        """``speckv@128``; with a cap of its own ``speckv+max_lookahead=64@128`` (the
        ``method+key=value`` form of the benchmarks), so both live in one records file."""
        name = self.method
        if self.max_lookahead is not None:
            name += f"+max_lookahead={self.max_lookahead}"
        return name if self.budget is None else f"{name}@{self.budget}"

    @property
    def is_reference(self) -> bool:
        return self.method == REFERENCE

    def approx(self, cascade_prompt_budget: int = 2048) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.budget is None:
            return out
        policy = get_policy(self.method)
        if policy.compresses_kv:
            out["kv_budget"] = self.budget
            if policy.compresses_prompt:
                out["prompt_budget"] = cascade_prompt_budget
        elif policy.compresses_prompt:
            out["prompt_budget"] = self.budget
        if self.max_lookahead is not None:
            out["max_lookahead"] = self.max_lookahead
        return out


def settings(methods: list[str], kv_budgets: list[int], prompt_budgets: list[int],
             max_lookahead: int | None = None) -> list[Setting]:
    """The reference first (it warms the prefix cache for the rest), then each method that
    compresses at each of its budgets. ``max_lookahead`` applies to the methods that cap
    their lookahead (:func:`caps_lookahead`); the others keep their settings and labels."""
    out = [Setting(REFERENCE, None)]
    for m in methods:
        if not compresses(m):
            continue
        budgets = kv_budgets if get_policy(m).compresses_kv else prompt_budgets
        cap = max_lookahead if caps_lookahead(m) else None
        out += [Setting(m, b, cap) for b in budgets]
    return out


def settings_from_flags(args: Any) -> list[Setting]:
    """:func:`settings` from an eval's ``--methods``, ``--kv-budgets`` and ``--prompt-budgets``
    (comma-separated strings), and its ``--max-lookahead`` where it has one."""
    return settings(args.methods.split(","), int_list(args.kv_budgets),
                    int_list(args.prompt_budgets), getattr(args, "max_lookahead", None))


def cell_means(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    """Mean score per (setting label, task, length)."""
    acc: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        acc[(r["setting"], r["task"], r["length"])].append(r["score"])
    return {k: statistics.fmean(v) for k, v in acc.items()}


def calibrate(means: dict[tuple[str, str, int], float], min_full: float = 0.5
              ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(kept cells, dropped cells): a cell is kept when full attention scores >= min_full."""
    cells = sorted({(t, n) for (s, t, n) in means if s == REFERENCE})
    kept = [c for c in cells if means[(REFERENCE, *c)] >= min_full]
    return kept, [c for c in cells if c not in kept]


def summarize(records: list[dict[str, Any]], min_full: float = 0.5) -> dict[str, Any]:
    """Per setting: the mean over kept cells, per task (over lengths) and per length (over
    tasks); plus which cells were dropped, and the sample count per cell."""
    means = cell_means(records)
    kept, dropped = calibrate(means, min_full)
    counts: dict[tuple[str, str, int], int] = defaultdict(int)
    for r in records:
        if (r["task"], r["length"]) in kept:  # dropped cells are not in the table
            counts[(r["setting"], r["task"], r["length"])] += 1
    labels = list(dict.fromkeys(r["setting"] for r in records))
    table: dict[str, Any] = {}
    for label in labels:
        vals = [means[(label, *c)] for c in kept if (label, *c) in means]
        tasks = sorted({t for t, _ in kept})
        lengths = sorted({n for _, n in kept})
        table[label] = {
            "mean": statistics.fmean(vals) if vals else None,
            "by_task": {t: _mean([means.get((label, t, n)) for tt, n in kept if tt == t])
                        for t in tasks},
            "by_length": {str(n): _mean([means.get((label, t, n)) for t, nn in kept
                                         if nn == n]) for n in lengths},
        }
    return {
        "min_full": min_full,
        "kept_cells": [list(c) for c in kept],
        "dropped_cells": [{"task": t, "length": n, "full": means[(REFERENCE, t, n)]}
                          for t, n in dropped],
        "min_samples_per_cell": min(counts.values()) if counts else 0,
        "settings": table,
        "cells": {f"{s}|{t}|{n}": v for (s, t, n), v in sorted(means.items())},
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def markdown_table(summary: dict[str, Any]) -> str:
    """The accuracy table of ``docs/results.md``, from a :func:`summarize` result: one row per
    setting (mean over kept cells, per task, per length), then the dropped cells."""
    tasks = sorted({t for t, _ in summary["kept_cells"]})
    lengths = sorted({n for _, n in summary["kept_cells"]})
    head = ["setting", "mean", *tasks, *(str(n) for n in lengths)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    for label, row in summary["settings"].items():
        vals = [row["mean"], *(row["by_task"].get(t) for t in tasks),
                *(row["by_length"].get(str(n)) for n in lengths)]
        name = f"{label} (full)" if label == REFERENCE else label
        lines.append("| " + " | ".join([name, *(cell(v) for v in vals)]) + " |")
    for d in summary["dropped_cells"]:
        lines.append(f"\nDropped: {d['task']} at {d['length']} tokens (full attention "
                     f"{d['full']:.2f} < {summary['min_full']}).")
    lines.append(f"\nSamples per kept cell: at least {summary['min_samples_per_cell']}.")
    return "\n".join(lines) + "\n"
