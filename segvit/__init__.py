"""segvit: SegViT (NeurIPS 2022, "Semantic Segmentation with Plain Vision Transformers") with fused kernels.

    import segvit
    model = segvit.build_model("segvit_vit-l16_ade20k_640", pretrained=True)   # or checkpoint="ade_54.6.pth"
    labels = segvit.inference(model, "room.jpg")        # (H, W) class indices: files, PIL images, uint8 arrays
    scores = model.predict(images)                      # (B, 150, H, W) from normalized float tensors
    loss = segvit.SegViTLoss.for_model(model)(model(images), labels)
"""
__version__ = "0.1.0"

from segvit import classes, hub, metrics, ops, visualize
from segvit.checkpoint import load_checkpoint
from segvit.inference import inference
from segvit.loss import SegViTLoss
from segvit.models import SegViT, build_model, list_models, published_config
from segvit.pretrained import load_pretrained_backbone


def apply_fused_kernels(model):
    """Switch to the fused ops (the ``auto`` backend: the fastest backend that takes each call's inputs) and
    return ``model``. ``segvit.ops.use_backend("eager")`` switches back. The selection is process-wide: the
    model layer only ever calls ``segvit.ops``."""
    ops.use_backend("auto")
    return model


__all__ = ["SegViT", "SegViTLoss", "apply_fused_kernels", "build_model", "classes", "hub", "inference", "list_models",
           "load_checkpoint", "load_pretrained_backbone", "metrics", "ops", "published_config", "visualize"]
