"""Helpers shared by the Triton kernels: availability, interpreter detection, launch-config choice, test poisoning."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the eager and cpp backends work without triton
    triton, tl = None, None
    IMPORT_ERROR = f"triton not importable: {exc}"
else:
    IMPORT_ERROR = ""

# triton.jit reads TRITON_INTERPRET when a kernel is defined, so this is fixed when the kernels are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Test hook: when True, launchers fill the buffers the kernels write with NaN, so an element a kernel forgets to
# write fails the comparison instead of passing as stale memory.
POISON = False


def on_inputs_device(fn):
    """Decorator of the custom-op implementations (the launchers): run ``fn`` under a device guard of its first
    tensor argument's device, so the kernels launch on that device and its current stream (tensors on ``cuda:1``
    while ``cuda:0`` is current), and with autocast off for that device type, so the ATen calls between kernels
    (projections, sums) keep the dtypes the op's fake kernel states. The public ops have applied the
    autocast policy to the inputs before (segvit/ops/_autocast.py)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with contextlib.ExitStack() as stack:
            if device.type == "cuda":
                stack.enter_context(torch.cuda.device(device))
            if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
                stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


def empty(*shape, dtype, device) -> torch.Tensor:
    if POISON:  # NaN, or the most negative integer for integer buffers
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def device_reasons(*tensors: torch.Tensor) -> list[str]:
    """Why the triton backend cannot run on these tensors' device and dtype (empty list: it can)."""
    if IMPORT_ERROR:
        return [IMPORT_ERROR]
    reasons = []
    t = tensors[0]
    if t.device.type != "cuda" and not INTERPRET:
        reasons.append(f"tensors on {t.device.type}, not CUDA (set TRITON_INTERPRET=1 before import to interpret "
                       "the kernels on the CPU)")
    if t.device.type not in ("cuda", "cpu"):
        reasons.append(f"device type {t.device.type} is not supported")
    if t.dtype not in DTYPES:
        reasons.append(f"dtype {t.dtype} not supported (float32, float16, bfloat16)")
    return reasons


def interpreter_bf16_reasons(t: torch.Tensor, wrong: str) -> list[str]:
    """Refusal of bfloat16 off CUDA for a kernel whose ``wrong`` (e.g. "reductions") the triton 3.8 interpreter
    computes wrongly in bfloat16 (upstream issues 11584, 11604)."""
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        return [f"bfloat16 under the Triton interpreter gives wrong {wrong} (triton 3.8)"]
    return []


def index_reasons(**sizes: int) -> list[str]:
    """The kernels index within a tensor with int32 offsets (Triton's type for int arguments below 2**31)."""
    return [f"{name} has {n} elements, more than the kernels' int32 indexing allows (2**31 - 1)"
            for name, n in sizes.items() if n >= 2 ** 31]


def next_pow2(n: int, minimum: int = 16) -> int:
    # tl.dot needs every dimension >= 16; tl.arange needs a power of 2.
    return max(minimum, 1 << (int(n) - 1).bit_length())


def autotune(configs: list[dict], single: dict, key: list[str], prune=None):
    """``triton.autotune`` over ``configs`` on a GPU; under the interpreter (no GPU timer) the plain kernel, which
    the launcher calls with ``single``. Each config dict holds constexprs plus ``num_warps`` / ``num_stages``."""
    def wrap(fn):
        if INTERPRET:
            fn.single_config = single
            return fn
        tuned = triton.autotune(
            configs=[triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                   num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs],
            key=key, prune_configs_by={"early_config_prune": prune} if prune else None)(fn)
        tuned.single_config = {}
        return tuned
    return wrap

