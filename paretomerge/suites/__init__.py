"""Datamodules that also produce their `TaskVectors`: the embedded `TinySuite`, the papers' `CLIPSuite`,
`TensorSuite` for your own models and tensors, the CNN suites (the embedded `TinyResNetSuite`, and `ResNetSuite` for
MAP's ResNet-18 experiment), and for language models the embedded `TinyLMSuite` and `HFTextSuite` (Hugging Face
directories and local text files)."""

from paretomerge.suites.cache import CacheError
from paretomerge.suites.clip import CLIPSuite
from paretomerge.suites.clip_data import DatasetNotFoundError
from paretomerge.suites.hf_lm import HFModelError, causal_lm_task_vectors, memory_plan
from paretomerge.suites.hf_text import HFTextSuite
from paretomerge.suites.importers import PickledCheckpointError
from paretomerge.suites.resnet import ResNetSuite
from paretomerge.suites.tensors import TensorSuite
from paretomerge.suites.text import TextSuite
from paretomerge.suites.tiny import FAST_RECIPE, FAST_TASKS, TinySuite
from paretomerge.suites.tiny_lm import FAST_LM_RECIPE, TinyLMSuite
from paretomerge.suites.tiny_resnet import TinyResNetSuite

__all__ = ["FAST_LM_RECIPE", "FAST_RECIPE", "FAST_TASKS", "CLIPSuite", "CacheError", "DatasetNotFoundError",
           "HFModelError", "HFTextSuite", "PickledCheckpointError", "ResNetSuite", "TensorSuite", "TextSuite",
           "TinyLMSuite", "TinyResNetSuite", "TinySuite", "causal_lm_task_vectors", "memory_plan"]
