"""The compiled extension ``segvit._C`` (built from csrc/ by setup.py), loaded lazily and at most once.

Importing ``segvit._C`` registers the ``torch.ops.segvit.*`` schemas and their CPU (and, when built, CUDA)
kernels; this module adds their fake (meta) kernels, so ``torch.compile`` and ``torch.library.opcheck`` work.
"""
from __future__ import annotations

import threading

import torch

_BUILD_HINT = "run `pip install --no-build-isolation -e .` in the repository"
_lock = threading.Lock()
_loaded = False
_module = None
_reason = ""


def load():
    """The ``segvit._C`` module, or None when it is not built or fails to load (see ``status()``)."""
    global _loaded, _module, _reason
    if _loaded:
        return _module
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
            _module, _reason = _C, "available"
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
    return {"available": True, **module.build_info()}


def has_cuda_kernels() -> bool:
    """True when the extension loaded and was compiled with its CUDA sources."""
    module = load()
    return module is not None and bool(module.build_info().get("cuda", False))


def _register_fakes() -> None:
    # Called once, under _lock, right after the first successful import of segvit._C.
    @torch.library.register_fake("segvit::mask_classify")
    def _mask_classify_fake(class_logits, mask_logits, out_size):
        torch._check(class_logits.dim() == 3, lambda: f"class_logits must be 3-D (B, Q, K+1), got {class_logits.dim()}-D")
        torch._check(mask_logits.dim() == 4, lambda: f"mask_logits must be 4-D (B, Q, h, w), got {mask_logits.dim()}-D")
        torch._check(len(out_size) == 2, lambda: f"out_size must be two ints (Hout, Wout), got {out_size}")
        batch, classes = class_logits.shape[0], class_logits.shape[2] - 1
        return mask_logits.new_empty((batch, classes, out_size[0], out_size[1]))

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
