"""The `paretomerge` console script: LightningCLI with `fit`, `validate` and `test`.

    paretomerge fit --config configs/X.yaml
    paretomerge fit --config configs/X.yaml --trainer.devices 8 --trainer.strategy ddp
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from paretomerge.modules import CheckpointError, MergingModule
from paretomerge.modules.checkpoint import inspect_checkpoint

_SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}


class ParetoMergeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in {"fit", "validate", "test"}}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and str(path) not in _SPECIAL_CKPT_PATHS:
            weights_only = self.config[subcommand].get("weights_only") is not False
            try:
                inspect_checkpoint(path, weights_only)  # before Lightning reads hyperparameters out of it
            except (CheckpointError, FileNotFoundError) as err:
                sys.exit(f"paretomerge {subcommand}: --ckpt_path {err}")


def main(args: Any = None) -> None:
    ParetoMergeCLI(
        MergingModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
