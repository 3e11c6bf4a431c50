"""SegViT's training loss (the original ``ATMLoss`` + ``SetCriterion``).

Query i is tied to class i: no matching. Per output (the prediction and each aux output, with the same
assignment) three terms: cross-entropy of the class logits (every query; target its own class where the class is
present in the image, else "no object", weighted 0.1), and the sigmoid focal and dice losses of the present
classes' masks (``segvit.ops.mask_losses``), weighted 1, 20 and 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from segvit import ops
from segvit.ops import _checks
from segvit.ops.mask_losses import present_pairs


class SegViTLoss(nn.Module):
    """``loss(out, labels)`` -> ``{"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}``, each term already
    multiplied by its weight (and ``loss_weight``); the training loss is their sum.

    ``out`` is the model's output dict (with ``max_aux_outputs`` set, only that many aux outputs count);
    labels (B, Hl, Wl) integer, ``ignore_index`` for ignored pixels (they are negatives of every mask, as in
    the original). Under ``torch.distributed`` the mask count is summed over processes and averaged, as in the
    original.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, eos_coef: float = 0.1,
                 cls_weight: float = 1.0, mask_weight: float = 20.0, dice_weight: float = 1.0,
                 loss_weight: float = 1.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 max_aux_outputs: int | None = None):
        super().__init__()
        # The original weights only dec_layers - 1 aux outputs and drops the terms of any further ones.
        self.max_aux_outputs = max_aux_outputs
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.weights = {"loss_ce": cls_weight * loss_weight, "loss_mask": mask_weight * loss_weight,
                        "loss_dice": dice_weight * loss_weight}
        # Checked here, not first in the forward: alpha in [0, 1] or negative (no class weighting), gamma >= 0.
        self.focal_alpha = _checks.focal_alpha("focal_alpha", focal_alpha)
        self.focal_gamma = _checks.focal_gamma("focal_gamma", focal_gamma)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @classmethod
    def for_model(cls, model: nn.Module) -> "SegViTLoss":
        """The loss a model's config asked for (class count, ignore index, weights)."""
        return cls(**model.loss_options)

    def class_targets(self, labels: torch.Tensor, num_queries: int) -> torch.Tensor:
        images, classes = present_pairs(labels, self.ignore_index)
        targets = torch.full((labels.shape[0], num_queries), self.num_classes, dtype=torch.long, device=labels.device)
        targets[images, classes] = classes
        return targets

    def count_masks(self, labels: torch.Tensor) -> torch.Tensor:
        """The number of (image, present class) masks of ``labels`` (B, H, W): what the mask losses are
        normalised by (a 0-dim tensor on the labels' device)."""
        return torch.tensor(present_pairs(labels, self.ignore_index)[0].numel(), device=labels.device)

    def forward(self, out: dict, labels: torch.Tensor, *, mean_masks: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``mean_masks``: the mean mask count per loss call over the data-parallel group the gradients are
        averaged over (processes x accumulation steps, ``segvit.train --accumulate``); by default the count of
        this call all-reduced over the processes (1 process: this call's own)."""
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.dim() != 3:
            raise ValueError(f"labels: expected (B, H, W), got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point:
            raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
        _checks.label_values("labels", labels, self.num_classes, self.ignore_index)
        outputs = [out] + list(out.get("aux_outputs", []))[:self.max_aux_outputs]
        num_queries = out["pred_logits"].shape[1]
        class_targets = self.class_targets(labels, num_queries)
        local = (class_targets != self.num_classes).sum()
        if mean_masks is None:
            scale = self._global_mask_scale(local)
        else:  # max(local, 1) / max(mean, 1), as _global_mask_scale with the mean given
            scale = local.float().clamp(min=1.0) / torch.as_tensor(mean_masks, dtype=torch.float32,
                                                                   device=local.device).clamp(min=1.0)
        losses = {}
        for index, output in enumerate(outputs):
            suffix = "" if index == 0 else f"_{index - 1}"
            # The original runs the loss in float32 (force_fp32) whatever the model's precision.
            class_logits = output["pred_logits"].float()
            loss_ce = F.cross_entropy(class_logits.transpose(1, 2), class_targets, self.empty_weight)
            # Labels checked once above, not once per output (each check is a host synchronisation).
            loss_focal, loss_dice, _ = ops.mask_losses(
                output["pred_masks"], labels, ignore_index=self.ignore_index, alpha=self.focal_alpha,
                gamma=self.focal_gamma, check_labels=False)
            losses["loss_ce" + suffix] = loss_ce * self.weights["loss_ce"]
            losses["loss_mask" + suffix] = loss_focal * scale * self.weights["loss_mask"]
            losses["loss_dice" + suffix] = loss_dice * scale * self.weights["loss_dice"]
        return losses

    @staticmethod
    def _global_mask_scale(num_pairs: torch.Tensor):
        """max(local count, 1) / max(mean count over processes, 1): turns the local normalisation of
        ``mask_losses`` into the original's all-reduced one. 1 without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1.0
        local = num_pairs.float()
        total = local.clone()
        dist.all_reduce(total)
        return local.clamp(min=1.0) / torch.clamp(total / dist.get_world_size(), min=1.0)
