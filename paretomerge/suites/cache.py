"""Built artefacts on disk: one directory per configuration, written atomically, verified on every read.

    <root>/<kind>/<config-hash>/
        *.safetensors, *.json      the artefacts
        manifest.json              the configuration and the SHA-256 of every artefact, written last

The root is the ``cache_dir`` argument, else ``$PARETOMERGE_CACHE``, else ``~/.cache/paretomerge``. A
directory is built under a temporary name and renamed into place only when complete, so a reader sees a
whole entry or none. An entry whose manifest is missing, unreadable, for another configuration, or whose
files do not match their hashes is reported and replaced, never half-loaded.

Processes that start at once (the ranks of a DDP job, several jobs on one machine) build an entry once:
`exclusive` holds an ``fcntl.flock`` on ``<root>/<kind>/.<config-hash>.lock`` while one of them builds, and the
others wait on it, then read what it wrote. flock works across processes on one machine and on most network file
systems that support it (NFSv4, Lustre with ``flock``); where it is unavailable the lock is skipped, and the
atomic rename above still keeps any one entry whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

MANIFEST = "manifest.json"
T = TypeVar("T")


class CacheError(RuntimeError):
    """A cache entry is missing, partial or corrupt."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PARETOMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "paretomerge"


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_entry(
    directory: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    documents: Mapping[str, Any],
) -> None:
    """Write ``tensors`` (file stem -> name -> tensor, as safetensors) and ``documents`` (file stem -> JSON)
    into ``directory``, atomically. An existing entry there is replaced."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.building-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        files = {}
        for stem, state in tensors.items():
            path = staging / f"{stem}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
            files[path.name] = file_sha256(path)
        for stem, document in documents.items():
            path = staging / f"{stem}.json"
            path.write_text(json.dumps(document, indent=2) + "\n")
            files[path.name] = file_sha256(path)
        manifest = {"config": dict(config), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            discard(directory)
        try:
            os.replace(staging, directory)
        except OSError:
            if not directory.exists():
                raise
            # Another process (a second node on a shared file system) finished the same entry first.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def discard(directory: Path) -> None:
    """Remove an entry: first renamed out of the way (atomic), then deleted."""
    trash = directory.parent / f".{directory.name}.discarded-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(directory, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def read_entry(directory: Path, config: Mapping[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The tensors and documents of a complete, verified entry for ``config``; raises `CacheError` otherwise."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CacheError(f"no cache entry at {directory}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        recorded = manifest["config"]
    except FileNotFoundError:
        raise CacheError(f"{directory} is partial: it has no {MANIFEST}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"{manifest_path} is unreadable ({err})") from None
    if recorded != json.loads(json.dumps(dict(config))):
        raise CacheError(f"{directory} was built for another configuration")
    tensors, documents = {}, {}
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CacheError(f"{path} is missing")
        if file_sha256(path) != expected:
            raise CacheError(f"{path} does not match its recorded SHA-256 (corrupt or changed)")
        stem, suffix = name.rsplit(".", 1)
        if suffix == "safetensors":
            tensors[stem] = load_file(str(path))
        else:
            documents[stem] = json.loads(path.read_text())
    return tensors, documents


def read_or_build(directory: Path, config: Mapping[str, Any], build: Callable[[], tuple[dict, dict]],
                  load: Callable[[dict, dict], T], on_wait: Callable[[str], None] | None = None,
                  on_unusable: Callable[[CacheError], None] | None = None) -> T:
    """``load(tensors, documents)`` of the entry at ``directory``, built first (``build() -> (tensors, documents)``,
    then written) if it is missing, partial or corrupt, or if ``load`` refuses it with `CacheError`. One process builds
    while any other starting at once waits on the lock (``on_wait``), then reads. ``on_unusable(error)`` hears about an
    entry that exists but cannot be used, before it is rebuilt."""
    try:
        return load(*read_entry(directory, config))
    except CacheError:
        pass
    with exclusive(directory, on_wait):
        try:
            return load(*read_entry(directory, config))
        except CacheError as err:
            if directory.exists() and on_unusable is not None:
                on_unusable(err)
        tensors, documents = build()
        write_entry(directory, config, tensors, documents)
        return load(tensors, documents)


@contextmanager
def exclusive(directory: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the build lock of the entry at ``directory`` (blocking); ``on_wait(message)`` is called once if another
    process holds it, so the waiting process can say why it is idle."""
    if fcntl is None:
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / f".{directory.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for another process (pid {_holder(handle)}) to finish building {directory}")
            start = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            if on_wait is not None:
                on_wait(f"waited {time.perf_counter() - start:.0f} s for {directory}")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(handle: Any) -> str:
    handle.seek(0)
    return handle.read().strip() or "?"
