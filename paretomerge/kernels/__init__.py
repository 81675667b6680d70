"""Pure torch + tensorly kernels: task vectors, the merge, the functional forward, the preference tensor."""

from paretomerge.kernels.architecture import ModuleSpec
from paretomerge.kernels.basis import PreferenceBasis
from paretomerge.kernels.builders import recognise
from paretomerge.kernels.merge import (
    check_labels,
    compile_backend,
    features_of,
    forward_features,
    forward_features_many,
    forward_tasks,
    merge,
    preference_coefficients,
    run_head,
    select_model,
)
from paretomerge.kernels.merged_model import MergedModel, materialize
from paretomerge.kernels.preference_tensor import DEFAULT_TARGETS, PreferenceTensor, select_targets
from paretomerge.kernels.task_vectors import TaskVectors

__all__ = [
    "DEFAULT_TARGETS",
    "MergedModel",
    "ModuleSpec",
    "PreferenceBasis",
    "PreferenceTensor",
    "TaskVectors",
    "check_labels",
    "compile_backend",
    "features_of",
    "forward_features",
    "forward_features_many",
    "forward_tasks",
    "materialize",
    "merge",
    "preference_coefficients",
    "recognise",
    "run_head",
    "select_model",
    "select_targets",
]
