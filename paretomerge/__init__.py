"""paretomerge: preference-aware model merging on PyTorch Lightning."""

from paretomerge.kernels import ModuleSpec, PreferenceTensor, TaskVectors, merge
from paretomerge.modules import CheckpointError, MergedModel, MergingModule, ParetoMerging
from paretomerge.preferences import validate_preference

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MergedModel",
    "MergingModule",
    "ModuleSpec",
    "ParetoMerging",
    "PreferenceTensor",
    "TaskVectors",
    "merge",
    "validate_preference",
]
