"""CUDA side of segvit's build: where the toolkit is, and the nvcc flags. Used by setup.py and csrc/compile_check.py.

Plain Python with no torch import, so setup.py can settle CUDA_HOME before torch.utils.cpp_extension reads it (it
does so once, at import) and the tests can exercise the logic on fake directory layouts.

Why the discovery exists: torch guesses CUDA_HOME as the parent of the `bin/` holding the first `nvcc` on PATH. Where
that nvcc is a wrapper or a symlink (/usr/local/bin/nvcc -> a script that execs /usr/local/cuda-13.0/bin/nvcc; conda
and module systems do the same), the guess has no CUDA runtime and the link fails late with `cannot find -lcudart`.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

DEFAULT_ARCHS = "80;90"
DEFAULT_ROOT = "/usr/local/cuda"
_LIB_DIRS = ("lib64", "lib", os.path.join("lib", "x64"))  # lib/x64: Windows toolkits
_CUDART = ("libcudart.so", "cudart.lib")  # the unversioned names that -lcudart links against


class CudaHomeError(RuntimeError):
    """No usable CUDA toolkit; the message is one line that says what to set."""


@dataclass(frozen=True)
class CudaHome:
    root: str
    cudart_dir: str  # where libcudart is; pass it as a library dir when it is not <root>/lib64 or <root>/lib
    found_by: str  # how it was found, for the build log


def nvcc_name() -> str:
    return "nvcc.exe" if os.name == "nt" else "nvcc"


def cudart_dir(root: str) -> str | None:
    """The directory of root's CUDA runtime library (lib64/, lib/, then targets/*/lib/), or None."""
    subdirs = list(_LIB_DIRS) + sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "targets", "*", "lib")))
    for sub in subdirs:
        directory = os.path.join(root, sub)
        if any(os.path.isfile(os.path.join(directory, name)) for name in _CUDART):
            return directory
    return None


def missing_parts(root: str) -> list[str]:
    """What root lacks to build and link the CUDA sources with torch: torch runs <root>/bin/nvcc, and the extension
    needs the runtime's headers and library. Empty when root is a usable toolkit."""
    missing = []
    if not os.path.isfile(os.path.join(root, "bin", nvcc_name())):
        missing.append(f"bin/{nvcc_name()}")
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        missing.append("include/cuda_runtime.h")
    if cudart_dir(root) is None:
        missing.append("libcudart.so in lib64/, lib/ or targets/*/lib/")
    return missing


def nvcc_top(nvcc: str, run=subprocess.run) -> str | None:
    """The toolkit root that nvcc itself uses (`TOP=` in `nvcc --dryrun`), which a wrapper script or symlink hides."""
    try:
        proc = run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+?)\s*$", proc.stdout or "", re.M)
    return os.path.normpath(match.group(1).strip('"')) if match else None


def candidates(which=shutil.which, top=nvcc_top) -> list[tuple[str, str]]:
    """(root, how it was found) in the order tried, without an explicit CUDA_HOME / CUDA_PATH (see find_cuda_home)."""
    found = []
    nvcc = which("nvcc")
    if nvcc:
        dryrun_top = top(nvcc)
        if dryrun_top:
            found.append((dryrun_top, f"`{nvcc} --dryrun` TOP"))
        found.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"realpath of {nvcc}"))
        found.append((os.path.dirname(os.path.dirname(nvcc)), f"{nvcc} on PATH"))
    found.append((DEFAULT_ROOT, "default"))
    unique, seen = [], set()
    for root, how in found:
        key = os.path.normpath(root)
        if key not in seen:
            seen.add(key)
            unique.append((key, how))
    return unique


def any_toolkit_in_sight(environ=os.environ, which=shutil.which) -> bool:
    """Whether anything points at a CUDA toolkit: CUDA_HOME / CUDA_PATH set, an nvcc on PATH, or /usr/local/cuda.
    A CUDA torch without any of them (a plain `pip install torch`) builds the CPU kernels only: the Triton kernels
    cover the GPU and the CUDA C++ ones need a toolkit; a toolkit that is in sight but unusable stops the build."""
    return bool(environ.get("CUDA_HOME") or environ.get("CUDA_PATH") or which("nvcc")
                or os.path.exists(os.path.join(DEFAULT_ROOT, "bin", nvcc_name())))


def find_cuda_home(environ=os.environ, which=shutil.which, top=nvcc_top) -> CudaHome:
    """The CUDA toolkit to build with: CUDA_HOME or CUDA_PATH when set (and then it must be usable), else the first
    usable one of: nvcc's own root (`nvcc --dryrun`), the realpath of nvcc, the parent of nvcc's bin/ on PATH,
    /usr/local/cuda. Raises CudaHomeError with one line saying what to set."""
    skip = "or SEGVIT_SKIP_CUDA=1 to build without the CUDA kernels (the Triton kernels still cover the GPU)"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = environ.get(var)
        if root:
            missing = missing_parts(root)
            if missing:
                raise CudaHomeError(f"segvit: {var}={root} is not a usable CUDA toolkit (no {', no '.join(missing)}): "
                                    f"set {var} to the toolkit root, {skip}")
            return CudaHome(os.path.normpath(root), cudart_dir(root), var)
    tried = []
    for root, how in candidates(which, top):
        missing = missing_parts(root)
        if not missing:
            return CudaHome(root, cudart_dir(root), how)
        tried.append(f"{root} ({how}: no {', no '.join(missing)})")
    raise CudaHomeError("segvit: torch is a CUDA build but no usable CUDA toolkit was found (tried "
                        + "; ".join(tried) + f"): set CUDA_HOME=<toolkit root>, {skip}")


def parse_archs(text: str | None) -> list[str]:
    """Compute capabilities from SEGVIT_CUDA_ARCHS ("80;90", "8.0 9.0", "8.0,9.0"), default 80 and 90."""
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", text if text is not None else DEFAULT_ARCHS) if a]
    if not archs:
        raise ValueError("SEGVIT_CUDA_ARCHS lists no architecture")
    for arch in archs:
        if not re.fullmatch(r"\d{2,3}[af]?", arch):  # 90a, 100f: arch- and family-specific
            raise ValueError(f"SEGVIT_CUDA_ARCHS: {arch!r} is not a compute capability such as 80 or 9.0")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every architecture, plus PTX for the newest one, so a newer GPU than any listed can JIT the kernels."""
    newest = max(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))
    flags = []
    for arch in archs:
        code = f"[sm_{arch},compute_{arch}]" if arch == newest else f"sm_{arch}"
        flags.append(f"-gencode=arch=compute_{arch},code={code}")
    return flags


# Every nvcc, device-compiler and host-compiler warning an error: what the CI build (SEGVIT_WERROR=1) and
# csrc/compile_check.py use, so a kernel that would only warn on a CUDA machine fails the build here.
WERROR_NVCC_FLAGS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]


def nvcc_flags(archs: list[str], werror: bool = False) -> list[str]:
    """nvcc flags of the CUDA sources (torch adds its own common ones).

    No --use_fast_math: it is only worth its consequences where they are tested, and nothing runs CUDA here. It would
    flush denormals to zero and swap powf/expf/division for approximations, e.g. powf(0, 0) in the focal term gives
    NaN instead of 1 where gamma is 0; the kernels' hot exponentials use their own fast exp (csrc/common/fast_exp.h),
    the same code the tested CPU kernels run.
    """
    flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *gencode_flags(archs)]
    if werror:
        flags += WERROR_NVCC_FLAGS
    return flags
