"""Build of segvit and its one compiled extension, ``segvit._C`` (sources under csrc/).

    pip install --no-build-isolation -e .     # development (editable)
    pip install --no-build-isolation .        # regular install
    python -m build --no-isolation            # sdist, then a wheel built from it (dist/)

The extension compiles against the installed torch, hence --no-build-isolation: an isolated build has no torch (it is
left out of [build-system].requires on purpose, so no build ever fetches a multi-GB torch that differs from the one
you run) and stops here with a line saying so. Metadata, dependencies and console scripts are in pyproject.toml.
Environment flags:
    SEGVIT_SKIP_CUDA=1      never build the CUDA sources (csrc/**/*.cu), even with a CUDA torch and nvcc
    SEGVIT_CUDA_ARCHS       compute capabilities for the CUDA sources, default "80;90": SASS for each, PTX for the newest
    SEGVIT_WERROR=1         every compiler warning is an error (C++ and CUDA, host and device; what CI builds with)
    SEGVIT_DEBUG_INFO=1     keep the host debug info (-g, from Python's build flags); the default is -g0
    MAX_JOBS                parallel compile jobs (ninja), default 2: the CUDA files are memory-hungry
    CUDA_HOME / CUDA_PATH   the CUDA toolkit; when unset it is found from nvcc (see build_tools/cuda_build.py)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_tools/ (shipped in the sdist, not installed)
from build_tools import cuda_build  # noqa: E402

try:
    import torch
except ImportError:
    # One line, not a traceback: what pip shows from an isolated build (`pip install .`).
    sys.exit("segvit's extension builds against the torch you run, and this build environment has no torch (pip's "
             "default build isolation hides an installed one): install torch, then "
             "`pip install --no-build-isolation .`")

WERROR = os.environ.get("SEGVIT_WERROR", "0") == "1"


def cuda_sources_wanted():
    return (os.environ.get("SEGVIT_SKIP_CUDA", "0") != "1" and torch.version.cuda is not None
            and bool(sources("*.cu")))


def sources(pattern):
    # Relative paths: setuptools refuses absolute source paths in sdists and editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def settle_cuda_home():
    """Find the CUDA toolkit and set CUDA_HOME before torch.utils.cpp_extension reads it (once, at import): torch's
    own guess, the parent of the first nvcc's bin/, fails to link where that nvcc is a wrapper or a symlink. Stops
    with one line saying what to set when a toolkit is in sight but unusable; with none in sight (a CUDA torch from
    pip, no nvcc) it says so and builds the CPU kernels only."""
    if not cuda_build.any_toolkit_in_sight():
        print("segvit: torch is a CUDA build but no CUDA toolkit is in sight (no CUDA_HOME, no nvcc on PATH, no "
              f"{cuda_build.DEFAULT_ROOT}): building without the CUDA C++ kernels (the Triton kernels cover the GPU); "
              "set CUDA_HOME to build them", file=sys.stderr)
        return None
    try:
        home = cuda_build.find_cuda_home()
    except cuda_build.CudaHomeError as exc:
        sys.exit(str(exc))
    os.environ["CUDA_HOME"] = home.root
    if "torch.utils.cpp_extension" in sys.modules:  # imported already (by a plugin, say): its copy too
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = home.root
    print(f"segvit: CUDA toolkit {home.root} (found by {home.found_by}), runtime in {home.cudart_dir}", file=sys.stderr)
    return home


CUDA = settle_cuda_home() if cuda_sources_wanted() else None

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available  # noqa: E402


def extension():
    if not is_ninja_available():
        raise RuntimeError("building segvit._C needs ninja: pip install ninja")
    cpp_sources = sources("*.cpp")
    cuda_sources = sources("*.cu")
    with_cuda = CUDA is not None
    # CPU flags: -O3 for the generic x86-64 target, never -march=native (the build must run on any x86_64). The
    # ISA-heavy work is left to PyTorch's runtime-dispatched kernels (BLAS GEMM, vectorized sigmoid) and the kernel's
    # own inner loops carry a runtime-selected AVX2 clone (target_clones, see csrc/cpu/mask_classify.cpp), so no
    # per-file ISA flags are needed.
    # -fno-trapping-math: without it GCC will not if-convert the clamps of the shared fast exp (common/fast_exp.h)
    # for AVX2 or SSE (only AVX-512's masked operations allow it), so every softmax / sigmoid loop stays scalar in
    # those clones (with it and the fast_exp rewrite the cpp attention ran ~2x faster on an AVX2 Zen 3). It changes
    # no result: no reassociation, NaN still propagates.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    # -g0: Python's own build flags (sysconfig CFLAGS, placed before these) carry -g, which more than doubled each
    # file's compile time (mask_classify.cpp against torch 2.14.1: 37 s -> 16 s of CPU here) and made the objects
    # ~30x larger. SEGVIT_DEBUG_INFO=1 keeps the debug info, for gdb.
    if os.environ.get("SEGVIT_DEBUG_INFO", "0") != "1":
        cxx_flags.append("-g0")
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop. libgomp.so.1 resolves
        # to the copy torch has already loaded (same soname), so there is one OpenMP runtime in the process.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if WERROR:
        cxx_flags += ["-Wall", "-Werror"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return CppExtension(
            "segvit._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    # No --use_fast_math (see cuda_build.nvcc_flags): nothing runs CUDA here to test its consequences.
    nvcc_flags = cuda_build.nvcc_flags(cuda_build.parse_archs(os.environ.get("SEGVIT_CUDA_ARCHS")), werror=WERROR)
    # torch links against <CUDA_HOME>/lib64 (or lib/); a toolkit with its runtime only under targets/*/lib/ needs it
    # named.
    torch_lib = os.path.join(CUDA.root, "lib64" if os.path.isdir(os.path.join(CUDA.root, "lib64")) else "lib")
    library_dirs = [] if os.path.realpath(CUDA.cudart_dir) == os.path.realpath(torch_lib) else [CUDA.cudart_dir]
    return CUDAExtension(
        "segvit._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=[("SEGVIT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


# BuildExtension reads MAX_JOBS for ninja's -j.
os.environ.setdefault("MAX_JOBS", "2")

# Packages: segvit and its subpackages, plus the top-level kernels/ folder installed as segvit.kernels (and never as a
# top-level `kernels`). In editable mode setuptools' finder maps "segvit" -> segvit/ and, because kernels/ is not
# inside segvit/, also "segvit.kernels" -> kernels/ (a separate root in its MAPPING), so `import segvit.kernels`
# resolves to kernels/__init__.py while `import kernels` does not resolve outside the repository.
packages = find_packages(include=["segvit", "segvit.*"])
packages += ["segvit.kernels"] + ["segvit.kernels." + p for p in find_packages(where="kernels")]

# Name, version, dependencies, extras and console scripts: pyproject.toml's [project]. What goes into the sdist:
# MANIFEST.in. Only the configs are package data (include_package_data would also install MANIFEST.in's other files
# that lie inside a package, e.g. kernels/README.md).
setup(
    packages=packages,
    package_dir={"segvit.kernels": "kernels"},
    package_data={"segvit.configs": ["*.json"]},
    include_package_data=False,
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
