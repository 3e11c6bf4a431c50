"""The SegViT model layer: ViT backbone (optionally Shrunk), ATM heads, the segmentor and its configurations."""
from segvit.models.atm_head import ATMHead
from segvit.models.factory import build_model, list_models, published_config
from segvit.models.segmentor import SegViT
from segvit.models.shrunk import ShrunkHead
from segvit.models.vit import VisionTransformer

__all__ = ["ATMHead", "SegViT", "ShrunkHead", "VisionTransformer", "build_model", "list_models", "published_config"]
