"""LightningModules: the shared merging base and the methods built on it."""

from paretomerge.modules.base import MergedModel, MergingModule
from paretomerge.modules.checkpoint import CheckpointError
from paretomerge.modules.pareto_merging import ParetoMerging

__all__ = ["CheckpointError", "MergedModel", "MergingModule", "ParetoMerging"]
