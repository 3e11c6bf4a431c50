"""segvit: SegViT (NeurIPS 2022) with fused kernels."""
__version__ = "0.1.0"
