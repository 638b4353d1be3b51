"""Helpers shared by the benchmark scripts: provenance and result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    """The commit the code ran from. KILN_GIT_COMMIT, when set, wins: a tree exported with
    `git archive` and run elsewhere may sit inside some other, unrelated checkout."""
    if os.environ.get("KILN_GIT_COMMIT"):
        return os.environ["KILN_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(RESULTS)).stdout.strip()
        if len(commit) != 40:  # not a git checkout (e.g. a copied tree on a GPU machine)
            return "unknown"
        return commit + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_result(name: str, figures: dict, out_dir: str | None = None, **extra) -> str:
    import torch

    record = {
        "benchmark": name,
        "device": device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        **extra,
        "figures": figures,
    }
    out_dir = out_dir or os.environ.get("KILN_RESULTS_DIR") or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return path
