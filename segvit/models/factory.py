"""Building models from the original SegViT (mmseg-style) config dicts, and the 7 published configurations.

Each original constructor argument is either honoured (it changes the computed function), ignored (it does
not: download URLs, ``channels``, ...), or refused with a clear error when this
implementation does not support the value given. Unknown types and unknown fields are errors.
"""
from __future__ import annotations

import contextlib
import copy
import json
from importlib import resources
from typing import Any

from segvit.models.atm_head import ATMHead
from segvit.models.segmentor import SegViT
from segvit.models.shrunk import ShrunkHead
from segvit.models.vit import VisionTransformer

_CONFIG_PACKAGE = "segvit.configs"


def list_models() -> list[str]:
    """Names of the 7 published SegViT configurations."""
    files = resources.files(_CONFIG_PACKAGE).iterdir()
    return sorted(f.name[:-len(".json")] for f in files if f.name.endswith(".json"))


def published_config(name: str) -> dict:
    """The whole original config of a published model (model, optimizer, schedule, data) as a dict."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(list_models())}")
    return json.loads(resources.files(_CONFIG_PACKAGE).joinpath(f"{name}.json").read_text())


class _Fields:
    """Consumes a config dict field by field; what is left at the end is unknown and raises."""

    def __init__(self, cfg: dict, where: str):
        if not isinstance(cfg, dict):
            raise TypeError(f"{where}: expected a dict, got {type(cfg).__name__}")
        self.cfg = dict(cfg)
        self.where = where

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.pop(key, default)

    def require(self, key: str) -> Any:
        if key not in self.cfg:
            raise ValueError(f"{self.where}: missing required field {key!r}")
        return self.cfg.pop(key)

    def ignore(self, *keys: str) -> None:
        for key in keys:
            self.cfg.pop(key, None)

    def refuse_unless(self, key: str, supported: Any, default: Any) -> None:
        value = self.cfg.pop(key, default)
        if value != supported:
            raise NotImplementedError(f"{self.where}.{key}={value!r} is not supported (only {supported!r})")

    def done(self) -> None:
        if self.cfg:
            raise ValueError(f"{self.where}: unknown field(s) {sorted(self.cfg)}")


def _pair(value, key: str) -> tuple[int, int]:
    """An int or a pair of ints (mmseg's size fields); anything else is an error naming the config key."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"{key}: expected an int or a pair of ints, got {value!r}")


def _build_backbone(cfg: dict) -> VisionTransformer:
    f = _Fields(cfg, "model.backbone")
    kind = f.require("type")
    if kind not in ("VisionTransformer", "vit_shrink"):
        raise ValueError(f"model.backbone.type: expected 'VisionTransformer' or 'vit_shrink', got {kind!r}")
    norm_cfg = f.get("norm_cfg", {"type": "LN", "eps": 1e-6})
    if norm_cfg.get("type") != "LN":
        raise NotImplementedError(f"model.backbone.norm_cfg.type={norm_cfg.get('type')!r} is not supported (only 'LN')")
    act_cfg = f.get("act_cfg", {"type": "GELU"})
    if act_cfg.get("type") != "GELU":
        raise NotImplementedError(f"model.backbone.act_cfg.type={act_cfg.get('type')!r} is not supported (only 'GELU')")
    out_indices = f.get("out_indices", -1)
    kwargs = dict(
        img_size=_pair(f.get("img_size", 224), "model.backbone.img_size"), patch_size=f.get("patch_size", 16),
        in_channels=f.get("in_channels", 3), embed_dims=f.get("embed_dims", 768),
        num_layers=f.get("num_layers", 12), num_heads=f.get("num_heads", 12), mlp_ratio=f.get("mlp_ratio", 4),
        out_indices=[out_indices] if isinstance(out_indices, int) else list(out_indices),
        qkv_bias=f.get("qkv_bias", True), drop_rate=f.get("drop_rate", 0.0),
        attn_drop_rate=f.get("attn_drop_rate", 0.0), drop_path_rate=f.get("drop_path_rate", 0.0),
        norm_eps=norm_cfg.get("eps", 1e-5), final_norm=f.get("final_norm", False),
        interpolate_mode=f.get("interpolate_mode", "bicubic"),
        shrink_idx=f.get("shrink_idx", 8) if kind == "vit_shrink" else None)
    f.refuse_unless("with_cls_token", False, True)
    f.refuse_unless("output_cls_token", False, False)
    f.refuse_unless("patch_norm", False, False)
    f.refuse_unless("num_fcs", 2, 2)
    # with_cp (activation checkpointing) and norm_eval do not change the function; weights are never downloaded.
    f.ignore("pretrained", "init_cfg", "with_cp", "norm_eval")
    f.done()
    return VisionTransformer(**kwargs)


def _build_head(cfg: dict, backbone: VisionTransformer):
    f = _Fields(cfg, "model.decode_head")
    kind = f.require("type")
    if kind not in ("ATMHead", "TPNATMHead"):
        raise ValueError(f"model.decode_head.type: expected 'ATMHead' or 'TPNATMHead', got {kind!r}")
    in_channels = f.require("in_channels")
    if in_channels != backbone.embed_dims:
        raise ValueError(f"model.decode_head.in_channels: expected the backbone's embed_dims "
                         f"{backbone.embed_dims}, got {in_channels}")
    num_classes = f.require("num_classes")
    loss = f.get("loss_decode", {"type": "ATMLoss", "num_classes": num_classes})
    if isinstance(loss, (list, tuple)) or loss.get("type") != "ATMLoss":
        raise NotImplementedError(f"model.decode_head.loss_decode: only one ATMLoss is supported, got {loss!r}")
    if loss.get("num_classes", num_classes) != num_classes:
        raise ValueError(f"model.decode_head.loss_decode.num_classes: expected {num_classes}, got {loss['num_classes']}")
    if loss.get("use_point", False):
        raise NotImplementedError("model.decode_head.loss_decode.use_point=True is not supported")
    kwargs = dict(in_channels=in_channels, num_classes=num_classes, img_size=f.require("img_size"),
                  embed_dims=f.get("embed_dims", 768), num_layers=f.get("num_layers", 3),
                  num_heads=f.get("num_heads", 8), use_stages=f.get("use_stages", 3 if kind == "ATMHead" else 2),
                  use_proj=f.get("use_proj", True))
    if kind == "TPNATMHead":
        kwargs["shrink_ratio"] = f.get("shrink_ratio", 16)
    else:
        f.refuse_unless("shrink_ratio", None, None)
    if kwargs["use_stages"] > len(backbone.out_indices):
        raise ValueError(f"model.decode_head.use_stages={kwargs['use_stages']} exceeds the backbone's "
                         f"{len(backbone.out_indices)} outputs (out_indices)")
    f.refuse_unless("CE_loss", False, False)
    f.refuse_unless("crop_train", False, False)
    f.refuse_unless("align_corners", False, False)
    f.refuse_unless("input_transform", None, None)
    ignore_index = f.get("ignore_index", 255)
    # These configure mmseg's conv_seg classifier, which the ATM heads delete, or nothing at all.
    f.ignore("channels", "in_index", "dropout_ratio", "conv_cfg", "norm_cfg", "act_cfg", "sampler", "init_cfg")
    f.done()
    head = (ATMHead if kind == "ATMHead" else ShrunkHead)(**kwargs)
    loss_options = {"num_classes": num_classes, "ignore_index": ignore_index,
                    "loss_weight": loss.get("loss_weight", 1.0), "cls_weight": loss.get("cls_weight", 1.0),
                    "mask_weight": loss.get("mask_weight", 20.0), "dice_weight": loss.get("dice_weight", 1.0),
                    "max_aux_outputs": loss["dec_layers"] - 1 if "dec_layers" in loss else None}
    return head, loss_options


def _attach_data_attributes(model: SegViT, source) -> None:
    """``model.data_config`` (the test-time preprocessing ``segvit.inference`` applies: ``mean``, ``std``,
    ``to_rgb``, and the test pipeline's keep-ratio resize ``img_scale``, ``keep_ratio``, ``min_size`` where
    present), ``model.dataset``, ``model.class_names`` and ``model.palette``, from a published name or the
    config ``build_model`` was given (a whole config); None each where it does not say (a bare ``model`` dict
    has no data part). Names and palette: ``segvit.classes.for_model``."""
    from segvit import classes

    whole = published_config(source) if isinstance(source, str) else source
    if not (isinstance(whole, dict) and "model" in whole and "type" not in whole):
        whole = {}
    steps = ((whole.get("data") or {}).get("test") or {}).get("pipeline") or []
    aug = next((s for s in steps if isinstance(s, dict) and s.get("type") == "MultiScaleFlipAug"), {})
    inner = aug.get("transforms") or []
    resize = next((t for t in inner if isinstance(t, dict) and t.get("type") == "Resize"), None)
    # The test pipeline's Normalize is what segvit.eval applies; img_norm_cfg (the same values in the
    # published configs) is the fallback.
    norm = next((t for t in inner if isinstance(t, dict) and t.get("type") == "Normalize"), None)
    norm = norm or whole.get("img_norm_cfg")
    data_config = None
    if norm and "mean" in norm and "std" in norm:
        data_config = {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]],
                       "to_rgb": bool(norm.get("to_rgb", True)), "img_scale": None}
        if resize is not None and aug.get("img_scale") is not None:
            data_config["img_scale"] = copy.deepcopy(aug["img_scale"])
            data_config["keep_ratio"] = resize.get("keep_ratio", True)
            if resize.get("min_size") is not None:
                data_config["min_size"] = resize["min_size"]
    dataset, names, palette, _ = classes.for_model(whole, model.num_classes)
    model.data_config = data_config
    model.dataset = dataset
    model.class_names = names
    model.palette = palette if whole else None


def _skip_init_if(skip: bool):
    from segvit.checkpoint import skip_init

    return skip_init() if skip else contextlib.nullcontext()


def build_model(name_or_cfg: str | dict, checkpoint=None, pretrained: bool = False, *,
                strict: bool = True) -> SegViT:
    """A SegViT model from a published name (see ``list_models()``) or an original config's ``model`` dict
    (a whole config with a ``model`` key is accepted too). With a ``checkpoint`` (``load_checkpoint``) the model is
    returned in eval mode, ready for inference as mmseg's and Hugging Face's loaders return it (call ``.train()``
    to fine-tune); without one, in training mode, as a freshly built ``nn.Module``.

    ``pretrained=True`` (a published name only) loads the official weights, fetched from the Hugging Face Hub
    into its cache by ``segvit.hub.official_checkpoint(name)`` (needs ``pip install segvit[hub]``; honours
    ``HF_HUB_OFFLINE`` and ``HF_HOME`` / ``HF_HUB_CACHE``), as ``checkpoint=`` loads a file.

    With a checkpoint the random initialisation is skipped: the modules are built without values and the
    checkpoint's tensors become the parameters (``segvit.checkpoint.skip_init``), giving, bit for bit, the model
    a build-then-load gives, in a fraction of the time; only torch's global RNG is no longer advanced by the
    init draws. ``strict=False`` lets missing and unexpected keys pass (mis-shaped ones never): the missing
    ones then keep their random initialisation, for which the full one is run."""
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained: expected a bool, got {pretrained!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {strict!r}")
    if pretrained:
        if checkpoint is not None:
            raise ValueError("build_model: pass either pretrained=True (the official weights) or checkpoint=PATH, "
                             "not both")
        if not isinstance(name_or_cfg, str):
            raise ValueError("build_model: pretrained=True needs a published model name (segvit.hub."
                             "official_models()), got a config dict; pass its weights as checkpoint=PATH")
        from segvit.hub import official_checkpoint

        checkpoint = official_checkpoint(name_or_cfg)
    source = published_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    cfg = copy.deepcopy(source)
    if "model" in cfg and "type" not in cfg:
        cfg = cfg["model"]
    f = _Fields(cfg, "model")
    kind = f.require("type")
    if kind != "EncoderDecoder":
        raise ValueError(f"model.type: expected 'EncoderDecoder', got {kind!r}")
    with _skip_init_if(checkpoint is not None):  # the checkpoint replaces the random init: skip it
        backbone = _build_backbone(f.require("backbone"))
        head, loss_options = _build_head(f.require("decode_head"), backbone)
    for key in ("neck", "auxiliary_head"):
        if f.get(key) is not None:
            raise NotImplementedError(f"model.{key} is not supported in SegViT")
    test_cfg = dict(f.get("test_cfg") or {})
    f.ignore("pretrained", "train_cfg", "init_cfg")
    f.done()
    mode = test_cfg.pop("mode", "whole")
    crop_size, stride = test_cfg.pop("crop_size", None), test_cfg.pop("stride", None)
    test_cfg.pop("rescale", None)
    if test_cfg:
        raise ValueError(f"model.test_cfg: unknown field(s) {sorted(test_cfg)}")
    crop_size = _pair(crop_size, "model.test_cfg.crop_size") if crop_size else None
    stride = _pair(stride, "model.test_cfg.stride") if stride else None
    model = SegViT(backbone, head, test_mode=mode, crop_size=crop_size, stride=stride,
                   ignore_index=loss_options["ignore_index"])
    model.loss_options = loss_options
    _attach_data_attributes(model, source)
    if checkpoint is not None:
        from segvit.checkpoint import CheckpointError, RefusedObjectsError, load_or_rebuild

        try:
            model = load_or_rebuild(model, checkpoint, strict=strict, rebuild=lambda: build_model(name_or_cfg))
        except CheckpointError as exc:
            if not pretrained or isinstance(exc, RefusedObjectsError):  # only a broken file is fetched again
                raise
            raise CheckpointError(f"{exc}\nThe cached official checkpoint of {name_or_cfg!r} is damaged: fetch it "
                                  f"again with segvit.hub.official_checkpoint({name_or_cfg!r}, force_download=True)"
                                  ) from exc
        model.eval()
    return model
