"""Evaluation helpers (prompt generators, scoring); no vLLM imports."""

from .needle import NeedleCase, make_needle_case, needle_suite

__all__ = ["NeedleCase", "make_needle_case", "needle_suite"]
