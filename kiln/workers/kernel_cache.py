"""Compiled Triton kernels travel inside an engine directory.

A load on a machine that has never compiled kiln's kernels spends most of its
time in Triton's compiler (8B on an H100: ~15 s of a ~25 s load). Triton keeps
what it compiles in a cache directory of entries named by a hash of the
kernel source, its specialization, the GPU target and the compiler version;
an entry copied into another machine's cache is found there by the same
hash. So an engine carries, per GPU kind and software stack, the entries its
loads use (`kernels/<target>/`): the build records them with a trial start
(one rank), or else the first load records them, and every later load first
merges them into the local cache. Recording hooks Triton's cache manager and
notes every entry looked up or written, so kernels this machine compiled
before are recorded without compiling them again. An entry that does not match
(another GPU, another Triton) is simply never looked up; correctness never
depends on the bundle, only load time.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile

import torch

log = logging.getLogger("kiln.kernels")

BUNDLE_DIR = "kernels"
# Set once this process has run kiln's kernels or begun a recording: a recording from then on
# would miss kernels found in memory (and one inside another would add nothing).
_state = {"compiled": False}


def mark_compiled() -> None:
    _state["compiled"] = True


def active_cache_dir() -> str:
    """Where Triton reads and writes compiled kernels in this process now."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    try:
        from triton import knobs
        return knobs.cache.dir
    except Exception:  # Triton before its knobs module
        return os.path.join(os.path.expanduser("~"), ".triton", "cache")


def target_name(device: torch.device) -> str:
    """GPU kind and software versions: a bundle is only worth restoring onto the same."""
    import triton

    props = torch.cuda.get_device_properties(device)
    raw = f"{props.name}-sm{props.major}{props.minor}-triton{triton.__version__}-torch{torch.__version__}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", raw)


def bundle_path(engine_dir: str, device: torch.device) -> str:
    return os.path.join(engine_dir, BUNDLE_DIR, target_name(device))


def _merge(src: str, dst: str) -> int:
    """Copy cache entries (directories) of src missing from dst; returns how many."""
    if not os.path.isdir(src):
        return 0
    return _copy_entries([os.path.join(src, e) for e in os.listdir(src)], dst)


def _copy_entries(entries, dst: str) -> int:
    os.makedirs(dst, exist_ok=True)
    n = 0
    for src in entries:
        target = os.path.join(dst, os.path.basename(src))
        if os.path.exists(target) or not os.path.isdir(src):
            continue
        tmp = tempfile.mkdtemp(dir=dst, prefix=".kiln-")  # whole entries appear atomically
        try:
            shutil.copytree(src, os.path.join(tmp, "e"))
            _repoint_groups(os.path.join(tmp, "e"), target)
            os.replace(os.path.join(tmp, "e"), target)
            n += 1
        except OSError:  # another process put it there first
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return n


def _repoint_groups(entry: str, final: str) -> None:
    """Triton's group files (__grp__*.json) list their members by absolute path, and an entry
    whose members are not at those paths is a cache miss: point them at the entry's new home."""
    for name in os.listdir(entry):
        if not (name.startswith("__grp__") and name.endswith(".json")):
            continue
        path = os.path.join(entry, name)
        with open(path) as f:
            group = json.load(f)
        children = group.get("child_paths")
        if isinstance(children, dict):
            group["child_paths"] = {k: os.path.join(final, os.path.basename(v)) for k, v in children.items()}
            with open(path, "w") as f:
                json.dump(group, f)


def restore(engine_dir: str, device: torch.device) -> int:
    """Merge the engine's kernels for this target into the local Triton cache."""
    if device.type != "cuda":
        return 0
    n = _merge(bundle_path(engine_dir, device), active_cache_dir())
    if n:
        log.info("restored %d compiled kernels from %s", n, engine_dir)
    return n


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK)


def recording(engine_dir: str, device: torch.device):
    """Note every Triton cache entry this process uses for the duration, then keep them as the
    engine's bundle (when it has none yet).

    Kernels the process ran before are found in memory, not in the cache, and so would not
    be noted: a process that has run kiln's kernels records nothing (a build's trial start
    and a served engine's first load run in fresh processes)."""
    if device.type != "cuda" or not _writable(engine_dir):
        return contextlib.nullcontext()
    return record_into(bundle_path(engine_dir, device))


_used: list[str] = []  # cache entries (directories) used while recording, in order


def __getattr__(name: str):
    """RecordingCacheManager is built on first use: importing this module needs no Triton."""
    if name == "RecordingCacheManager":
        from triton.runtime.cache import FileCacheManager

        class RecordingCacheManager(FileCacheManager):
            def __init__(self, key, override=False, dump=False):
                super().__init__(key, override, dump)
                if not (override or dump):
                    _used.append(self.cache_dir)

        globals()[name] = RecordingCacheManager
        return RecordingCacheManager
    raise AttributeError(name)


@contextlib.contextmanager
def record_into(dest: str):
    if os.path.isdir(dest) or _state["compiled"] or os.environ.get("TRITON_CACHE_MANAGER"):
        yield  # (a cache manager of the user's own, e.g. a remote cache, is left alone)
        return
    os.environ["TRITON_CACHE_MANAGER"] = f"{__name__}:RecordingCacheManager"
    _state["compiled"] = True
    _used.clear()
    try:
        yield
    finally:
        os.environ.pop("TRITON_CACHE_MANAGER", None)
        used = list(dict.fromkeys(p for p in _used if os.path.isdir(p)))
        if used:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            staging = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".kiln-")
            _copy_entries(used, staging)
            try:
                os.replace(staging, dest)  # a concurrent recorder may have won: theirs stands
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("recorded %d compiled kernels into %s", len(used), dest)
