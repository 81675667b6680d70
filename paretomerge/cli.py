"""The `paretomerge` console script: LightningCLI with `fit`, `validate` and `test`, and `front`.

    paretomerge fit --config configs/X.yaml
    paretomerge fit --config configs/X.yaml --config configs/ddp.yaml --trainer.devices 8
    paretomerge front --ckpt path.ckpt [--prefs 0.7,0.3 ...] --out front.png
    paretomerge export --ckpt path.ckpt --out pareto_set.safetensors
    paretomerge export --ckpt path.ckpt --at 0.7,0.3 --format open_clip|hf --out merged/
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
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from paretomerge.callbacks import LogProgressBar
from paretomerge.front import describe_reference, evaluate_front, module_preferences, static_point
from paretomerge.modules import AdaMerging, CheckpointError, MergingModule, ParetoMerging
from paretomerge.modules.checkpoint import MissingModulesError, inspect_checkpoint
from paretomerge.modules.export import export_model, export_pareto_set
from paretomerge.modules.formats import FORMATS
from paretomerge.pareto import measure_hypervolume, non_dominated, score_of
from paretomerge.plotting import Overlay, front_figures, front_table, save_figure, write_front_csv
from paretomerge.preferences import export_preference, validate_preference
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

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyperparameters stored in ``--ckpt_path`` into the config, where they take precedence,
        and passes them to the model's constructor. A checkpoint written by an earlier version may hold one retired
        since or lack one added since: the model class's ``upgrade_hyperparameters`` first turns them into what they
        mean today, as ``load_from_checkpoint`` does. (This overrides Lightning's own step of the same name.)"""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return  # nothing to read ("last", "best"...: Lightning finds those when it fits)
        stored = dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {})
        stored.pop("_instantiator", None)
        try:  # the class the checkpoint names (fitted by the CLI), else the config's (fitted from Python)
            class_path = stored.pop("_class_path", None) or self.config[subcommand].model.class_path
            cls = _import_class(class_path, MergingModule, "model")
        except (AttributeError, ValueError):
            super()._parse_ckpt_path()  # not a merging module of ours: Lightning's way, as it is
            return
        if not stored:
            return
        hparams = cls.upgrade_hyperparameters(stored)
        _say_upgraded(subcommand, path, cls, stored, hparams)
        update = {"class_path": class_path, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": update}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise


def _say_upgraded(subcommand: str, path: str, cls: type, stored: dict[str, Any], hparams: dict[str, Any]) -> None:
    """One line when a checkpoint's hyperparameters were upgraded: what it resumes with."""
    added = {k: v for k, v in hparams.items() if k not in stored}
    dropped = [k for k in stored if k not in hparams]
    parts = []
    if added:
        verb = "resumes" if subcommand == "fit" else "is loaded"
        parts.append(f"it {verb} as what it was trained as, {', '.join(f'{k}={v!r}' for k, v in added.items())} "
                     "(hyperparameters it predates; a checkpoint's hyperparameters take precedence over the config)")
    if dropped:
        parts.append(f"{', '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} retired and left out")
    if parts:
        rank_zero_info(f"paretomerge {subcommand}: {path} was written by an earlier version of {cls.__name__}: "
                       + "; ".join(parts))


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


def _suite_of(path: str, checkpoint: dict[str, Any], cache_dir: str | None, progress: bool) -> LightningDataModule:
    """The datamodule a checkpoint was fitted with, rebuilt from its recorded hyperparameters (only paretomerge's own
    suites, or classes already imported), with its cache at ``cache_dir`` where given."""
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not data:
        raise ValueError(f"{path!r} records no datamodule (it was fitted without one), so there is no suite to "
                         "evaluate on or to take a tokenizer from")
    # fitted by the CLI: its class path; from Python: the class the checkpoint records; before either: the TinySuite
    recorded = (checkpoint.get("paretomerge") or {}).get("datamodule_class", "paretomerge.suites.TinySuite")
    data_cls = _import_class(data.pop("_class_path", recorded), LightningDataModule, "datamodule")
    data.pop("_instantiator", None)
    if cache_dir is not None:
        data["cache_dir"] = cache_dir
    if "progress" in data:
        data["progress"] = progress
    return data_cls(**data)


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
        suite = _suite_of(args.ckpt, checkpoint, args.cache_dir, not args.no_progress)
        if not hasattr(suite, "evaluate"):
            raise ValueError(f"the checkpoint's datamodule {type(suite).__name__} has no evaluate(net, split)")
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
    values = evaluate_front(model, suite, preferences, progress=not args.no_progress, split=args.split).numpy()
    score = score_of(suite)
    overlays, references, reference = [], {}, None
    if not args.no_baselines:
        from paretomerge.front import individual_scores, zero_shot_scores

        tv = suite.task_vectors()
        overlays.append(Overlay("Task Arithmetic", static_point("task_arithmetic", tv, suite, args.split)))
        references = {"zero-shot": zero_shot_scores(tv, suite, args.split),
                      "individual": individual_scores(tv, suite, args.split)}
        reference = None if score.higher_is_better else references["zero-shot"]
    prefs = preferences.numpy()
    title = f"{module_cls.__name__}, {Path(args.ckpt).name} (step {checkpoint.get('global_step')}), {args.split} split"
    figures = front_figures(values, prefs, tasks, overlays, title=title, references=references, score=score)
    written = [save_figure(figures["front"], out)]
    if "parallel_coordinates" in figures:
        written.append(save_figure(figures["parallel_coordinates"], out.with_name(out.stem + "_parallel.png")))
    written.append(write_front_csv(out.with_suffix(".csv"), values, prefs, tasks, score=score))
    print(front_table(values, prefs, tasks, score=score))
    kept = f"{len(non_dominated(values, score))} of {len(prefs)} points non-dominated (*)"
    if score.higher_is_better or reference is not None:
        volume = measure_hypervolume(values, score=score, reference=reference)
        print(f"\nhypervolume {volume.value:.4f}, {volume.describe()} ({describe_reference(reference, tasks, suite)}); "
              f"{kept}")
    else:
        print(f"\n{kept}; no hypervolume: a {score.name} front needs θ0's {score.name} as its reference point, which "
              "--no-baselines leaves out")
    for label, points in [(o.label, o.points[0]) for o in overlays] + list(references.items()):
        print(f"{label}: " + ", ".join(f"{t} {float(score.shown(v)):.{1 if score.percent else 3}f}"
                                       for t, v in zip(tasks, points, strict=True)))
    print("wrote " + ", ".join(str(p) for p in written))


# ---------------------------------------------------------------------- paretomerge export
def export_command(argv: list[str]) -> None:
    """``paretomerge export --ckpt X.ckpt --out pareto_set.safetensors``, or one trade-off as an ordinary model:
    ``paretomerge export --ckpt X.ckpt --at 0.7,0.3 --format open_clip|hf --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="paretomerge export",
        description="Write a checkpoint's Pareto set as one safetensors file (--format pareto-set, the default: the "
                    "preference-independent base, the preference tensor, ours' preference basis, the heads and the "
                    "config; load it with paretomerge.load_pareto_set(path), then .at(preference)), or the model of "
                    "one preference, heads included, as an ordinary model that loads without paretomerge: --format "
                    "open_clip (an open_clip image tower: its state dict and model config) or --format hf (a Hugging "
                    "Face CLIPVisionModelWithProjection, or a causal LM with its tokenizer). DIR/README.md says how to "
                    "load it.")
    parser.add_argument("--ckpt", required=True, help="a .ckpt written by paretomerge fit")
    parser.add_argument("--out", help="the file to write (.safetensors; default pareto_set.safetensors), or for "
                                      "--format open_clip|hf the directory to create (it must not exist or be empty)")
    parser.add_argument("--format", choices=("pareto-set", *FORMATS), default="pareto-set",
                        help="pareto-set: the whole learned set in one file; open_clip, hf: the model at --at")
    parser.add_argument("--at", metavar="PREF", help="with --format open_clip|hf, the preference: K comma-separated "
                                                     "weights summing to 1 (e.g. 0.7,0.3), 'equal', or a task's name "
                                                     "(its one-hot)")
    parser.add_argument("--tokenizer", metavar="DIR", help="with --format hf for a causal LM: the tokenizer directory "
                                                           "to write beside it (default: the checkpoint's suite's)")
    parser.add_argument("--cache-dir", help="where the suite's cache lives, if not where it was when fitting")
    args = parser.parse_args(argv)
    if args.format == "pareto-set":
        for option in ("at", "tokenizer"):
            if getattr(args, option) is not None:
                parser.error(f"--{option} goes with --format open_clip or hf (the pareto-set export holds every "
                             "preference)")
        out = Path(args.out or "pareto_set.safetensors")
        if out.suffix != ".safetensors":
            parser.error(f"--out must name a .safetensors file, got {str(out)!r}")
    else:
        if not args.out:
            parser.error(f"--format {args.format} needs --out DIR, the directory to write the model into")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            parser.error(f"--out {str(out)!r} exists and is not an empty directory; name a new one")
    try:
        model, checkpoint = _load_module(args.ckpt)
    except MissingModulesError as err:
        sys.exit(f"paretomerge export: {err}. The command line cannot build your modules: load the model in Python "
                 "with that call, then export_pareto_set(model, out) or export_model(model, out, ...)")
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, KeyError) as err:
        sys.exit(f"paretomerge export: {err}")
    tv = model.task_vectors
    backbone = sum(t.numel() * t.element_size() for t in tv.backbone.state_dict().values())
    if args.format != "pareto-set":
        _export_model(args, model, checkpoint, out)
        return
    path = export_pareto_set(model, out)
    size = path.stat().st_size
    print(f"wrote {path}: {size / 2**20:.1f} MiB, {size / backbone:.3f}x one backbone ({backbone / 2**20:.1f} MiB); "
          f"{len(tv.task_names)} tasks")


def _export_model(args: argparse.Namespace, model: MergingModule, checkpoint: dict[str, Any], out: Path) -> None:
    """``model.at(--at)`` written by `export_model` as an open_clip or Hugging Face directory: a causal LM with its
    tokenizer, an image tower with its heads (and their class names, where the checkpoint's suite can say them)."""
    tasks = list(model.task_vectors.task_names)
    headless = all(isinstance(head, nn.Identity) for head in model.task_vectors.heads.values())
    try:
        if args.at is None and model.preference_aware:
            raise ValueError(f"--format {args.format} writes the model of one preference: give --at with {len(tasks)} "
                             f"weights, one per task ({', '.join(tasks)}), 'equal', or a task's name")
        try:
            preference = None if args.at is None else export_preference(args.at, tasks)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--at: {err}") from None
        tokenizer, class_names, note = None, None, ""
        if headless and args.format == "hf":
            tokenizer = _tokenizer(args, checkpoint)
        elif args.tokenizer is not None:
            raise ValueError("--tokenizer goes with a causal LM; this checkpoint's model has task heads")
        elif not headless:
            class_names, note = _class_names(args, checkpoint, tasks)
        export_model(model, out, format=args.format, at=preference, tokenizer=tokenizer, class_names=class_names)
    except (CheckpointError, OSError, ValueError, TypeError, KeyError) as err:
        sys.exit(f"paretomerge export: {err}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    where = "the preference " + ",".join(f"{v:.4g}" for v in preference.tolist()) \
        if preference is not None and model.preference_aware else "its one model"
    if headless:
        print(f"wrote {out}: {type(model.task_vectors.backbone).__name__} at {where} ({size / 2**20:.1f} MiB with the "
              f"tokenizer). Load it anywhere: AutoModelForCausalLM.from_pretrained({str(out)!r}), "
              f"AutoTokenizer.from_pretrained({str(out)!r})")
    else:
        print(f"wrote {out}: {type(model).__name__} at {where}, {len(tasks)} task heads, as {args.format} "
              f"({size / 2**20:.1f} MiB){note}. It loads without paretomerge: {out / 'README.md'} has the code")


def _tokenizer(args: argparse.Namespace, checkpoint: dict[str, Any]) -> Any:
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    suite = _suite_of(args.ckpt, checkpoint, args.cache_dir, progress=True)
    if not callable(getattr(suite, "tokenizer", None)):
        raise ValueError(f"the checkpoint's suite {type(suite).__name__} has no tokenizer; give --tokenizer DIR")
    return suite.tokenizer()


def _class_names(args: argparse.Namespace, checkpoint: dict[str, Any],
                 tasks: list[str]) -> tuple[dict[str, Any] | None, str]:
    """task -> class names from the checkpoint's suite (its ``class_names``), and a note where there are none: they
    only label heads.json, so an export goes on without them."""
    try:
        suite = _suite_of(args.ckpt, checkpoint, args.cache_dir, progress=False)
        names = getattr(suite, "class_names", None)
        if isinstance(names, dict) and all(t in names for t in tasks):
            return {t: list(names[t]) for t in tasks}, ""
        reason = f"its suite {type(suite).__name__} does not name them"
    except (OSError, ValueError, TypeError, KeyError, ImportError) as err:
        reason = str(err).splitlines()[0][:200]
    return None, f"; heads.json gives each head's class count, not its class names ({reason})"


_SUBCOMMANDS = {"front": front_command, "export": export_command}


if __name__ == "__main__":
    main()
