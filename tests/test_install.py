"""The project installs as one package: ``callbacks/`` goes in as ``paretomerge.callbacks``, and site-packages gets
no top-level ``callbacks`` (a name anything else may use)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["options"]["packages"].split()


def test_setup_cfg_lists_every_package_folder():
    """setup.cfg names the packages one by one (package_dir maps callbacks/ into paretomerge): a new sub-package
    left out of that list would be missing from every non-editable install."""
    on_disk = {"paretomerge." + p.parent.relative_to(ROOT / "paretomerge").as_posix().replace("/", ".")
               for p in (ROOT / "paretomerge").rglob("__init__.py") if p.parent != ROOT / "paretomerge"}
    assert (ROOT / "callbacks" / "__init__.py").is_file()
    assert set(_declared_packages()) == {"paretomerge", "paretomerge.callbacks"} | on_disk


@pytest.mark.slow
def test_a_non_editable_install_puts_callbacks_inside_the_package(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "lightning_logs", "*.egg-info",
                                                                "build", "__pycache__", "runs", "benchmarks"))
    run = {"check": True, "capture_output": True, "text": True, "timeout": 300}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "wheel"), str(source)], **run)
    wheel = next((tmp_path / "wheel").glob("paretomerge-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], **run)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               **run).stdout.strip())
    assert (site / "paretomerge" / "callbacks" / "__init__.py").is_file()
    assert not (site / "callbacks").exists()
    assert sorted(p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")) == \
        ["paretomerge"]
    # The dependencies come from this environment's site-packages, as a plain path: its .pth files (this checkout's
    # editable install among them) are not run, so paretomerge can only come from the fresh install.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    out = subprocess.run([str(python), "-c", "import importlib.util, paretomerge\n"
                          "from paretomerge.callbacks import FitSummary, MAPBaseline, ParetoFrontLogger\n"
                          "print(paretomerge.__file__, ParetoFrontLogger.__module__, "
                          "importlib.util.find_spec('callbacks'))"], cwd=tmp_path, **run).stdout.split()
    assert out == [str(site / "paretomerge" / "__init__.py"), "paretomerge.callbacks.front_logger", "None"]
