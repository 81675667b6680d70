"""LightningModules: the shared merging base and the methods built on it."""

from paretomerge.kernels import MergedModel
from paretomerge.modules.adamerging import AdaMerging
from paretomerge.modules.base import MergingModule
from paretomerge.modules.checkpoint import CheckpointError, MissingModulesError
from paretomerge.modules.export import ParetoSet, export_model, export_pareto_set, load_pareto_set
from paretomerge.modules.pareto_merging import ParetoMerging
from paretomerge.modules.selection import UnseenTaskSelection, select_for_unseen_task

__all__ = [
    "AdaMerging",
    "CheckpointError",
    "MergedModel",
    "MergingModule",
    "MissingModulesError",
    "ParetoMerging",
    "ParetoSet",
    "UnseenTaskSelection",
    "export_model",
    "export_pareto_set",
    "load_pareto_set",
    "select_for_unseen_task",
]
