"""HF-transformers referee of the approximation methods (tests only, never the server)."""

from .hf_referee import Referee, RefereeResult

__all__ = ["Referee", "RefereeResult"]
