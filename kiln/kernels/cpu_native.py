"""Native CPU kernels: C sources in `kiln/kernels/csrc/`, compiled on first use.

Where the torch references are far from the CPU's limits (attention reads the
KV three times through a gather and SDPA; a small-batch linear streams its
weights at half the memory's speed through oneDNN; a norm is five passes), a
few lines of C that read each byte once do better. They are built
with the system C compiler (`cc`, or `$CC`) for this CPU (`-march=native`)
into `~/.cache/kiln/cpu-kernels` (or `$KILN_CPU_KERNEL_CACHE`), named by a hash
of the source, the flags, the compiler and the CPU, so a build happens once
per machine and processes sharing the directory reuse it. OpenMP parallelism
runs on torch's own OpenMP runtime (the library's `libgomp.so.1` resolves to
the one torch loaded), so the two share one thread pool.

With no compiler, or if the build fails, `load` returns None once and for all
and the dispatchers run the torch references, which compute the same thing.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

log = logging.getLogger("kiln.kernels")

# ctypes argument types of the kernels' C signatures
PTR, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int

_SRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


def cache_dir() -> str:
    return os.environ.get("KILN_CPU_KERNEL_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "kiln", "cpu-kernels"))


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, src: str, flags: list[str], out: str) -> str | None:
    """Compile `src` into `out` (atomically); None on success, else what went wrong."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
        os.close(fd)
        r = subprocess.run([cc, *flags, "-o", tmp, src, "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode:
            return (r.stderr or r.stdout).strip()[-2000:] or f"{cc} exited with {r.returncode}"
        os.replace(tmp, out)  # concurrent builders (e.g. Ray workers) each write whole files
        return None
    except (OSError, subprocess.SubprocessError) as e:  # no compiler, a read-only cache directory, ...
        return str(e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c`, built now if this machine has not built it; None if it cannot be."""
    if os.environ.get("KILN_CPU_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler (cc) found: the CPU runs the slower torch references")
        return None
    src = os.path.join(_SRC_DIR, name + ".c")
    code = b""
    for path in [src] + sorted(os.path.join(_SRC_DIR, h) for h in os.listdir(_SRC_DIR) if h.endswith(".h")):
        with open(path, "rb") as f:
            code += f.read()
    compiler = _compiler_id(cc)
    errors = []
    # Without OpenMP (e.g. clang with no libomp) the kernels run on one thread, still well ahead.
    for flags in (_FLAGS + ["-fopenmp"], _FLAGS):
        key = hashlib.sha256(b"\0".join([code, " ".join(flags).encode(), compiler.encode(),
                                         _cpu_id().encode()])).hexdigest()[:20]
        path = os.path.join(cache_dir(), f"{name}-{key}.so")
        if not os.path.exists(path):
            err = _build(cc, src, flags, path)
            if err is not None:
                errors.append(err)
                continue
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(str(e))
    log.warning("could not build the CPU kernel %s (%s); running the torch reference instead:\n%s",
                name, cc, errors[-1] if errors else "")
    return None


@functools.cache
def function(name: str, symbol: str, argtypes: tuple, restype=None):
    """`symbol` of the compiled `csrc/<name>.c` with its C signature, or None if it cannot be built."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn
