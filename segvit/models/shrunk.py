"""The Shrunk head of SegViT (``TPNATMHead`` of the original): query up-sampling (QU), then a single-stage ATM.

The backbone's query down-sampling (QD) leaves the deep features at 1/32. QU recovers a 1/16 feature map: one
learnable query per 1/16 position of the crop goes through two standard transformer decoders, the first
attending to the shallow 1/16 feature, the second to the deep 1/32 one. The ATM decoder then reads that map; its
layers' masks are each a prediction of their own (not summed).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from segvit.models.atm_head import (DecoderLayer, DecoderStage, check_head_config, head_outputs, init_head_weights,
                                    similarity_to_masks)
from segvit.models.vit import Tokens


class SingleStageATM(nn.Module):
    """``ATMSingleHead`` with one stage and no input projection: every layer's class logits and mask logits
    are outputs (the last the prediction, the others aux outputs)."""

    def __init__(self, dim: int, num_classes: int, num_layers: int, num_heads: int):
        super().__init__()
        self.stage = DecoderStage(dim, dim, num_heads, num_layers, use_proj=False)
        self.class_queries = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def forward(self, feature: torch.Tensor, grid: tuple[int, int]) -> dict:
        # repeat, not expand: see ATMHead.forward (FlopCounterMode under no_grad)
        queries = self.class_queries.weight.repeat(feature.shape[0], 1, 1)
        per_layer = self.stage(queries, feature)
        return head_outputs([self.class_embed(q) for q, _ in per_layer],
                            [similarity_to_masks(s, grid) for _, s in per_layer])


class ShrunkHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, img_size: int, embed_dims: int = 768,
                 num_layers: int = 3, num_heads: int = 8, use_stages: int = 2, use_proj: bool = True,
                 shrink_ratio: int = 16):
        super().__init__()
        c = check_head_config(in_channels, num_classes, img_size, embed_dims, num_layers, num_heads, use_stages,
                              use_proj)
        c.integer("shrink_ratio", shrink_ratio)
        if img_size < shrink_ratio:
            raise ValueError(f"model.decode_head.shrink_ratio: expected at most img_size={img_size} (the query grid "
                             f"is img_size // shrink_ratio per side), got {shrink_ratio}")
        self.num_classes = num_classes
        self.img_size = img_size
        self.use_stages = use_stages
        # The query grid is fixed by the crop size, whatever the input size.
        self.query_grid = (img_size // shrink_ratio, img_size // shrink_ratio)
        self.qu_stages = nn.ModuleList(
            DecoderStage(in_channels, embed_dims, num_heads, num_layers, use_proj, layer=DecoderLayer)
            for _ in range(use_stages))
        self.grid_queries = nn.Embedding(self.query_grid[0] * self.query_grid[1], embed_dims)
        self.atm = SingleStageATM(embed_dims, num_classes, num_layers, num_heads)
        init_head_weights(self)

    def forward(self, features: list[Tokens]) -> dict:
        features = features[:self.use_stages]  # shallow first, unlike the cascade head
        # repeat, not expand: see ATMHead.forward (FlopCounterMode under no_grad)
        queries = self.grid_queries.weight.repeat(features[0][0].shape[0], 1, 1)
        for stage, (tokens, _) in zip(self.qu_stages, features):
            queries = stage(queries, tokens)[-1][0]
        return self.atm(queries, self.query_grid)

