"""Loading ImageNet-pretrained ViT weights into a SegViT backbone from a local file (nothing is downloaded).

Accepted formats (a bare state dict or one wrapped in ``state_dict`` / ``model``; a ``backbone.`` or ``module.``
prefix is stripped):
* timm: ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` (the packed q, k, v projection, rows q then k then v, each
  head-major: the layout of ``nn.MultiheadAttention.in_proj_*``), ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc1/2``,
  ``patch_embed.proj``, ``pos_embed`` (with or without the CLS entry), ``cls_token``, ``norm``; the classifier
  (``head``, ``fc_norm``, ``pre_logits``) is dropped, as is ``norm`` unless the backbone has a final norm.
* mmseg (``tools/model_converters/vit2mmseg.py`` output, e.g. the Segmenter ViT-L): ``layers.{i}.ln1``,
  ``layers.{i}.attn.attn.in_proj_*``, ``layers.{i}.ffn.layers.0.0`` ... (the names of ``segvit.checkpoint``).
The position embeddings of the checkpoint's (square) grid are resized to the model's grid with bicubic
interpolation (align_corners False); the CLS entry is kept as is (mmseg's ``resize_pos_embed``).
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

_TIMM_RULES = [  # (timm pattern, segvit backbone name)
    (r"blocks\.(\d+)\.attn\.qkv\.weight$", r"blocks.\1.attn.in_proj_weight"),
    (r"blocks\.(\d+)\.attn\.qkv\.bias$", r"blocks.\1.attn.in_proj_bias"),
    (r"blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.out_proj."),
]
_DROPPED = ("head.", "fc_norm.", "pre_logits.", "head_dist.", "dist_token")


def read_state_dict(path: str) -> "OrderedDict[str, torch.Tensor]":
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights {path!r} not found (segvit never downloads weights: "
                                f"download the file yourself and give its local path)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    out = OrderedDict()
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def is_timm_format(state_dict) -> bool:
    return any(k.startswith("blocks.") for k in state_dict)


def convert_to_segvit(state_dict, final_norm: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """timm or mmseg ViT names -> segvit ``VisionTransformer`` names (without the ``backbone.`` prefix)."""
    out = OrderedDict()
    if is_timm_format(state_dict):
        for key, value in state_dict.items():
            if key.startswith(_DROPPED) or (key.startswith("norm.") and not final_norm):
                continue
            for pattern, replacement in _TIMM_RULES:
                if re.match(pattern, key):
                    key = re.sub(pattern, replacement, key)
                    break
            out[key] = value
        return out
    from segvit.checkpoint import _BACKBONE_RULES, _rename

    for key, value in state_dict.items():
        if key.startswith(_DROPPED) or (key.startswith("ln1.") and not final_norm):
            continue
        out[_rename("backbone." + key, _BACKBONE_RULES, to_ours=True)[len("backbone."):]] = value
    return out


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], with_cls: bool = True) -> torch.Tensor:
    """(1, [1 +] g*g, C) position embeddings of a square g x g grid -> (1, 1 + h*w, C) for ``grid`` (h, w),
    bicubic, align_corners False. Without a CLS entry in the input, a zero one is prepended (the model drops the
    CLS token; its position embedding is unused)."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed: expected (1, L, C), got {tuple(pos_embed.shape)}")
    length = pos_embed.shape[1]
    if with_cls:
        cls, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    else:
        cls, tokens = pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"pos_embed: {length} entries are not a square grid"
                         f"{' plus a CLS entry' if with_cls else ''}")
    if (side, side) != tuple(grid):
        dtype = tokens.dtype
        tokens = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        tokens = F.interpolate(tokens, size=tuple(grid), mode="bicubic", align_corners=False)
        tokens = tokens.flatten(2).transpose(1, 2).to(dtype)
    return torch.cat([cls, tokens], dim=1)


def load_pretrained_backbone(model: nn.Module, path_or_state_dict, strict: bool = True) -> list[str]:
    """Load ViT weights (timm or mmseg format; a path or a state dict) into ``model.backbone`` (or ``model``
    itself if it is the backbone). Returns the ignored checkpoint keys. With ``strict``, a backbone parameter the
    checkpoint lacks, or a shape that differs, raises one error listing them all."""
    backbone = getattr(model, "backbone", model)
    raw = read_state_dict(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else \
        OrderedDict((k[len("backbone."):] if k.startswith("backbone.") else k, v) for k, v in path_or_state_dict.items())
    state = convert_to_segvit(raw, final_norm=getattr(backbone, "norm", None) is not None)
    expected = backbone.state_dict()
    if "pos_embed" in state:
        target = expected["pos_embed"].shape[1] - 1
        pos = state["pos_embed"]
        # A timm model without class-token position embedding has a square count; with it, square + 1.
        with_cls = math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]
        if pos.shape[1] != target + 1 or not with_cls:
            state["pos_embed"] = resize_pos_embed(pos, backbone.pos_grid, with_cls=with_cls)
    missing = [k for k in expected if k not in state]
    ignored = [k for k in state if k not in expected]
    mis_shaped = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mis_shaped or (strict and missing):
        problems = [f"{label} ({len(keys)}): {', '.join(keys)}" for label, keys in
                    (("missing", missing), ("shape mismatches", mis_shaped)) if keys]
        raise RuntimeError("load_pretrained_backbone: the weights do not fit the backbone:\n  " + "\n  ".join(problems))
    backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return ignored
