"""paretomerge: preference-aware model merging on PyTorch Lightning."""

from paretomerge.kernels import ModuleSpec, PreferenceTensor, TaskVectors, merge, recognise
from paretomerge.modules import (
    AdaMerging,
    CheckpointError,
    MergedModel,
    MergingModule,
    MissingModulesError,
    ParetoMerging,
    ParetoSet,
    UnseenTaskSelection,
    export_model,
    export_pareto_set,
    load_pareto_set,
    select_for_unseen_task,
)
from paretomerge.preferences import validate_preference
from paretomerge.static import STATIC_MERGES, static_merge, static_model

__version__ = "0.1.0"

__all__ = [
    "AdaMerging",
    "STATIC_MERGES",
    "CheckpointError",
    "MergedModel",
    "MergingModule",
    "MissingModulesError",
    "ModuleSpec",
    "ParetoMerging",
    "ParetoSet",
    "PreferenceTensor",
    "TaskVectors",
    "UnseenTaskSelection",
    "export_model",
    "export_pareto_set",
    "load_pareto_set",
    "merge",
    "recognise",
    "select_for_unseen_task",
    "static_merge",
    "static_model",
    "validate_preference",
]
