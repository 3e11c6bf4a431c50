"""The compiled extension ``segvit._C`` (built from csrc/ by setup.py), loaded at most once.

Importing ``segvit._C`` registers the ``torch.ops.segvit.*`` schemas and their CPU (and, when built, CUDA)
kernels; this module adds their fake (meta) kernels, so ``torch.compile`` and ``torch.library.opcheck`` work.

``segvit.ops`` calls ``load()`` when it is imported (about 10 ms; a missing or broken build only records why), so
the load, with its lock and its ``torch.library`` registrations, never happens inside a ``torch.compile`` or
``torch.export`` trace: Dynamo cannot enter a lock, and registering kernels while tracing would be wrong anyway.
Afterwards ``load()``, ``status()`` and ``has_cuda_kernels()`` only read module globals, which Dynamo traces as
constants.
"""
from __future__ import annotations

import re
import threading
import warnings

import torch

_BUILD_HINT = "run `pip install --no-build-isolation -e .` in the repository"
_lock = threading.Lock()
_loaded = False
_module = None
_reason = ""
_has_cuda = False


def load():
    """The ``segvit._C`` module, or None when it is not built or fails to load (see ``status()``)."""
    global _loaded, _module, _reason, _has_cuda
    if _loaded:  # lock-free fast path: the only path a compiled or exported call takes
        return _module
    if torch.compiler.is_compiling():
        # Not reachable through segvit.ops (its import loads the extension); said plainly rather than as Dynamo's
        # "unsupported context manager".
        raise RuntimeError("segvit._extension.load() was first called inside a torch.compile/torch.export trace; "
                           "import segvit.ops (or call segvit._extension.load()) before compiling")
    with _lock:
        if _loaded:
            return _module
        try:
            from segvit import _C
        except ImportError as exc:
            _module, _reason = None, f"segvit._C not built: {exc}; {_BUILD_HINT}"
        except OSError as exc:  # e.g. an undefined symbol after torch was upgraded under the build
            _module, _reason = None, f"segvit._C failed to load ({exc}); rebuild: {_BUILD_HINT}"
        else:
            _register_fakes()
            info = _C.build_info()
            # Cached: build_info() is a pybind11 call, which Dynamo cannot trace (has_cuda_kernels() runs while
            # the dispatcher picks a backend, inside compiled code).
            _module, _reason, _has_cuda = _C, "available", bool(info.get("cuda", False))
            _check_torch_version(info.get("torch_version", ""))
        _loaded = True
    return _module


def status() -> tuple[bool, str]:
    """(available, reason): whether ``segvit._C`` loaded, and why not when it did not."""
    module = load()
    return module is not None, _reason


def build_info() -> dict:
    """What was compiled (compiler, CPU ISA path, CUDA or not, torch version), or why nothing is available."""
    module = load()
    if module is None:
        return {"available": False, "reason": _reason}
    info = module.build_info()
    return {"available": True, **info, "torch_version_running": torch.__version__,
            "torch_version_matches": info.get("torch_version") == _release(torch.__version__),
            "kernels": registered_kernels()}


def _release(version: str) -> str:
    """major.minor.patch of a torch version string ("2.14.1+cu130" -> "2.14.1"), as build_info() reports it."""
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group() if match else version


def _check_torch_version(built: str) -> None:
    # A build against one torch that runs under another: an isolated build (which got its own torch), or torch
    # upgraded under the extension. Often it fails to load (undefined symbols, handled above); when it loads, say so.
    if built and built != _release(torch.__version__):
        warnings.warn(f"segvit._C was built against torch {built} but torch {torch.__version__} is running: rebuild "
                      f"it against this torch ({_BUILD_HINT})", RuntimeWarning, stacklevel=3)


def registered_kernels() -> dict[str, list[str]]:
    """The ``segvit::`` ops that have a kernel for each device, read from the dispatcher (not a hand-kept list)."""
    list_ops = getattr(torch._C, "_dispatch_get_all_op_names", None)  # private API: absent means "not known"
    if list_ops is None:
        return {}
    names = [name for name in list_ops() if name.startswith("segvit::")]
    return {key.lower(): sorted(n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key))
            for key in ("CPU", "CUDA")}


def has_cuda_kernels() -> bool:
    """True when the extension loaded and was compiled with its CUDA sources."""
    return load() is not None and _has_cuda


def _register_fakes() -> None:
    # Called once, under _lock, right after the first successful import of segvit._C.
    @torch.library.register_fake("segvit::mask_classify")
    def _mask_classify_fake(class_logits, mask_logits, out_size):
        torch._check(class_logits.dim() == 3, lambda: f"class_logits must be 3-D (B, Q, K+1), got {class_logits.dim()}-D")
        torch._check(mask_logits.dim() == 4, lambda: f"mask_logits must be 4-D (B, Q, h, w), got {mask_logits.dim()}-D")
        torch._check(len(out_size) == 2, lambda: f"out_size must be two ints (Hout, Wout), got {out_size}")
        batch, classes = class_logits.shape[0], class_logits.shape[2] - 1
        return mask_logits.new_empty((batch, classes, out_size[0], out_size[1]))

    @torch.library.register_fake("segvit::atm_attention_fwd")
    def _atm_attention_fwd_fake(q, k, v, scale, dropout_p=0.0, seed=0):
        torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q and k must be 4-D (B, N, H, D)")
        batch, queries, heads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((batch, queries, k.shape[1])), q.new_empty(
            (batch, heads, queries), dtype=torch.float32)

    @torch.library.register_fake("segvit::atm_attention_bwd")
    def _atm_attention_bwd_fake(grad_out, grad_sim, q, k, v, out, lse, scale, dropout_p=0.0, seed=0):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("segvit::query_pool_attention_fwd")
    def _query_pool_attention_fwd_fake(x, grid, in_proj_weight, in_proj_bias, num_heads, stride):
        torch._check(x.dim() == 3, lambda: f"x must be 3-D (B, L, C), got {x.dim()}-D")
        batch, length, channels = x.shape
        pooled = ((grid[0] + stride - 1) // stride) * ((grid[1] + stride - 1) // stride)
        return (x.new_empty((batch, pooled, channels)), x.new_empty((batch, pooled, channels)),
                x.new_empty((batch, length, 2 * channels)), x.new_empty((batch, num_heads, pooled), dtype=torch.float32))

    @torch.library.register_fake("segvit::query_pool_attention_bwd")
    def _query_pool_attention_bwd_fake(grad_out, x, grid, in_proj_weight, q, kv, out, lse, num_heads, stride):
        return x.new_empty(x.shape), in_proj_weight.new_empty(in_proj_weight.shape), in_proj_weight.new_empty(
            (in_proj_weight.shape[0],))

    # Autograd formulas of the attention ops live next to their Python wrappers.
    import importlib

    for name in ("segvit.ops.atm_attention", "segvit.ops.query_pool_attention"):
        importlib.import_module(name).register_cpp_autograd()

    @torch.library.register_fake("segvit::mask_loss_stats")
    def _mask_loss_stats_fake(mask_logits, labels, ignore_index, alpha, gamma):
        torch._check(mask_logits.dim() == 4, lambda: f"mask_logits must be 4-D (B, K, h, w), got {mask_logits.dim()}-D")
        torch._check(labels.dim() == 3, lambda: f"labels must be 3-D (B, Hl, Wl), got {labels.dim()}-D")
        return mask_logits.new_empty((mask_logits.shape[0], mask_logits.shape[1], 4), dtype=torch.float64)

    @torch.library.register_fake("segvit::mask_loss_stats_backward")
    def _mask_loss_stats_backward_fake(grad_stats, mask_logits, labels, stats, ignore_index, alpha, gamma):
        return torch.empty_like(mask_logits, memory_format=torch.contiguous_format)

    def _mask_loss_stats_setup(ctx, inputs, output):
        mask_logits, labels, ctx.ignore_index, ctx.alpha, ctx.gamma = inputs
        ctx.save_for_backward(mask_logits, labels, output)

    def _mask_loss_stats_grad(ctx, grad_stats):
        mask_logits, labels, stats = ctx.saved_tensors
        grad = torch.ops.segvit.mask_loss_stats_backward(grad_stats, mask_logits, labels, stats, ctx.ignore_index,
                                                         ctx.alpha, ctx.gamma)
        return grad, None, None, None, None

    torch.library.register_autograd("segvit::mask_loss_stats", _mask_loss_stats_grad,
                                    setup_context=_mask_loss_stats_setup)
