"""Datamodules that also produce their `TaskVectors`: the embedded `TinySuite`, the papers' `CLIPSuite`, and
`TensorSuite` for your own models and tensors."""

from paretomerge.suites.cache import CacheError
from paretomerge.suites.clip import CLIPSuite
from paretomerge.suites.clip_data import DatasetNotFoundError
from paretomerge.suites.importers import PickledCheckpointError
from paretomerge.suites.tensors import TensorSuite
from paretomerge.suites.tiny import FAST_RECIPE, FAST_TASKS, TinySuite

__all__ = ["FAST_RECIPE", "FAST_TASKS", "CLIPSuite", "CacheError", "DatasetNotFoundError", "PickledCheckpointError",
           "TensorSuite", "TinySuite"]
