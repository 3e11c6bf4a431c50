"""The original configurations of the 7 published SegViT models (JSON)."""
