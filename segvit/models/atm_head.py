"""The Attention-to-Mask (ATM) decoder of SegViT (``ATMHead`` of the original).

One learnable query per class goes through post-norm transformer decoder layers. Their cross-attention to the
backbone tokens returns, besides its output, the similarity map: the head-mean of the pre-softmax scaled
logits, which is the class's mask logit at each token. Stages run deepest backbone feature first, the queries
cascading from stage to stage, and the masks of the stages are summed as logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segvit import ops
from segvit.models.layers import ConfigCheck, GradCheckpointing, trunc_normal_
from segvit.models.vit import Tokens


class ATMAttention(nn.Module):
    """Cross-attention with separate q, k, v projections that also returns the similarity map (B, Nq, Nk)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(t):
            return t.unflatten(-1, (self.num_heads, -1))  # (B, N, H, D)

        out, similarity = ops.atm_attention(heads(self.q(queries)), heads(self.k(memory)), heads(self.v(memory)),
                                            dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.flatten(2)), similarity


class DecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer`` with PyTorch's defaults (post-norm, ReLU, FFN 4x, dropout 0.1 on the
    attention weights and every residual branch), batch-first."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = self.make_cross_attention(dim, num_heads, dropout)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def make_cross_attention(self, dim: int, num_heads: int, dropout: float) -> nn.Module:
        return nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def cross_attention(self, x: torch.Tensor, memory: torch.Tensor):
        return self.cross_attn(x, memory, memory, need_weights=False)[0], None

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, need_weights=False)[0]))
        attended, similarity = self.cross_attention(x, memory)
        x = self.norm2(x + self.dropout(attended))
        x = self.norm3(x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x))))))
        return x, similarity


class ATMDecoderLayer(DecoderLayer):
    """The original ``TPN_DecoderLayer``: the cross-attention is ``ATMAttention``; the layer also returns the
    similarity map, computed from the queries before this layer's FFN."""

    def make_cross_attention(self, dim: int, num_heads: int, dropout: float) -> nn.Module:
        return ATMAttention(dim, num_heads, attn_drop=dropout)

    def cross_attention(self, x: torch.Tensor, memory: torch.Tensor):
        return self.cross_attn(x, memory)


class DecoderStage(GradCheckpointing, nn.Module):
    """Projection of one backbone feature (Linear + LayerNorm, or identity) and the decoder layers that attend
    to it. Returns the queries and similarity map after every layer."""

    def __init__(self, in_channels: int, dim: int, num_heads: int, num_layers: int, use_proj: bool = True,
                 layer: type[DecoderLayer] = ATMDecoderLayer):
        super().__init__()
        self.input_proj = nn.Linear(in_channels, dim) if use_proj else nn.Identity()
        self.proj_norm = nn.LayerNorm(dim) if use_proj else nn.Identity()
        self.layers = nn.ModuleList(layer(dim, num_heads) for _ in range(num_layers))
        # nn.TransformerDecoder deep-copies one layer: every layer starts from the same weights
        for layer_ in self.layers[1:]:
            layer_.load_state_dict(self.layers[0].state_dict())

    def forward(self, queries: torch.Tensor, feature: torch.Tensor):
        memory = self.proj_norm(self.input_proj(feature))
        per_layer = []
        for i, layer in enumerate(self.layers):
            queries, similarity = self.run_block(i, layer, queries, memory)
            per_layer.append((queries, similarity))
        return per_layer


def check_head_config(in_channels, num_classes, img_size, embed_dims, num_layers, num_heads, use_stages,
                      use_proj) -> ConfigCheck:
    """Build-time checks shared by both heads; errors name the config key (``model.decode_head.<key>``)."""
    from segvit.ops.atm_attention import MAX_HEAD_DIM

    c = ConfigCheck("model.decode_head")
    c.integer("in_channels", in_channels)
    c.integer("num_classes", num_classes)
    c.integer("img_size", img_size)
    c.integer("embed_dims", embed_dims)
    c.integer("num_layers", num_layers)
    c.heads("num_heads", num_heads, "embed_dims", embed_dims, MAX_HEAD_DIM)
    c.integer("use_stages", use_stages)
    if not isinstance(use_proj, bool):
        raise TypeError(f"model.decode_head.use_proj: expected a bool, got {use_proj!r}")
    if not use_proj and in_channels != embed_dims:
        raise ValueError(f"model.decode_head.embed_dims: expected in_channels={in_channels} with use_proj=False (the "
                         f"features are attended without a projection), got {embed_dims}")
    return c


def init_head_weights(head: nn.Module) -> None:
    """The original heads' init: trunc-normal(0.02) Linear weights (the attention output projections included),
    zero biases, LayerNorm 1/0; ``in_proj_weight`` keeps xavier, embeddings keep N(0, 1)."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def similarity_to_masks(similarity: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, Q, L) similarity map -> (B, Q, h, w) mask logits on the real token grid (the original assumed a
    square grid and failed otherwise)."""
    return similarity.unflatten(-1, tuple(grid))


def head_outputs(class_logits: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
    """The last entry is the prediction, the others are the aux outputs, in order."""
    return {"pred_logits": class_logits[-1], "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(class_logits[:-1], masks[:-1])]}


class ATMHead(nn.Module):
    """The cascade ATM decoder: ``use_stages`` stages over the backbone features, deepest first, queries
    cascading, masks summed across stages (M1 = A1, M2 = A1 + A2, ...), one class embedding shared by all."""

    def __init__(self, in_channels: int, num_classes: int, img_size: int, embed_dims: int = 768,
                 num_layers: int = 3, num_heads: int = 8, use_stages: int = 3, use_proj: bool = True):
        super().__init__()
        check_head_config(in_channels, num_classes, img_size, embed_dims, num_layers, num_heads, use_stages, use_proj)
        self.num_classes = num_classes
        self.img_size = img_size
        self.use_stages = use_stages
        self.stages = nn.ModuleList(DecoderStage(in_channels, embed_dims, num_heads, num_layers, use_proj)
                                    for _ in range(use_stages))
        self.class_queries = nn.Embedding(num_classes, embed_dims)
        self.class_embed = nn.Linear(embed_dims, num_classes + 1)
        init_head_weights(self)

    def forward(self, features: list[Tokens]) -> dict:
        features = features[:self.use_stages][::-1]  # deepest first
        # repeat, not expand: under no_grad an expanded parameter is a view that claims requires_grad without a
        # grad_fn, which torch's ModuleTracker (FlopCounterMode) cannot hook; the copy is (B, K, C), negligible.
        queries = self.class_queries.weight.repeat(features[0][0].shape[0], 1, 1)
        class_logits, stage_masks = [], []
        for stage, (tokens, grid) in zip(self.stages, features):
            queries, similarity = stage(queries, tokens)[-1]
            class_logits.append(self.class_embed(queries))
            stage_masks.append(similarity_to_masks(similarity, grid))
        size = stage_masks[-1].shape[-2:]
        masks = []
        for stage_mask in stage_masks:
            if stage_mask.shape[-2:] != size:
                stage_mask = F.interpolate(stage_mask, size=size, mode="bilinear", align_corners=False)
            masks.append(stage_mask if not masks else masks[-1] + stage_mask)
        return head_outputs(class_logits, masks)
