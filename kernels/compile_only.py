"""Compile-only launch mode: run the real Triton launchers without a GPU and record what they would launch.

    with compile_only(80) as launches:                 # sm_80 (A100); 90 for H100 (sm_90a)
        segvit.kernels.atm_attention.atm_attention(q, k, v, scale=s, dropout_p=0.1)   # CPU tensors
    for launch in launches: launch.fn_name, launch.grid, launch.kernel.asm["cubin"], launch.constexprs

Inside the context, Triton's active driver is replaced by one whose target is ``GPUTarget("cuda", arch, 32)`` and
whose "launch" compiles and records instead of running. Everything else is Triton's own launch path: the binder
specializes the arguments as a launch would (16-byte-aligned pointers and integers divisible by 16 get
``tt.divisibility``, integers equal to 1 become constants), the autotuner prunes its configs with the call's
arguments and "benchmarks" every surviving config (each compiles and is recorded; the benchmark returns a constant,
so the first config wins), and the launcher's own torch code (a softmax, the K/V projection GEMM, buffer allocation)
runs on the CPU tensors it is given. Kernel outputs are left unwritten (``torch.empty``): a launcher that read one
back on the host would be reading garbage, which is also what it would be doing on a GPU before a synchronisation.

Recording a launch keeps the compiled kernel (PTX, cubin, metadata), the grid, the bound arguments' shapes and
scalar values, and whether the autotuner was benchmarking (``tuning``: a config it may pick) or launching its
choice.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

_LOCK = threading.Lock()


@dataclass
class Launch:
    fn_name: str            # the @triton.jit function's name
    arch: int
    kernel: object          # triton.compiler.CompiledKernel: .asm["ptx"], .asm["cubin"], .metadata
    grid: tuple             # (x, y, z) programs
    constexprs: dict        # the constexpr arguments (block sizes, flags) as compiled
    scalars: dict           # the non-constexpr scalar arguments (sizes, scales) as passed
    shapes: dict            # tensor argument -> (shape, dtype); an argument aliasing an earlier one is left out
    num_warps: int
    num_stages: int
    specialization: str     # which arguments were specialized at "launch" (divisible by 16, equal to 1)
    tuning: bool = False    # compiled while the autotuner tried its configs
    tags: dict = field(default_factory=dict)  # set by the caller (case name, op, pass) through ``tag``

    @property
    def programs(self) -> int:
        return int(self.grid[0]) * int(self.grid[1]) * int(self.grid[2])


class _CompileOnlyDriver:
    """The parts of triton's DriverBase that the JIT launch path and the autotuner use."""

    def __init__(self, arch: int):
        self.arch = arch

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    # The device id doubles as the cache key of Triton's per-device kernel caches: one per architecture.
    def get_current_device(self):
        return self.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()  # compiles and records the config; nothing runs
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench


def _specialization(kernel) -> str:
    """A short text of the launch-time attributes: which arguments are 16-divisible or constant 1."""
    src = getattr(kernel, "src", None)
    attrs = getattr(src, "attrs", None) or {}
    names = list(getattr(getattr(src, "fn", None), "arg_names", []) or [])
    div16 = []
    for path, values in attrs.items():
        if any(v[0] == "tt.divisibility" and v[1] == 16 for v in values):
            index = path[0] if isinstance(path, tuple) else path
            div16.append(names[index] if index < len(names) else str(index))
    return "div16: " + (",".join(div16) if div16 else "-")


class _State:
    active: "list[Launch] | None" = None
    tags: dict = {}
    tuning: bool = False


@contextlib.contextmanager
def tag(**tags):
    """Attach ``tags`` (e.g. case="vit-l 640 B8", op="atm_attention") to the launches recorded inside."""
    old = dict(_State.tags)
    _State.tags.update(tags)
    try:
        yield
    finally:
        _State.tags = old


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: Triton launches compile for ``sm_<arch>`` and are recorded in the yielded list, nothing runs."""
    from triton.runtime import autotuner as autotuner_module
    from triton.runtime import jit as jit_module

    if arch not in (80, 90):
        raise ValueError(f"arch must be 80 (A100) or 90 (H100), got {arch!r}")
    launches: list[Launch] = []
    with _LOCK:
        original_run = jit_module.JITFunction.run
        original_tune = autotuner_module.Autotuner.run
        original_bench = autotuner_module.Autotuner._bench

        def run(self, *args, grid, warmup, **kwargs):
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
            if warmup or _State.active is None:
                return kernel
            binder = self.device_caches[arch][4]
            bound, _, _ = binder(*args, **kwargs)
            g = grid(bound) if callable(grid) else grid
            g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
            constexprs = {p.name: bound[p.name] for p in self.params if p.is_constexpr and p.name in bound}
            scalars = {k: v for k, v in bound.items() if k not in constexprs and isinstance(v, (int, float, bool))}
            # A tensor passed again under another name (a placeholder pointer the kernel never touches) is listed
            # once, so the bytes the cost model counts are those of distinct tensors.
            shapes, seen = {}, set()
            for k, v in bound.items():
                if isinstance(v, torch.Tensor) and (v.data_ptr(), v.shape, v.dtype) not in seen:
                    seen.add((v.data_ptr(), v.shape, v.dtype))
                    shapes[k] = (tuple(v.shape), str(v.dtype).replace("torch.", ""))
            meta = kernel.metadata
            _State.active.append(Launch(self.fn.__name__, arch, kernel, g, constexprs, scalars, shapes,
                                        int(meta.num_warps), int(meta.num_stages), _specialization(kernel),
                                        tuning=_State.tuning, tags=dict(_State.tags)))
            return kernel

        tuned = []

        def tune(self, *args, **kwargs):
            # Each architecture (and each call) benchmarks again, so every config it may pick is compiled.
            self.cache.clear()
            tuned.append(self)
            return original_tune(self, *args, **kwargs)

        def bench(self, *args, **kwargs):
            _State.tuning = True
            try:
                return original_bench(self, *args, **kwargs)
            finally:
                _State.tuning = False

        previous = _State.active
        previous_driver = jit_module.driver._active  # None until a real driver was needed
        jit_module.driver.set_active(_CompileOnlyDriver(arch))
        jit_module.JITFunction.run = run
        autotuner_module.Autotuner.run = tune
        autotuner_module.Autotuner._bench = bench
        _State.active = launches
        try:
            yield launches
        finally:
            _State.active = previous
            jit_module.JITFunction.run = original_run
            autotuner_module.Autotuner.run = original_tune
            autotuner_module.Autotuner._bench = original_bench
            jit_module.driver._active = previous_driver
            # The choices made here came from a constant fake benchmark: a real launch afterwards must tune again.
            for autotuner in tuned:
                autotuner.cache.clear()
