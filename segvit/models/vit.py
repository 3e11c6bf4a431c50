"""Plain ViT backbone (mmseg 0.24's ``VisionTransformer``) with SegViT's optional query down-sampling (Shrunk).

Reads like the paper: patch embedding, position embeddings, pre-norm transformer blocks, and, for the Shrunk
structure, one block (``shrink_idx``) whose queries are the top-left token of every 2x2 cell while its keys and
values are all tokens, so every later block runs on a quarter of the tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from segvit import ops
from segvit.models.layers import ConfigCheck, DropPath, GradCheckpointing, trunc_normal_

Tokens = tuple[torch.Tensor, tuple[int, int]]  # (B, L, C) tokens with their (h, w) grid, row-major


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv; the image is zero-padded at the bottom/right to a multiple of
    the patch size first (mmcv's ``padding="corner"``)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dims: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> Tokens:
        p = self.patch_size
        height, width = images.shape[-2:]
        images = F.pad(images, (0, -width % p, 0, -height % p))
        x = self.proj(images)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (packed q, k, v projection)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)))

    def bias_or_zeros(self) -> torch.Tensor:
        if self.in_proj_bias is not None:
            return self.in_proj_bias
        return self.in_proj_weight.new_zeros(self.in_proj_weight.shape[0])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN1 x)), then x + DropPath(MLP(LN2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_query_pooled(self, x: torch.Tensor, grid: tuple[int, int], stride: int = 2) -> Tokens:
        """The Shrunk QD step: queries are the top-left token of each stride x stride cell, keys and values all
        tokens, and the residual is the un-normalised sampled token."""
        attn = ops.query_pool_attention(self.norm1(x), grid, self.attn.in_proj_weight, self.attn.bias_or_zeros(),
                                        self.attn.num_heads, stride=stride)
        if self.attn.attn_drop and self.training:
            raise NotImplementedError("attn_drop_rate > 0 is not supported in the query-pooling block")
        sampled = x.unflatten(1, grid)[:, ::stride, ::stride]
        pooled_grid = (sampled.shape[1], sampled.shape[2])
        x = sampled.flatten(1, 2) + self.drop_path(self.attn.proj_drop(self.attn.out_proj(attn)))
        return x + self.drop_path(self.mlp(self.norm2(x))), pooled_grid


class VisionTransformer(GradCheckpointing, nn.Module):
    """ViT with corner-padded patches, a CLS token used only for its position embedding, no final norm by
    default; returns the tokens of the blocks in ``out_indices`` with their grids.

    With ``shrink_idx`` set (the original's ``vit_shrink``), block ``shrink_idx`` down-samples the queries 2x2.
    """

    def __init__(self, img_size=(224, 224), patch_size=16, in_channels=3, embed_dims=768, num_layers=12,
                 num_heads=12, mlp_ratio=4.0, out_indices=(11,), qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_eps=1e-6, final_norm=False, interpolate_mode="bicubic",
                 shrink_idx: int | None = None):
        super().__init__()
        self._check_config(img_size, patch_size, in_channels, embed_dims, num_layers, num_heads, mlp_ratio,
                           out_indices, drop_rate, attn_drop_rate, drop_path_rate, norm_eps, interpolate_mode,
                           shrink_idx)
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.interpolate_mode = interpolate_mode
        self.out_indices = tuple(i % num_layers for i in out_indices)
        self.shrink_idx = shrink_idx
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dims)
        self.pos_grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1] + 1, embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, num_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dims, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i], norm_eps)
            for i in range(num_layers))
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps) if final_norm else None
        self.init_weights()

    @staticmethod
    def _check_config(img_size, patch_size, in_channels, embed_dims, num_layers, num_heads, mlp_ratio, out_indices,
                      drop_rate, attn_drop_rate, drop_path_rate, norm_eps, interpolate_mode, shrink_idx) -> None:
        """Errors name the config key (``model.backbone.<key>``) and its value."""
        c = ConfigCheck("model.backbone")
        size = c.pair("img_size", img_size)
        patch = c.integer("patch_size", patch_size)
        if min(size) < patch:
            raise ValueError(f"model.backbone.img_size: expected at least patch_size={patch} on each side, got "
                             f"{img_size!r}")
        c.integer("in_channels", in_channels)
        c.integer("embed_dims", embed_dims)
        c.integer("num_layers", num_layers)
        c.heads("num_heads", num_heads, "embed_dims", embed_dims)
        c.number("mlp_ratio", mlp_ratio, 0, float("inf"), low_open=True)
        if int(embed_dims * mlp_ratio) < 1:
            raise ValueError(f"model.backbone.mlp_ratio: embed_dims * mlp_ratio = {embed_dims} * {mlp_ratio} gives "
                             f"no hidden unit")
        for key, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                          ("drop_path_rate", drop_path_rate)):
            c.number(key, rate, 0, 1, high_open=True)
        c.number("norm_cfg.eps", norm_eps, 0, float("inf"), low_open=True)
        indices = list(out_indices)
        if not indices:
            raise ValueError(f"model.backbone.out_indices: expected at least one block index, got {out_indices!r}")
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
                raise ValueError(f"model.backbone.out_indices: expected block indices in [-{num_layers}, "
                                 f"{num_layers}) (num_layers={num_layers}), got {out_indices!r}")
        if interpolate_mode not in ("bilinear", "bicubic"):
            raise ValueError(f"model.backbone.interpolate_mode: expected 'bilinear' or 'bicubic', got "
                             f"{interpolate_mode!r}")
        if shrink_idx is not None:
            if isinstance(shrink_idx, bool) or not isinstance(shrink_idx, int) or not 0 <= shrink_idx < num_layers:
                raise ValueError(f"model.backbone.shrink_idx: expected a block index in [0, {num_layers}) "
                                 f"(num_layers={num_layers}), got {shrink_idx!r}")

    def init_weights(self) -> None:
        """mmseg's ViT init (used when no pretrained weights are loaded)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    if "mlp" in name:
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of the patch tokens for a (h, w) grid: the stored grid resized when it differs
        (the CLS entry only ever matters to the CLS token, which is dropped)."""
        pos = self.pos_embed[:, 1:]
        if tuple(grid) == self.pos_grid:
            return pos
        pos = pos.reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode=self.interpolate_mode, align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> list[Tokens]:
        x, grid = self.patch_embed(images)
        # The original concatenates the CLS token, adds position embeddings and drops it again: only the patch
        # tokens' sum survives.
        x = self.pos_drop(x + self.position_embedding(grid))
        outs = []
        for i, block in enumerate(self.blocks):
            if i == self.shrink_idx:
                x, grid = self.run_block(i, block.forward_query_pooled, x, grid)
            else:
                x = self.run_block(i, block, x)
            if self.norm is not None and i == len(self.blocks) - 1:
                x = self.norm(x)
            if i in self.out_indices:
                outs.append((x, grid))
        return outs
