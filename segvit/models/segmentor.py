"""The SegViT segmentor: backbone, decode head, and the original's whole-image and sliding-window inference."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from segvit import ops


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Every submodule in eval mode inside; on exit each gets back its own ``training`` flag (a model may mix them,
    e.g. a frozen, eval-mode backbone under a training head)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class SegViT(nn.Module):
    """``out = model(images)`` gives ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w) mask logits at
    feature resolution, and ``aux_outputs`` (same keys, the original's order), in training and eval mode alike
    (dropout only in training). ``model.predict(images)`` gives class scores at the input size."""

    def __init__(self, backbone: nn.Module, head: nn.Module, test_mode: str = "whole",
                 crop_size: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
                 ignore_index: int = 255):
        super().__init__()
        if test_mode not in ("whole", "slide"):
            raise ValueError(f"test_mode: expected 'whole' or 'slide', got {test_mode!r}")
        if test_mode == "slide" and (crop_size is None or stride is None):
            raise ValueError("test_mode 'slide' needs crop_size and stride")
        self.backbone = backbone
        self.head = head
        self.num_classes = head.num_classes
        self.test_mode = test_mode
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.stride = tuple(stride) if stride is not None else None
        self.ignore_index = ignore_index

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> "SegViT":
        """Activation checkpointing (timm's name): every ``every``-th block of the backbone (the Shrunk
        query-pooling block included) and of each decoder stage is recomputed in the backward instead of keeping
        its activations (``segvit.models.layers.GradCheckpointing``). Same gradients, dropout included; works on
        every backend, under autocast and with ``torch.compile``. Returns the model."""
        from segvit.models.layers import GradCheckpointing

        for module in self.modules():
            if isinstance(module, GradCheckpointing):
                module.set_grad_checkpointing(enable, every)
        return self

    def forward(self, images: torch.Tensor) -> dict:
        if images.dim() != 4:
            raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
        return self.head(self.backbone(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Class scores (B, K, H, W) at the input's size, before the final softmax: ``whole`` runs the image at
        once, ``slide`` averages overlapping crop-size windows (crop and stride from the config), as mmseg 0.24.
        Deterministic: runs in eval mode (no dropout, no drop path) whatever the module's mode, and leaves every
        submodule's mode as it found it."""
        mode = mode or self.test_mode
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode: expected None, 'whole' or 'slide', got {mode!r}")
        if mode == "slide" and (self.crop_size is None or self.stride is None):
            raise ValueError("predict(mode='slide'): this model has no crop_size/stride (give them to the config)")
        with _eval_mode(self):
            return self.encode_decode(images) if mode == "whole" else self.slide_inference(images)

    def encode_decode(self, images: torch.Tensor) -> torch.Tensor:
        """Scores at the crop size (the original head's eval output), then resized to the input."""
        out = self(images)
        crop = (self.head.img_size, self.head.img_size)
        scores = ops.mask_classify(out["pred_logits"], out["pred_masks"], crop)
        if scores.shape[-2:] != images.shape[-2:]:
            scores = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return scores

    def slide_inference(self, images: torch.Tensor) -> torch.Tensor:
        (crop_h, crop_w), (stride_h, stride_w) = self.crop_size, self.stride
        batch, _, height, width = images.shape
        rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
        cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
        scores = images.new_zeros((batch, self.num_classes, height, width))
        counts = images.new_zeros((batch, 1, height, width))
        for row in range(rows):
            for col in range(cols):
                # The last window of each axis is flush with the bottom/right edge.
                y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
                y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
                scores[:, :, y1:y2, x1:x2] += self.encode_decode(images[:, :, y1:y2, x1:x2])
                counts[:, :, y1:y2, x1:x2] += 1
        return scores / counts
