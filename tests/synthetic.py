"""A small synthetic merging problem for tests only: a tiny open_clip ViT with random θ0, random task
vectors, random linear heads and random images. Labels are the fine-tuned model's own predictions, so
each individual model scores 100% and a merge scores less. Everything comes from the seed."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paretomerge.kernels import ModuleSpec, TaskVectors


def vit_spec(image_size: int = 16, patch_size: int = 8, width: int = 32, layers: int = 2, heads: int = 4,
             output_dim: int = 16) -> ModuleSpec:
    return ModuleSpec(
        "open_clip.transformer:VisionTransformer",
        {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers, "heads": heads,
         "mlp_ratio": 4.0, "output_dim": output_dim},
    )


def build_problem(num_tasks: int = 3, seed: int = 0, tau_scale: float = 0.3, dtype: torch.dtype | None = None,
                  **vit: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]], dict[str, nn.Linear], list[str]]:
    """θ0 module, fine-tuned state dicts, heads and task names."""
    spec = vit_spec(**vit)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pretrained = spec.build()
        names = [f"task{k}" for k in range(num_tasks)]
        finetuned = []
        for _ in names:
            state = {}
            for key, value in pretrained.state_dict().items():
                scale = value.abs().mean() + 1e-2
                state[key] = value + tau_scale * scale * torch.randn_like(value) if value.is_floating_point() \
                    else value.clone()
            finetuned.append(state)
        out_dim = vit.get("output_dim", 16)
        heads = {n: nn.Linear(out_dim, 3 + k % 3) for k, n in enumerate(names)}
    return pretrained, finetuned, heads, names


def make_task_vectors(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype | None = None, **kw) -> TaskVectors:
    pretrained, finetuned, heads, names = build_problem(num_tasks, seed, **kw)
    return TaskVectors.from_state_dicts(pretrained, finetuned, names, heads, dtype=dtype)


class SyntheticSuite(LightningDataModule):
    def __init__(self, num_tasks: int = 3, batch_size: int = 8, num_batches: int = 4, image_size: int = 16,
                 width: int = 32, layers: int = 2, seed: int = 0, tau_scale: float = 0.3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._problem = None

    def _build(self):
        if self._problem is None:
            hp = self.hparams
            pretrained, finetuned, heads, names = build_problem(
                hp.num_tasks, hp.seed, hp.tau_scale, image_size=hp.image_size, width=hp.width, layers=hp.layers
            )
            tv = TaskVectors.from_state_dicts(pretrained, finetuned, names, heads)
            generator = torch.Generator().manual_seed(hp.seed + 1)
            n = hp.batch_size * hp.num_batches
            train = {t: torch.randn(n, 3, hp.image_size, hp.image_size, generator=generator) for t in names}
            val = {}
            for t, state in zip(names, finetuned, strict=True):
                images = torch.randn(n, 3, hp.image_size, hp.image_size, generator=generator)
                model = vit_spec(image_size=hp.image_size, width=hp.width, layers=hp.layers).build()
                model.load_state_dict(state)
                with torch.no_grad():
                    labels = heads[t](model.eval()(images)).argmax(-1)
                val[t] = (images, labels)
            self._problem = (tv, train, val)
        return self._problem

    def task_vectors(self) -> TaskVectors:
        return self._build()[0]

    def train_dataloader(self) -> CombinedLoader:
        _, train, _ = self._build()
        loaders = {t: DataLoader(TensorDataset(x), batch_size=self.hparams.batch_size) for t, x in train.items()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        _, _, val = self._build()
        loaders = {t: DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size) for t, (x, y) in val.items()}
        return CombinedLoader(loaders, mode="max_size")

    def test_dataloader(self) -> CombinedLoader:
        return self.val_dataloader()
