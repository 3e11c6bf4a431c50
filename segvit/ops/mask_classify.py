"""``mask_classify``: SegViT's inference formula, class probabilities times sigmoid masks at output resolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segvit.ops import _autocast, _checks
from segvit.ops._dispatch import op

_OP = op("mask_classify")


def mask_classify(class_logits: torch.Tensor, mask_logits: torch.Tensor, out_size) -> torch.Tensor:
    """Per-pixel class scores from class logits and low-resolution mask logits.

    class_logits (B, Q, K+1), mask_logits (B, Q, h, w), out_size (Hout, Wout) -> (B, K, Hout, Wout)::

        out[b, c] = sum_q softmax(class_logits[b, q])[c] * sigmoid(bilinear(mask_logits[b, q], out_size))

    for c < K: the softmax runs over all K+1 classes and the last ("no object") is then dropped. ``bilinear`` is
    ``F.interpolate(mode="bilinear", align_corners=False)``. Fused backends never materialize the
    (B, Q, Hout, Wout) upsampled masks; they are forward only (gradients come from the eager backend).

    Dtypes: both logits share one dtype and the scores have it. Inside ``torch.autocast`` of their device,
    float32 / float16 / bfloat16 inputs are first cast to the autocast dtype, the op runs with autocast off and the
    scores are in the autocast dtype (the ``LOWER`` rule of segvit/ops/_autocast.py, as ``einsum``: the
    (B, K, Hout, Wout) scores are the op's largest tensor). Softmax, interpolation and sigmoid are computed in
    float32 by the fused backends and the contraction accumulates in float32.
    """
    class_logits, mask_logits = _validate(class_logits, mask_logits, out_size)
    return _OP(class_logits, mask_logits, _checks.size_pair("out_size", out_size))


def _validate(class_logits, mask_logits, out_size):
    """The inputs after the autocast policy, validated."""
    _checks.tensor("class_logits", class_logits, 3, "(B, Q, K+1)")
    _checks.tensor("mask_logits", mask_logits, 4, "(B, Q, h, w)")
    _checks.same_device("class_logits", class_logits, mask_logits=mask_logits)
    class_logits, mask_logits = _autocast.cast_inputs(class_logits.device, class_logits, mask_logits)
    _checks.same_dtype("class_logits", class_logits, mask_logits=mask_logits)
    _checks.same("class_logits", class_logits.shape[0], "mask_logits", mask_logits.shape[0], "batch size")
    _checks.same("class_logits", class_logits.shape[1], "mask_logits", mask_logits.shape[1], "query count Q")
    if class_logits.shape[2] < 2:
        raise ValueError(f"class_logits: expected K+1 >= 2 class columns, got {class_logits.shape[2]}")
    _checks.size_pair("out_size", out_size)
    return class_logits, mask_logits


def eager(class_logits, mask_logits, out_size):
    """The original's computation: upsample, sigmoid, einsum (materializes (B, Q, Hout, Wout))."""
    probs = F.softmax(class_logits, dim=-1)[..., :-1]
    masks = F.interpolate(mask_logits, size=tuple(out_size), mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", probs, masks)


def reference(class_logits, mask_logits, out_size):
    """Float64 reference for tests."""
    return eager(class_logits.double(), mask_logits.double(), out_size)


def _cpp(class_logits, mask_logits, out_size):
    return torch.ops.segvit.mask_classify(class_logits, mask_logits, list(out_size))


def _compiled_reasons(backend, class_logits, mask_logits):
    reasons = _checks.compiled_backend_reasons(backend, class_logits)
    if reasons:
        return reasons
    if torch.is_grad_enabled() and (class_logits.requires_grad or mask_logits.requires_grad):
        reasons.append("forward only: inputs require grad")
    return reasons


_OP.register("eager", eager)
_OP.register("cpp", _cpp, lambda cls, masks, size: _compiled_reasons("cpp", cls, masks))


def _triton(class_logits, mask_logits, out_size):
    from segvit.kernels import mask_classify as kernels

    return kernels.mask_classify(class_logits, mask_logits, out_size)


def _triton_reasons(class_logits, mask_logits, out_size):
    try:
        from segvit.kernels import mask_classify as kernels
    except ImportError as exc:
        return [f"triton not importable: {exc}"]
    return kernels.reasons(class_logits, mask_logits, out_size)


_OP.register("triton", _triton, _triton_reasons)



# The extension's op dispatches on the device: the same call runs the CUDA kernel on CUDA tensors. auto never picks
# it: the static cost model (benchmarks/estimate.py, kernels/README.md) puts its float32 FMA contraction from
# shared memory several times above the Triton kernel's tensor-core dot and above eager's cuBLAS einsum.
_OP.register("cuda", _cpp, lambda cls, masks, size: _compiled_reasons("cuda", cls, masks), auto="no",
             auto_note="explicit only: its float32 FMA contraction is several times slower than the Triton kernel "
                       "and than eager's cuBLAS einsum (kernels/README.md)")
