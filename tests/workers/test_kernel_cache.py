"""Compiled kernels recorded into an engine and restored from it (kernel_cache).

The mechanics run anywhere (Triton's cache is directories of files, kept by its
cache manager); the GPU test checks the point of it: a load in a fresh process with an empty Triton
cache compiles nothing that the engine did not bring.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from kiln.workers import kernel_cache


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    monkeypatch.setitem(kernel_cache._state, "compiled", False)
    local = tmp_path / "local-cache"
    local.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(local))
    return local


def _entry(root, name, payload="cubin"):
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "kernel.cubin"), "w") as f:
        f.write(payload)


def test_recording_keeps_every_entry_triton_used(fresh_state, tmp_path):
    """Entries written (a compile) and entries only looked up (compiled earlier on this machine)
    both go into the bundle, through Triton's own cache manager."""
    from triton.runtime.cache import get_cache_manager as manager

    def get_cache_manager(name):  # Triton's keys are hex digests
        return manager(hashlib.sha256(name.encode()).hexdigest())

    old = get_cache_manager("compiled-last-week")
    old.put("old cubin", "k.cubin")
    old_dir = os.path.dirname(old.get_file("k.cubin"))
    dest = str(tmp_path / "engine" / "kernels" / "gpu")
    with kernel_cache.record_into(dest):
        assert get_cache_manager("compiled-last-week").get_file("k.cubin")  # a lookup, no compile
        get_cache_manager("compiled-now").put("new cubin", "k.cubin")
        with kernel_cache.record_into(str(tmp_path / "other")):  # nested: adds nothing
            pass
    assert "TRITON_CACHE_MANAGER" not in os.environ
    assert os.path.basename(old_dir) in os.listdir(dest) and len(os.listdir(dest)) == 2
    assert sorted(os.listdir(dest)) == sorted(os.listdir(fresh_state))
    assert not os.path.exists(tmp_path / "other")
    with kernel_cache.record_into(str(tmp_path / "again")):  # this process has run kernels: no recording
        get_cache_manager("later").put("x", "k.cubin")
    assert not os.path.exists(tmp_path / "again")


def test_an_existing_bundle_is_left_alone(fresh_state, tmp_path):
    dest = tmp_path / "bundle"
    _entry(dest, "OLD")
    with kernel_cache.record_into(str(dest)):
        assert "TRITON_CACHE_MANAGER" not in os.environ
    assert os.listdir(dest) == ["OLD"]


def test_merge_adds_missing_entries_and_never_overwrites(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _entry(src, "A", "new")
    _entry(src, "B", "new")
    _entry(dst, "A", "mine")
    assert kernel_cache._merge(str(src), str(dst)) == 1
    assert open(dst / "A" / "kernel.cubin").read() == "mine"
    assert open(dst / "B" / "kernel.cubin").read() == "new"
    assert sorted(os.listdir(dst)) == ["A", "B"]  # no staging directories left behind
    assert kernel_cache._merge(str(tmp_path / "missing"), str(dst)) == 0


def test_moved_entries_point_their_groups_at_their_new_home(tmp_path):
    """Triton finds a compiled kernel through its group file's absolute member paths."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _entry(src, "H")
    with open(src / "H" / "__grp__k.json", "w") as f:
        json.dump({"child_paths": {"k.cubin": str(src / "H" / "k.cubin"), "k.json": str(src / "H" / "k.json")}}, f)
    kernel_cache._merge(str(src), str(dst))
    with open(dst / "H" / "__grp__k.json") as f:
        children = json.load(f)["child_paths"]
    assert children == {"k.cubin": str(dst / "H" / "k.cubin"), "k.json": str(dst / "H" / "k.json")}


@pytest.mark.gpu
def test_fresh_process_load_compiles_nothing_the_engine_did_not_bring(tmp_path):
    import torch

    from kiln.config import EngineConfig, SchedulerConfig
    from kiln.workers.builder import Builder

    out = str(tmp_path / "engine")
    code = ("import sys; from kiln.config import EngineConfig, SchedulerConfig; "
            "from kiln.workers.builder import Builder; "
            "Builder(EngineConfig(model='smollm2-135m', random_weights=True, "
            "scheduler=SchedulerConfig(max_model_len=512, max_num_seqs=16)), verbose=False).build(sys.argv[1])")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "build-cache"))
    subprocess.run([sys.executable, "-c", code, out], check=True, env=env)  # a fresh process, as `kiln build`
    bundle = kernel_cache.bundle_path(out, torch.device("cuda"))
    brought = set(os.listdir(bundle))
    assert brought
    # Loaded in a fresh process with an empty Triton cache: every kernel is found, none compiled
    # (a compile would write its entry's files anew; restored ones keep the bundle's times; the group
    # files are rewritten by the restore itself).
    load = ("import sys, time; from kiln import LLM, SamplingParams; t = time.time(); "
            "llm = LLM(sys.argv[1], max_model_len=512, max_num_seqs=16); print('LOADED', t, flush=True); "
            "import os, glob; print('NEWEST', max(os.path.getmtime(p) for p in glob.glob(os.environ['TRITON_CACHE_DIR'] "
            "+ '/*/*') if '__grp__' not in p)); print(llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4))[0].outputs[0].token_ids)")
    fresh = tmp_path / "fresh-machine-cache"
    proc = subprocess.run([sys.executable, "-c", load, out], check=True, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_CACHE_DIR=str(fresh)))
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("LOADED", "NEWEST")))
    assert float(lines["NEWEST"]) < float(lines["LOADED"]), "the load compiled kernels"
    assert set(os.listdir(fresh)) <= brought, json.dumps(sorted(set(os.listdir(fresh)) - brought))
