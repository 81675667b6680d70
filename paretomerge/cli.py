"""The `paretomerge` console script: LightningCLI with `fit`, `validate` and `test`, and `front`.

    paretomerge fit --config configs/X.yaml
    paretomerge fit --config configs/X.yaml --config configs/ddp.yaml --trainer.devices 8
    paretomerge front --ckpt path.ckpt [--prefs 0.7,0.3 ...] --out front.png
    paretomerge export --ckpt path.ckpt --out pareto_set.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from paretomerge.callbacks import LogProgressBar
from paretomerge.front import evaluate_front, module_preferences, static_point
from paretomerge.modules import AdaMerging, CheckpointError, MergingModule, ParetoMerging
from paretomerge.modules.checkpoint import MissingModulesError, inspect_checkpoint
from paretomerge.modules.export import export_pareto_set
from paretomerge.pareto import hypervolume, non_dominated
from paretomerge.plotting import Overlay, front_figures, front_table, save_figure, write_front_csv
from paretomerge.preferences import validate_preference
from paretomerge.progress import interactive

_SPECIAL_CKPT_PATHS = {"last", "best", "hpc", "registry"}


class ParetoMergeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in {"fit", "validate", "test"}}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not interactive():  # a log, not a terminal: lines every few seconds instead of a bar redrawn every step
            defaults = (TQDMProgressBar, RichProgressBar)  # Lightning's default bars; a bar a config names stays
            trainer.callbacks[:] = [LogProgressBar() if type(c) in defaults else c for c in trainer.callbacks]
        return trainer

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


_OLD_CALLBACK_PATH = re.compile(r"(?<![\w.])callbacks\.(front_logger|fit_summary|map_baseline)\.(\w+)")


def _refuse_old_callback_paths(argv: list[str]) -> None:
    """Configs written before the callbacks moved into the package name ``callbacks.front_logger.ParetoFrontLogger``;
    say what to write instead of letting jsonargparse report an import path that does not exist."""
    texts = [a for a in argv if not a.startswith("--config")]
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" \
            and i + 1 < len(argv) else None
        if path and Path(path).is_file():
            texts.append(Path(path).read_text(errors="replace"))
    for text in texts:
        found = _OLD_CALLBACK_PATH.search(text)
        if found:
            sys.exit(f"paretomerge: {found.group(0)!r} is the callbacks' old path; they install inside the package "
                     f"now: write 'paretomerge.callbacks.{found.group(2)}'")


def main(args: Any = None) -> None:
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] in _SUBCOMMANDS:
        _SUBCOMMANDS[argv[0]](argv[1:])
        return
    if argv:
        _refuse_old_callback_paths(argv)
    ParetoMergeCLI(
        MergingModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Preference-aware model merging. Subcommands: fit, validate, test "
                                      "(LightningCLI); front: paretomerge front --ckpt X.ckpt --out front.png "
                                      "(see paretomerge front -h); export: paretomerge export --ckpt X.ckpt --out "
                                      "pareto_set.safetensors (see paretomerge export -h)."},
        args=args,
    )


# ---------------------------------------------------------------------- paretomerge front
def _import_class(path: str, base: type, what: str) -> type:
    """The class at ``path`` (``module.Name``), refused unless it subclasses ``base``. Only paretomerge's own modules
    and modules already imported are imported: a checkpoint does not get to run a package's import-time code."""
    module_name, _, name = str(path).rpartition(".")
    if not (module_name in sys.modules or module_name.split(".")[0] == "paretomerge"):
        raise ValueError(f"the checkpoint names {what} class {path!r} from {module_name!r}, which is not imported; "
                         "paretomerge front rebuilds only paretomerge's own suites (use the Python API for others)")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"the checkpoint names {what} class {path!r}, which cannot be imported ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"the checkpoint's {what} class {path!r} is not a {base.__name__}")
    return cls


def _load_module(path: str) -> tuple[MergingModule, dict[str, Any]]:
    """The module a `.ckpt` was written by, loaded from it (class from its hyperparameters), and the raw checkpoint
    (tensors memory-mapped)."""
    inspect_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "_class_path" in hparams:
        module_cls = _import_class(hparams["_class_path"], MergingModule, "model")
    else:  # fitted from Python rather than the CLI: the preference tensor's weights tell which module
        has_tensor = any(k.startswith("preference_tensor.") for k in checkpoint["state_dict"])
        module_cls = ParetoMerging if has_tensor else AdaMerging
    return module_cls.load_from_checkpoint(path, map_location="cpu"), checkpoint


def _parse_preferences(texts: list[str], num_tasks: int) -> torch.Tensor:
    rows = []
    for text in texts:
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            raise ValueError(f"--prefs {text!r}: write a preference as {num_tasks} comma-separated numbers, "
                             f"e.g. {','.join(['1'] * num_tasks)}") from None
        rows.append(validate_preference(values, num_tasks))
    return torch.stack(rows)


def front_command(argv: list[str]) -> None:
    """``paretomerge front --ckpt X.ckpt [--prefs 0.7,0.3 ...] --out front.png``."""
    parser = argparse.ArgumentParser(
        prog="paretomerge front",
        description="Evaluate a checkpoint's front on the suite recorded in it; write the figure (PNG), a CSV of "
                    "the points, and print the table.")
    parser.add_argument("--ckpt", required=True, help="a .ckpt written by paretomerge fit")
    parser.add_argument("--prefs", nargs="+", metavar="P",
                        help="preferences, each K comma-separated weights (e.g. 0.7,0.3); default: the equal "
                             "preference, the one-hots and the SPEC §4 set")
    parser.add_argument("--out", default="front.png", help="the PNG to write (default front.png); the CSV goes beside "
                                                           "it, and for K>=4 the parallel-coordinates plot too")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="labeled split (default test)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the Dirichlet part of the default set (K>=4)")
    parser.add_argument("--cache-dir", help="where the suite's cache lives, if not where it was when fitting")
    parser.add_argument("--no-baselines", action="store_true",
                        help="do not evaluate Task Arithmetic (it needs the suite's task vectors, built on first use)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {args.out!r}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    try:
        model, checkpoint = _load_module(args.ckpt)
        module_cls = type(model)
        data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        if not data:
            raise ValueError(f"{args.ckpt!r} records no datamodule (it was fitted without one), so there is no "
                             "suite to evaluate on")
        data_cls = _import_class(data.pop("_class_path", "paretomerge.suites.TinySuite"), LightningDataModule,
                                 "datamodule")
        data.pop("_instantiator", None)
        if args.cache_dir is not None:
            data["cache_dir"] = args.cache_dir
        if "progress" in data:
            data["progress"] = not args.no_progress
        suite = data_cls(**data)
        if not hasattr(suite, "evaluate"):
            raise ValueError(f"the checkpoint's datamodule {data_cls.__name__} has no evaluate(net, split)")
        tasks = list(model.task_vectors.task_names)
        if list(getattr(suite, "tasks", tasks)) != tasks:
            raise ValueError(f"the checkpoint's model has tasks {tasks}, its datamodule {list(suite.tasks)}")
        if args.prefs:
            if not model.preference_aware:
                raise ValueError(f"{module_cls.__name__} gives one model whatever the preference; leave out --prefs")
            preferences = _parse_preferences(args.prefs, len(tasks))
        else:
            preferences = module_preferences(model, args.seed)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, KeyError) as err:
        sys.exit(f"paretomerge front: {err}")
    accuracy = evaluate_front(model, suite, preferences, progress=not args.no_progress, split=args.split).numpy()
    overlays, references = [], {}
    if not args.no_baselines:
        from paretomerge.front import individual_accuracy, zero_shot_accuracy

        tv = suite.task_vectors()
        overlays.append(Overlay("Task Arithmetic", static_point("task_arithmetic", tv, suite, args.split)))
        references = {"zero-shot": zero_shot_accuracy(tv, suite, args.split),
                      "individual": individual_accuracy(tv, suite, args.split)}
    prefs = preferences.numpy()
    title = f"{module_cls.__name__}, {Path(args.ckpt).name} (step {checkpoint.get('global_step')}), {args.split} split"
    figures = front_figures(accuracy, prefs, tasks, overlays, title=title, references=references)
    written = [save_figure(figures["front"], out)]
    if "parallel_coordinates" in figures:
        written.append(save_figure(figures["parallel_coordinates"], out.with_name(out.stem + "_parallel.png")))
    written.append(write_front_csv(out.with_suffix(".csv"), accuracy, prefs, tasks))
    print(front_table(accuracy, prefs, tasks))
    print(f"\nhypervolume {hypervolume(accuracy):.4f}; {len(non_dominated(accuracy))} of {len(prefs)} points "
          f"non-dominated (*)")
    for label, points in [(o.label, o.points[0]) for o in overlays] + list(references.items()):
        print(f"{label}: " + ", ".join(f"{t} {100 * v:.1f}" for t, v in zip(tasks, points, strict=True)))
    print("wrote " + ", ".join(str(p) for p in written))


# ---------------------------------------------------------------------- paretomerge export
def export_command(argv: list[str]) -> None:
    """``paretomerge export --ckpt X.ckpt --out pareto_set.safetensors``."""
    parser = argparse.ArgumentParser(
        prog="paretomerge export",
        description="Write a checkpoint's Pareto set as one safetensors file: the preference-independent base, the "
                    "preference tensor, ours' preference basis (int8 factors), the heads and the config. Load it with "
                    "paretomerge.load_pareto_set(path), then .at(preference); no Trainer needed.")
    parser.add_argument("--ckpt", required=True, help="a .ckpt written by paretomerge fit")
    parser.add_argument("--out", default="pareto_set.safetensors", help="the file to write (.safetensors)")
    args = parser.parse_args(argv)
    if Path(args.out).suffix != ".safetensors":
        parser.error(f"--out must name a .safetensors file, got {args.out!r}")
    try:
        model, _ = _load_module(args.ckpt)
    except MissingModulesError as err:
        sys.exit(f"paretomerge export: {err}. The command line cannot build your modules: load the model in Python "
                 "with that call, then export_pareto_set(model, out)")
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, KeyError) as err:
        sys.exit(f"paretomerge export: {err}")
    path = export_pareto_set(model, args.out)
    tv = model.task_vectors
    backbone = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    size = path.stat().st_size
    print(f"wrote {path}: {size / 2**20:.1f} MiB, {size / backbone:.3f}x one backbone ({backbone / 2**20:.1f} MiB); "
          f"{len(tv.task_names)} tasks")


_SUBCOMMANDS = {"front": front_command, "export": export_command}


if __name__ == "__main__":
    main()
