"""The 7 published configurations, original config dicts, and original checkpoints."""
import os
import re

import pytest
import torch

import segvit
from segvit import checkpoint as ckpt
from conftest import DATA

PUBLISHED = ["segvit_vit-b16_ade20k_512", "segvit_vit-l16_ade20k_640", "segvit_vit-l16_shrunk_ade20k_640",
             "segvit_vit-l16_cocostuff10k_512", "segvit_vit-l16_shrunk_cocostuff10k_512",
             "segvit_vit-l16_pc60_480", "segvit_vit-l16_shrunk_pc60_480"]


def original_keys(name):
    """name -> shape of every entry of the original state dict (checkpoint-keys/)."""
    path = os.path.join(DATA, "checkpoint-keys", name[len("segvit_"):] + ".txt")
    keys = {}
    with open(path) as f:
        for line in f:
            key, shape = re.fullmatch(r"(\S+) \((.*)\)", line.strip()).groups()
            keys[key] = tuple(int(s) for s in shape.split(",") if s.strip())
    return keys


def test_list_models():
    assert segvit.list_models() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_maps_one_to_one_onto_original_checkpoint(name):
    with torch.device("meta"):
        model = segvit.build_model(name)
    expected = original_keys(name)
    exported = {k: tuple(v.shape) for k, v in ckpt.to_original(model).items()}
    assert exported == expected
    # And a synthetic checkpoint in the original format loads strictly (meta tensors: names and shapes only).
    state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    segvit.load_checkpoint(model, {"state_dict": state, "meta": {"CLASSES": None}}, strict=True)


def test_published_hyperparameters():
    cfg = segvit.published_config("segvit_vit-l16_shrunk_ade20k_640")
    assert cfg["optimizer"]["lr"] == 2e-5 and cfg["lr_config"]["warmup_iters"] == 1500
    with torch.device("meta"):
        model = segvit.build_model("segvit_vit-l16_shrunk_ade20k_640")
    assert model.backbone.shrink_idx == 8 and model.backbone.out_indices == (7, 23)
    assert model.test_mode == "slide" and model.crop_size == (640, 640) and model.stride == (608, 608)
    assert model.backbone.blocks[23].drop_path.p == pytest.approx(0.3)
    assert model.backbone.blocks[0].norm1.eps == 1e-6 and model.head.atm.stage.layers[0].norm1.eps == 1e-5
    assert model.head.grid_queries.weight.shape == (1600, 512)


def test_synthetic_original_checkpoint_loads_and_sets_every_value(tmp_path):
    """ViT-B for real: random tensors of the original names and shapes, saved as mmcv does, loaded strictly."""
    name = "segvit_vit-b16_ade20k_512"
    expected = original_keys(name)
    state = {k: torch.randn(shape) for k, shape in expected.items()}
    path = tmp_path / "vitb.pth"
    torch.save({"state_dict": state, "meta": {"mmcv_version": "1.4.4", "CLASSES": ["wall"] * 150}}, path)
    model = segvit.build_model(name, checkpoint=str(path))
    exported = ckpt.to_original(model)
    for key, value in state.items():
        if not key.endswith("empty_weight"):
            assert torch.equal(exported[key], value), key


def test_checkpoint_errors_list_the_keys(make_config):
    model = segvit.build_model(make_config())
    state = ckpt.to_original(model)
    del state["decode_head.q.weight"]
    state["decode_head.bogus.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): head.class_queries.weight") as info:
        segvit.load_checkpoint(model, state)
    assert "decode_head.bogus.weight" in str(info.value)
    segvit.load_checkpoint(model, state, strict=False)  # lenient load of what matches
    state = model.state_dict()
    state["head.class_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        segvit.load_checkpoint(model, state, strict=False)


def test_own_format_round_trip(make_config, tmp_path):
    model = segvit.build_model(make_config(head="TPNATMHead"))
    torch.save({"model": model.state_dict(), "iteration": 3}, tmp_path / "own.pth")
    other = segvit.load_checkpoint(segvit.build_model(make_config(head="TPNATMHead")), str(tmp_path / "own.pth"))
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_config_errors(make_config):
    cfg = make_config()
    cfg["decode_head"]["bogus"] = 1
    with pytest.raises(ValueError, match=r"model.decode_head: unknown field\(s\) \['bogus'\]"):
        segvit.build_model(cfg)
    cfg = make_config()
    cfg["backbone"]["type"] = "SwinTransformer"
    with pytest.raises(ValueError, match="model.backbone.type"):
        segvit.build_model(cfg)
    cfg = make_config()
    cfg["decode_head"]["align_corners"] = True
    with pytest.raises(NotImplementedError, match="align_corners"):
        segvit.build_model(cfg)
    cfg = make_config()
    cfg["decode_head"]["in_channels"] = 7
    with pytest.raises(ValueError, match="in_channels"):
        segvit.build_model(cfg)
    with pytest.raises(ValueError, match="unknown model"):
        segvit.build_model("segvit_vit-h14")


def test_honoured_and_ignored_arguments(make_config):
    cfg = make_config()
    cfg["backbone"].update(mlp_ratio=2, qkv_bias=False, with_cp=True, pretrained="https://example/x.pth")
    cfg["decode_head"].update(channels=999, dropout_ratio=0.5, in_index=[0, 1, 2])
    model = segvit.build_model(cfg)
    assert model.backbone.blocks[0].mlp.fc1.out_features == 64
    assert model.backbone.blocks[0].attn.in_proj_bias is None
    model.eval()(torch.randn(1, 3, 64, 64))
    cfg = make_config(head="TPNATMHead")
    cfg["backbone"]["final_norm"] = True
    model = segvit.build_model(cfg)
    assert "backbone.ln1.weight" in ckpt.to_original(model)
