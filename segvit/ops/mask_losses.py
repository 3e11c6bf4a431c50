"""``mask_losses``: SegViT's sigmoid focal and dice losses on the masks of the classes present in each image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segvit.ops import _checks
from segvit.ops._dispatch import op

_OP = op("mask_losses")
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def mask_losses(mask_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = 255,
                alpha: float = 0.25, gamma: float = 2.0, check_labels: bool = True):
    """Focal and dice losses of the fixed query-class assignment (query i predicts class i).

    mask_logits (B, K, h, w), labels (B, Hl, Wl) integer with values in [0, K) or ``ignore_index``.
    For every (b, c) with class c present in labels[b]::

        p = bilinear(mask_logits[b, c], (Hl, Wl), align_corners=False);  t = (labels[b] == c)
        focal(b, c) = mean_pixels( alpha_t * BCEWithLogits(p, t) * (1 - p_t) ** gamma ),
                      p_t = sigmoid(p) t + (1 - sigmoid(p)) (1 - t),  alpha_t = alpha t + (1 - alpha) (1 - t)
        dice(b, c)  = 1 - (2 sum(sigmoid(p) t) + 1) / (sum(sigmoid(p)) + sum(t) + 1)

    Ignored pixels are negatives of every class, as in the original. Returns
    ``(loss_focal, loss_dice, num_masks)``: the sums over the present (b, c) pairs divided by
    ``num_masks = max(number of pairs, 1)`` (a 0-d int64 tensor); the losses are unweighted float32 scalars
    (float64 for float64 input). Differentiable with respect to ``mask_logits``. Fused backends never materialize
    the upsampled logits or one-hot targets.

    Dtypes: mask_logits float32, float16 or bfloat16 (float64 too) is read in its own dtype and every term is
    computed in float32 (float64 for float64). ``torch.autocast`` changes nothing: the op runs with autocast off
    and the losses stay float32 (the ``FLOAT32`` rule of segvit/ops/_autocast.py, as PyTorch's losses), whatever
    the logits' dtype.

    ``alpha`` is in [0, 1], or negative (the original's ``alpha = -1``) for no class weighting (alpha_t = 1);
    ``gamma`` is finite and >= 0; anything else (NaN, inf, alpha > 1, gamma < 0) is an error.

    ``check_labels=False`` skips the check of the label values (a min/max read back to the host, i.e. a device
    synchronisation per call): for a caller that has checked the same labels once already, as ``SegViTLoss`` does once
    per step for the main and every auxiliary output. Values outside [0, K) and ``ignore_index`` then give undefined
    results on the triton backend (the compiled kernels still refuse them).

    Host synchronisations: the triton backend's forward and backward have none (``num_masks`` is computed on the
    device and every grid depends on the shapes only), so with ``check_labels=False`` the op is synchronisation-free
    there; the label check is the one that remains.
    """
    _checks.tensor("mask_logits", mask_logits, 4, "(B, K, h, w)")
    _checks.tensor("labels", labels, 3, "(B, Hl, Wl)", dtypes=_LABEL_DTYPES)
    if labels.device != mask_logits.device:
        raise ValueError(f"labels: expected device {mask_logits.device} (as mask_logits), got {labels.device}")
    _checks.same("mask_logits", mask_logits.shape[0], "labels", labels.shape[0], "batch size")
    ignore_index = _checks.integer("ignore_index", ignore_index, minimum=None)
    alpha = _checks.focal_alpha("alpha", alpha)
    gamma = _checks.focal_gamma("gamma", gamma)
    if check_labels:
        _checks.label_values("labels", labels, mask_logits.shape[1], ignore_index)
    return _OP(mask_logits, labels, ignore_index=ignore_index, alpha=alpha, gamma=gamma)


def present_pairs(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, class id) of every class present in each image, ignore_index excluded, classes ascending."""
    images, classes = [], []
    for b, label in enumerate(labels):
        present = label.unique()
        present = present[present != ignore_index].long()
        images.append(torch.full_like(present, b))
        classes.append(present)
    return torch.cat(images), torch.cat(classes)


def sigmoid_focal(logits, targets, alpha: float, gamma: float):
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(-1)


def dice(logits, targets):
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def eager(mask_logits, labels, *, ignore_index=255, alpha=0.25, gamma=2.0):
    """The original's computation: selected masks upsampled to the label size against one-hot targets."""
    images, classes = present_pairs(labels, ignore_index)
    num_masks = torch.tensor(max(len(classes), 1), dtype=torch.int64, device=mask_logits.device)
    acc_dtype = torch.float64 if mask_logits.dtype == torch.float64 else torch.float32
    if len(classes) == 0:
        zero = mask_logits.sum().to(acc_dtype) * 0  # keeps the graph so backward gives zeros
        return zero, zero.clone(), num_masks
    selected = mask_logits[images, classes].to(acc_dtype)
    logits = F.interpolate(selected[:, None], size=labels.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0].flatten(1)
    targets = (labels[images] == classes[:, None, None]).flatten(1).to(acc_dtype)
    loss_focal = sigmoid_focal(logits, targets, alpha, gamma).sum() / num_masks
    loss_dice = dice(logits, targets).sum() / num_masks
    return loss_focal, loss_dice, num_masks


def reference(mask_logits, labels, **kwargs):
    """Float64 reference for tests."""
    return eager(mask_logits.double(), labels, **kwargs)


_OP.register("eager", eager)


def losses_from_stats(stats: torch.Tensor, n_pixels: int):
    """The losses from the per-(image, class) sums [focal, sigmoid * t, sigmoid, t] (B, K, 4) of the compiled kernels
    (rows of absent classes are zero). A few (B, K)-sized ops, differentiable, so autograd carries the dice chain
    rule back to the kernel's stats."""
    present = stats[..., 3] > 0
    num_masks = present.sum().clamp(min=1)
    loss_focal = stats[..., 0].sum() / n_pixels / num_masks
    dice_terms = 1 - (2 * stats[..., 1] + 1) / (stats[..., 2] + stats[..., 3] + 1)
    loss_dice = torch.where(present, dice_terms, 0.0).sum() / num_masks
    return loss_focal.float(), loss_dice.float(), num_masks


def _compiled(mask_logits, labels, *, ignore_index=255, alpha=0.25, gamma=2.0):
    # The same op serves the cpp (CPU) and cuda (CUDA) backends: the dispatcher picks the kernel by device.
    stats = torch.ops.segvit.mask_loss_stats(mask_logits, labels.long(), int(ignore_index), float(alpha), float(gamma))
    return losses_from_stats(stats, labels.shape[-2] * labels.shape[-1])


def _cpp_reasons(mask_logits, labels, **kwargs):
    return _checks.compiled_backend_reasons("cpp", mask_logits, "mask_logits")


def _cuda_reasons(mask_logits, labels, **kwargs):
    return _checks.compiled_backend_reasons("cuda", mask_logits, "mask_logits")


_OP.register("cpp", _compiled, _cpp_reasons)
# auto takes the CUDA kernel only where Triton is not installed: the static cost model has no estimate of it (its
# SASS exists only in the CUDA wheel), while the Triton path's is in kernels/README.md.
_OP.register("cuda", _compiled, _cuda_reasons, auto="without-triton",
             auto_note="used by auto only without Triton: not estimated by the static cost model (the Triton "
                       "kernels are, kernels/README.md); explicit use_backend('cuda') always")


def _triton(mask_logits, labels, **kwargs):
    from segvit.kernels import mask_losses as kernels

    return kernels.mask_losses(mask_logits, labels, **kwargs)


def _triton_reasons(mask_logits, labels, **kwargs):
    try:
        from segvit.kernels import mask_losses as kernels
    except ImportError as exc:
        return [f"triton not importable: {exc}"]
    return kernels.reasons(mask_logits, labels, **kwargs)


_OP.register("triton", _triton, _triton_reasons)
