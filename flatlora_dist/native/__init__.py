"""The CPU kernels: the blocks scheme's fused perturb/restore pass (``roundtrip.c``) and the row norms'
partial sums (``row_sumsq.c``), built with the system C compiler into one library, cached on disk,
loaded with ctypes.  No torch headers, no Python extension API: the library takes raw pointers, so it
compiles in about a second and any CPU build of torch can call it.

* Built once per (sources, flags, compiler, CPU) — the library's file name carries a hash of all four —
  into ``$FLATLORA_NATIVE_DIR`` (default ``$XDG_CACHE_HOME/flatlora_dist`` or ``~/.cache/flatlora_dist``).
  Concurrent first uses (test processes, ranks) serialise on a file lock; the library appears by an
  atomic rename, so a reader never sees half a file.  ``make install`` builds it ahead of use.
* ``FLATLORA_NATIVE=auto|on|off`` (default ``auto``): ``auto`` uses the kernels when they build and falls
  back to the torch code when no compiler is available (one warning); ``on`` makes a failed build an
  error; ``off`` always uses the torch code.
* Flags: ``-O3 -march=native -ffp-contract=off`` and no ``-ffast-math``: every float operation is one
  IEEE rounding, as in torch's own kernels, so the results are bit-identical to the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

ENV = "FLATLORA_NATIVE"
SOURCES = tuple(Path(__file__).with_name(f) for f in ("roundtrip.c", "row_sumsq.c"))
HEADERS = (Path(__file__).with_name("storage.h"),)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_FAILED: str | None = None


def requested() -> str:
    """The value of ``FLATLORA_NATIVE`` (default ``auto``), validated."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{ENV}={value!r} is not one of auto, on, off")
    return value


def cache_dir() -> Path:
    """Where built libraries are kept (``$FLATLORA_NATIVE_DIR``, else the user's cache folder)."""
    if os.environ.get("FLATLORA_NATIVE_DIR"):
        return Path(os.environ["FLATLORA_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flatlora_dist"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _cpu_id() -> str:
    """The CPU's model and feature flags (``-march=native`` code must not run on another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n".join(keep)


def library_path(cc: str) -> Path:
    """The cached library's path for compiler ``cc``: named by a hash of sources, flags, compiler, CPU."""
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.read_bytes() + b"\x1e")
    for part in (" ".join(FLAGS), cc, _cpu_id()):
        h.update(b"\x1f" + part.encode())
    return cache_dir() / f"kernels-{h.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library if its cached copy is missing; return its path.  Raises ``RuntimeError``."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (looked for {os.environ.get('CC', 'cc')!r}; set CC)")
    path = library_path(cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl  # POSIX only; elsewhere the ImportError is reported as "no native kernels"

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():  # built by another process while this one waited
            return path
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            res = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True)
            if res.returncode != 0:
                names = ", ".join(f.name for f in SOURCES)
                raise RuntimeError(f"{cc} failed to build {names}:\n{res.stderr[-2000:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # CDLL: every call releases the GIL
    i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.flatlora_perturb.argtypes = [i32, vp, vp, vp, i64, i64, i64, i32, i32, vp, vp, vp, vp, vp]
    lib.flatlora_perturb.restype = i32
    lib.flatlora_restore.argtypes = [i32, vp, vp, vp, i64, i64, i64, i32]
    lib.flatlora_restore.restype = i32
    i64s, fl = [i64] * 4, ctypes.c_float
    lib.flatlora_row_sumsq.argtypes = [i32, vp, *i64s, i32, vp, vp, i64, fl, vp]
    lib.flatlora_row_sumsq.restype = i32
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` when ``FLATLORA_NATIVE=off`` or (under ``auto``) it cannot be
    built.  Under ``on`` a failed build raises ``RuntimeError`` naming the cause."""
    global _LIB, _FAILED
    mode = requested()
    if mode == "off":
        return None
    with _LOCK:
        if _LIB is None and _FAILED is None:
            try:
                _LIB = _load(build())
            except (RuntimeError, OSError, ImportError) as e:
                _FAILED = f"{type(e).__name__}: {e}"
                if mode == "auto":
                    warnings.warn(f"flatlora_dist: CPU native kernels unavailable, using torch ops ({_FAILED})",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
    if _LIB is None and mode == "on":
        raise RuntimeError(f"{ENV}=on but the CPU native kernels cannot be built: {_FAILED}; "
                           f"install a C compiler (gcc) or set {ENV}=auto")  # fmt: skip
    return _LIB
