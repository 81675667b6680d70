"""Pure torch + tensorly kernels: task vectors, the merge, the functional forward, the preference tensor."""

from paretomerge.kernels.architecture import ModuleSpec
from paretomerge.kernels.merge import (
    forward_features,
    forward_features_many,
    forward_tasks,
    merge,
    preference_coefficients,
    select_model,
)
from paretomerge.kernels.merged_model import MergedModel, materialize
from paretomerge.kernels.preference_tensor import DEFAULT_TARGETS, PreferenceTensor, select_targets
from paretomerge.kernels.task_vectors import TaskVectors

__all__ = [
    "DEFAULT_TARGETS",
    "MergedModel",
    "ModuleSpec",
    "PreferenceTensor",
    "TaskVectors",
    "forward_features",
    "forward_features_many",
    "forward_tasks",
    "materialize",
    "merge",
    "preference_coefficients",
    "select_model",
    "select_targets",
]
