"""Build of segvit and its one compiled extension, ``segvit._C`` (sources under csrc/).

    pip install --no-build-isolation -e .     # development (editable)
    pip install --no-build-isolation .        # regular install

The extension compiles against the installed torch, hence --no-build-isolation. Environment flags:
    SEGVIT_SKIP_CUDA=1      never build the CUDA sources (csrc/**/*.cu), even with a CUDA torch and nvcc
    SEGVIT_CUDA_ARCHS       ";"-separated compute capabilities for the CUDA sources, default "80;90"
    MAX_JOBS                parallel compile jobs (ninja), default 2: the CUDA files are memory-hungry
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, is_ninja_available

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "segvit", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
    if match is None:
        raise RuntimeError("segvit/__init__.py does not define __version__")
    return match.group(1)


def sources(pattern):
    # Relative paths: setuptools refuses absolute source paths in sdists and editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def cuda_arch_flags():
    flags = []
    for arch in filter(None, (a.strip() for a in os.environ.get("SEGVIT_CUDA_ARCHS", "80;90").split(";"))):
        arch = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def extension():
    if not is_ninja_available():
        raise RuntimeError("building segvit._C needs ninja: pip install ninja")
    cpp_sources = sources("*.cpp")
    cuda_sources = sources("*.cu")
    with_cuda = (
        os.environ.get("SEGVIT_SKIP_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
    )
    # CPU flags: -O3 for the generic x86-64 target, never -march=native (the build must run on any x86_64). The
    # ISA-heavy work is left to PyTorch's runtime-dispatched kernels (BLAS GEMM, vectorized sigmoid) and the kernel's
    # own inner loops carry a runtime-selected AVX2 clone (target_clones, see csrc/cpu/mask_classify.cpp), so no
    # per-file ISA flags are needed.
    # -fno-trapping-math: without it GCC will not if-convert the clamps of the shared fast exp (common/fast_exp.h)
    # for AVX2 or SSE (only AVX-512's masked operations allow it), so every softmax / sigmoid loop stays scalar in
    # those clones (with it and the fast_exp rewrite the cpp attention ran ~2x faster on an AVX2 Zen 3). It changes
    # no result: no reassociation, NaN still propagates.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop. libgomp.so.1 resolves
        # to the copy torch has already loaded (same soname), so there is one OpenMP runtime in the process.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return CppExtension(
            "segvit._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *cuda_arch_flags()]
    return CUDAExtension(
        "segvit._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
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

setup(
    name="segvit",
    version=read_version(),
    description="SegViT semantic segmentation with fused Triton, C++ and CUDA kernels",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"segvit.kernels": "kernels"},
    package_data={"segvit.configs": ["*.json"]},
    install_requires=["torch>=2.4", "numpy", 'triton; platform_system=="Linux"', "tqdm", "pillow"],
    extras_require={"test": ["pytest"], "bench": ["matplotlib"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
