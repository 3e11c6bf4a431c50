import pytest
import torch
import torch.nn.functional as F

import segvit
from segvit.pretrained import convert_to_segvit, load_pretrained_backbone, resize_pos_embed

from conftest import tiny_config

DIM, DEPTH = 32, 4


def timm_state_dict(grid=3, dim=DIM, depth=DEPTH, with_cls=True):
    """A synthetic timm ``VisionTransformer`` state dict (random values, timm's names and shapes)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, grid * grid + int(with_cls), dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "norm.weight": r(dim), "norm.bias": r(dim), "head.weight": r(1000, dim), "head.bias": r(1000)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": r(dim), p + "norm2.bias": r(dim), p + "mlp.fc1.weight": r(4 * dim, dim),
                   p + "mlp.fc1.bias": r(4 * dim), p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def test_timm_weights_land_on_the_right_parameters(tmp_path):
    sd = timm_state_dict(grid=3)
    path = tmp_path / "vit_timm.pth"
    torch.save({"model": sd}, path)
    model = segvit.build_model(tiny_config(img_size=64, embed_dims=DIM, num_layers=DEPTH))  # 4 x 4 grid
    ignored = load_pretrained_backbone(model, str(path))
    assert ignored == []  # head and norm dropped (no final norm), everything else used
    b = model.backbone
    assert torch.equal(b.blocks[2].attn.in_proj_weight, sd["blocks.2.attn.qkv.weight"])
    assert torch.equal(b.blocks[2].attn.in_proj_bias, sd["blocks.2.attn.qkv.bias"])
    assert torch.equal(b.blocks[3].attn.out_proj.weight, sd["blocks.3.attn.proj.weight"])
    assert torch.equal(b.blocks[0].mlp.fc2.bias, sd["blocks.0.mlp.fc2.bias"])
    assert torch.equal(b.blocks[1].norm2.weight, sd["blocks.1.norm2.weight"])
    assert torch.equal(b.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(b.cls_token, sd["cls_token"])
    # position embeddings: CLS kept, the 3 x 3 grid resized to 4 x 4 bicubically (align_corners False)
    pos = sd["pos_embed"]
    grid = pos[:, 1:].reshape(1, 3, 3, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert b.pos_embed.shape == (1, 17, DIM)
    assert torch.equal(b.pos_embed[:, :1], pos[:, :1])
    torch.testing.assert_close(b.pos_embed[:, 1:], expected)


def test_timm_qkv_layout_gives_the_same_attention():
    # timm's attention on the packed qkv, written out, equals our block's attention with the loaded weights.
    sd = timm_state_dict(depth=1)
    model = segvit.build_model(tiny_config(img_size=48, embed_dims=DIM, num_layers=1, out_indices=[0],
                                           head_layers=1, heads=4))
    load_pretrained_backbone(model, sd)
    model.double()  # unscaled random weights: compare in float64 so only a layout error can show
    sd = {k: v.double() for k, v in sd.items()}
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    heads = model.backbone.blocks[0].attn.num_heads
    qkv = F.linear(x, sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.bias"])
    q, k, v = qkv.reshape(2, 7, 3, heads, DIM // heads).permute(2, 0, 3, 1, 4)  # timm's reshape
    attn = (q @ k.transpose(-2, -1) * (DIM // heads) ** -0.5).softmax(-1)
    timm_out = F.linear((attn @ v).transpose(1, 2).reshape(2, 7, DIM), sd["blocks.0.attn.proj.weight"],
                        sd["blocks.0.attn.proj.bias"])
    torch.testing.assert_close(model.backbone.blocks[0].attn(x), timm_out, rtol=1e-10, atol=1e-10)


def test_mmseg_format_round_trips_and_prefixes_are_stripped(tmp_path):
    source = segvit.build_model(tiny_config(img_size=64, embed_dims=DIM, num_layers=DEPTH))
    original = segvit.checkpoint.to_original(source)
    mmseg_backbone = {k: v for k, v in original.items() if k.startswith("backbone.")}
    assert any(".ln1." in k for k in mmseg_backbone) and any("ffn.layers.0.0" in k for k in mmseg_backbone)
    torch.save({"state_dict": mmseg_backbone, "meta": {}}, tmp_path / "mmseg.pth")
    target = segvit.build_model(tiny_config(img_size=64, embed_dims=DIM, num_layers=DEPTH))
    load_pretrained_backbone(target, str(tmp_path / "mmseg.pth"))
    for (name, a), b in zip(source.backbone.state_dict().items(), target.backbone.state_dict().values()):
        assert torch.equal(a, b), name


def test_pos_embed_without_cls_and_non_square_grid():
    pos = torch.randn(1, 9, 4)
    out = resize_pos_embed(pos, (2, 5), with_cls=False)
    assert out.shape == (1, 11, 4) and torch.equal(out[:, 0], torch.zeros(1, 4))
    same = resize_pos_embed(torch.randn(1, 10, 4), (3, 3))
    assert same.shape == (1, 10, 4)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 12, 4), (3, 3))


def test_errors_are_clear(tmp_path):
    model = segvit.build_model(tiny_config(img_size=64, embed_dims=DIM, num_layers=DEPTH))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained_backbone(model, str(tmp_path / "missing.pth"))
    wrong_width = timm_state_dict(dim=48)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        load_pretrained_backbone(model, wrong_width)
    too_shallow = {k: v for k, v in timm_state_dict().items() if not k.startswith("blocks.3.")}
    with pytest.raises(RuntimeError, match="missing.*blocks.3"):
        load_pretrained_backbone(model, too_shallow)
    assert "norm.weight" in convert_to_segvit(timm_state_dict(), final_norm=True)
    for name, value in model.state_dict().items():  # a refused file changes nothing
        assert torch.equal(value, before[name]), name
