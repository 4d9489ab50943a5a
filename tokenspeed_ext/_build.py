"""JIT build of the compiled core: source list, flags, CUDA detection, cache, progress.

Two shared objects are built with torch.utils.cpp_extension + ninja:

* the op library (csrc/*.cpp, csrc/cpu/*.cpp and, with CUDA, csrc/cuda/*.cu + *.cpp), loaded
  with torch.ops.load_library so its TORCH_LIBRARY registrations become
  torch.ops.tokenspeed.*;
* the scheduler, a pybind11 module over csrc/scheduler (no torch headers, so it builds
  fast and also builds standalone under sanitizers).

Environment:
  TORCH_EXTENSIONS_DIR    root of the build cache (default ~/.cache/torch_extensions)
  TOKENSPEED_BUILD_CUDA   unset: build CUDA when torch sees a GPU and a toolkit is found,
                          falling back to CPU-only on failure; 1: CUDA is required (a
                          missing toolkit or a compile error is fatal; CI compiles the
                          kernels this way on machines without a GPU); 0: never build CUDA
  TORCH_CUDA_ARCH_LIST    overrides the default target (sm_90a)
  CUDA_HOME / CUDA_PATH   the toolkit, when it is not in a conventional place
  TOKENSPEED_VERBOSE_BUILD=1  show the compiler commands
"""
from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

_PKG = Path(__file__).resolve().parent


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its warning about a missing CUDA
    runtime on CPU-only machines (the toolkit is located here, see find_cuda_home)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def source_root() -> Path:
    """csrc/ shipped inside the installed package, else the source tree's."""
    for candidate in (_PKG / "csrc", _PKG.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise RuntimeError(f"tokenspeed_ext: C++ sources not found next to {_PKG}")


def _cache_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    tv = torch.__version__.replace("+", "_")
    return Path(base) / f"tokenspeed_{py}_torch{tv}"


def _valid_toolkit(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    root = Path(path)
    if not (root / "include" / "cuda_runtime.h").is_file():
        return False
    libs = [root / "lib64", root / "lib", *root.glob("targets/*/lib")]
    return any(list(d.glob("libcudart.so*")) for d in libs if d.is_dir())


def find_cuda_home() -> str | None:
    """A CUDA toolkit folder that really holds the headers and cudart, or None.

    The nvcc on PATH may be a wrapper script in /usr/local/bin; torch's own guess (the
    wrapper's parent folder) then fails at link time, so it is tried last.
    """
    candidates: list[str | None] = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                                    "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for c in candidates:
        if _valid_toolkit(c):
            return str(Path(c).resolve())
    cpp_extension = _cpp_extension()  # its import-time guess, the last resort
    return str(Path(cpp_extension.CUDA_HOME).resolve()) if _valid_toolkit(
        cpp_extension.CUDA_HOME) else None


def _cuda_mode() -> str:
    mode = os.environ.get("TOKENSPEED_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"TOKENSPEED_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    return {"": "auto", "0": "off", "1": "required"}[mode]


def _cuda_arch_flags() -> list[str]:
    """-gencode flags, plus -DTOKENSPEED_SM90A when sm_90a machine code is built (the
    host then launches the wgmma attention kernel on sm_90 devices)."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        # torch turns the list into -gencode flags itself
        archs = arch_list.replace(";", " ").replace(",", " ").split()
        return ["-DTOKENSPEED_SM90A"] if any(a.startswith("9.0a") for a in archs) else []
    return ["-gencode=arch=compute_90a,code=sm_90a", "-DTOKENSPEED_SM90A"]


CXX_FLAGS = ["-O3", "-fno-strict-aliasing"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]


def _digest(files: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f).encode())
        h.update(f.read_bytes())
    h.update(repr(flags).encode())
    return h.hexdigest()


def _jit(name: str, sources: list[Path], headers: list[Path], *, cflags: list[str],
         cuda_flags: list[str] | None = None, python_module: bool = False,
         cuda_home: str | None = None) -> ModuleType | None:
    """Build (or reuse) one shared object; say so on stderr only when it really builds."""
    cpp_extension = _cpp_extension()
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    digest = _digest(sources + headers, cflags + (cuda_flags or []) + [str(cuda_home)])
    stamp = build_dir / "tokenspeed.stamp"
    fresh = stamp.is_file() and stamp.read_text() == digest
    if not fresh:
        print(f"tokenspeed_ext: building {name} in {build_dir} (first use or changed "
              f"sources; this takes a minute or more)", file=sys.stderr, flush=True)
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    start = time.perf_counter()
    module = cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_include_paths=[str(source_root())],
        build_directory=str(build_dir),
        is_python_module=python_module,
        verbose=os.environ.get("TOKENSPEED_VERBOSE_BUILD") == "1",
    )
    if not fresh:
        stamp.write_text(digest)
        print(f"tokenspeed_ext: built {name} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    return module


@dataclass(frozen=True)
class BuildInfo:
    with_cuda: bool
    cuda_home: str | None
    build_dir: Path


def _op_sources(root: Path, with_cuda: bool) -> tuple[list[Path], list[Path]]:
    sources = [*sorted(root.glob("*.cpp")), *sorted((root / "cpu").glob("*.cpp"))]
    headers = [*sorted(root.glob("*.h")), *sorted((root / "cpu").glob("*.h"))]
    if with_cuda:
        # kernels (*.cu, nvcc) and the host side that checks, allocates and throws (*.cpp)
        sources += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
        headers += sorted((root / "cuda").glob("*.cuh")) + sorted((root / "cuda").glob("*.h"))
    return sources, headers


@functools.cache
def load_library() -> BuildInfo:
    """Build and load the op library once per process; returns what was built."""
    root = source_root()
    mode = _cuda_mode()
    cuda_home = None
    # Without a GPU the CUDA kernels could never run: by default they are not compiled
    # (minutes of nvcc on a CPU-only machine that has a toolkit).
    if mode == "required" or (mode == "auto" and torch.cuda.is_available()):
        cuda_home = find_cuda_home() if torch.version.cuda else None
        if cuda_home is not None:
            # before torch.utils.cpp_extension is imported, so its own guess agrees
            os.environ["CUDA_HOME"] = cuda_home
        else:
            why = ("torch has no CUDA" if not torch.version.cuda
                   else "no CUDA toolkit found (set CUDA_HOME)")
            if mode == "required":
                raise RuntimeError(f"TOKENSPEED_BUILD_CUDA=1 but {why}")
            warnings.warn(f"tokenspeed_ext: torch sees a GPU but {why}; building the CPU "
                          f"kernels only, so CUDA tensors cannot be scored")
    cflags = CXX_FLAGS + ["-fopenmp"]
    if cuda_home is not None:
        sources, headers = _op_sources(root, with_cuda=True)
        try:
            _jit("tokenspeed_ops_cuda", sources, headers, cflags=cflags + ["-DTOKENSPEED_WITH_CUDA"],
                 cuda_flags=NVCC_FLAGS + _cuda_arch_flags(), cuda_home=cuda_home)
            return BuildInfo(True, cuda_home, _cache_root() / "tokenspeed_ops_cuda")
        except Exception as err:  # noqa: BLE001 - any build failure falls back to CPU
            if mode == "required":
                raise
            warnings.warn(f"tokenspeed_ext: CUDA build failed, using CPU kernels only: {err}")
    sources, headers = _op_sources(root, with_cuda=False)
    _jit("tokenspeed_ops_cpu", sources, headers, cflags=cflags)
    return BuildInfo(False, None, _cache_root() / "tokenspeed_ops_cpu")


@functools.cache
def load_scheduler() -> ModuleType:
    """Build and import the scheduler's pybind11 module once per process."""
    root = source_root() / "scheduler"
    sources = sorted(p for p in root.glob("*.cpp") if not p.name.startswith("standalone_"))
    headers = sorted(root.glob("*.h"))
    module = _jit("tokenspeed_scheduler", sources, headers, cflags=CXX_FLAGS,
                  python_module=True)
    assert module is not None
    return module
