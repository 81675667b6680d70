"""Datamodules that also produce their `TaskVectors`: the embedded `TinySuite` (and, later, CLIP)."""

from paretomerge.suites.cache import CacheError
from paretomerge.suites.tiny import FAST_RECIPE, FAST_TASKS, TinySuite

__all__ = ["FAST_RECIPE", "FAST_TASKS", "CacheError", "TinySuite"]
