"""The model layer on hand-checkable cases: shapes, the shrink step, mask accumulation, inference, gradients."""
import pytest
import torch
import torch.nn.functional as F

import segvit
from segvit.models.atm_head import ATMHead


@pytest.mark.parametrize("size,classes", [(640, 150), (512, 171), (480, 60)])
def test_cascade_shapes_at_published_sizes(make_config, size, classes):
    model = segvit.build_model(make_config(img_size=size, num_classes=classes)).eval()
    images = torch.randn(1, 3, size, size)
    feats = model.backbone(images)
    grid = (size // 16, size // 16)
    assert [tuple(t.shape) for t, _ in feats] == [(1, grid[0] * grid[1], 32)] * 3
    assert all(tuple(g) == grid for _, g in feats)
    out = model(images)
    assert out["pred_logits"].shape == (1, classes, classes + 1)
    assert out["pred_masks"].shape == (1, classes, *grid)
    assert [tuple(a["pred_masks"].shape) for a in out["aux_outputs"]] == [(1, classes, *grid)] * 2
    assert model.predict(images, mode="whole").shape == (1, classes, size, size)


@pytest.mark.parametrize("size,classes", [(640, 150), (512, 171), (480, 60)])
def test_shrunk_shapes_at_published_sizes(make_config, size, classes):
    model = segvit.build_model(make_config(head="TPNATMHead", img_size=size, num_classes=classes)).eval()
    images = torch.randn(1, 3, size, size)
    (shallow, g16), (deep, g32) = model.backbone(images)
    side = size // 16
    assert tuple(g16) == (side, side) and shallow.shape == (1, side * side, 32)
    assert tuple(g32) == ((side + 1) // 2,) * 2 and deep.shape == (1, ((side + 1) // 2) ** 2, 32)
    assert model.head.grid_queries.weight.shape == (side * side, 16)
    out = model(images)
    assert out["pred_masks"].shape == (1, classes, side, side)
    assert len(out["aux_outputs"]) == 1  # head_layers=2: one aux output per earlier layer


def test_shrink_step_selects_top_left_tokens(make_config):
    """Block shrink_idx must take its queries and residual from rows/columns 0, 2, 4, ... of the grid."""
    model = segvit.build_model(make_config(head="TPNATMHead", img_size=80, num_layers=2, shrink_idx=1,
                                           out_indices=[0, 1])).eval()
    block = model.backbone.blocks[1]
    x = torch.randn(2, 25, 32)  # a 5x5 grid -> 3x3 queries (odd sizes keep the last row and column)
    seen = {}
    original = segvit.ops.query_pool_attention

    def spy(xn, grid, w, b, heads, stride=2):
        seen["grid"], seen["normed"] = grid, xn
        return original(xn, grid, w, b, heads, stride=stride)

    segvit.models.vit.ops.query_pool_attention = spy
    try:
        out, grid = block.forward_query_pooled(x, (5, 5))
    finally:
        segvit.models.vit.ops.query_pool_attention = original
    assert tuple(grid) == (3, 3) and out.shape == (2, 9, 32)
    assert seen["grid"] == (5, 5)
    torch.testing.assert_close(seen["normed"], block.norm1(x))
    # Recompute by hand with an explicit copy of the sampled tokens.
    rows = [r * 5 + c for r in (0, 2, 4) for c in (0, 2, 4)]
    sampled = x[:, rows]
    attn = block.attn
    mha = torch.nn.MultiheadAttention(32, attn.num_heads, batch_first=True)
    mha.in_proj_weight.data, mha.in_proj_bias.data = attn.in_proj_weight.data, attn.in_proj_bias.data
    mha.out_proj.load_state_dict(attn.out_proj.state_dict())
    normed = block.norm1(x)
    y = sampled + mha(block.norm1(sampled), normed, normed, need_weights=False)[0]
    y = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)


def test_query_pool_matches_full_attention_of_sampled_queries():
    x = torch.randn(2, 7 * 6, 24, dtype=torch.float64)
    w, b = torch.randn(72, 24, dtype=torch.float64), torch.randn(72, dtype=torch.float64)
    out = segvit.ops.query_pool_attention(x, (7, 6), w, b, 3)
    assert out.shape == (2, 4 * 3, 24)
    sampled = x.view(2, 7, 6, 24)[:, ::2, ::2].reshape(2, 12, 24)
    q, k, v = F.linear(sampled, w[:24], b[:24]), F.linear(x, w[24:48], b[24:48]), F.linear(x, w[48:], b[48:])
    split = lambda t: t.view(2, -1, 3, 8).transpose(1, 2)
    expected = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, 12, 24)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_cascade_masks_accumulate_across_stages(make_config):
    model = segvit.build_model(make_config(img_size=48)).eval()
    images = torch.randn(2, 3, 48, 48)
    head: ATMHead = model.head
    per_stage = []
    hooks = [stage.layers[-1].cross_attn.register_forward_hook(lambda m, i, o: per_stage.append(o[1]))
             for stage in head.stages]
    out = model(images)
    for h in hooks:
        h.remove()
    a1, a2, a3 = (s.view(2, 5, 3, 3) for s in per_stage)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_masks"], a1)
    torch.testing.assert_close(out["aux_outputs"][1]["pred_masks"], a1 + a2)
    torch.testing.assert_close(out["pred_masks"], a1 + a2 + a3)


def test_cascade_runs_deepest_feature_first(make_config):
    model = segvit.build_model(make_config(img_size=48)).eval()
    images = torch.randn(1, 3, 48, 48)
    feats = model.backbone(images)
    memories = []
    hooks = [stage.input_proj.register_forward_hook(lambda m, i, o: memories.append(i[0]))
             for stage in model.head.stages]
    model.head(feats)
    for h in hooks:
        h.remove()
    for memory, (tokens, _) in zip(memories, feats[::-1]):
        assert memory is tokens


def test_shrunk_masks_are_per_layer(make_config):
    model = segvit.build_model(make_config(head="TPNATMHead", img_size=48, head_layers=3)).eval()
    sims = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, i, o: sims.append(o[1]))
             for layer in model.head.atm.stage.layers]
    out = model(torch.randn(1, 3, 48, 48))
    for h in hooks:
        h.remove()
    masks = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
    for mask, sim in zip(masks, sims):
        torch.testing.assert_close(mask, sim.view(1, 5, 3, 3))


@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_slide_equals_whole_when_crop_is_the_image(make_config, head):
    model = segvit.build_model(make_config(head=head, img_size=64)).eval()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.predict(images, mode="slide"), model.predict(images, mode="whole"))


def test_slide_window_placement_and_average(make_config):
    """Windows flush with the bottom/right edge; overlaps averaged (checked against a hand-made sum)."""
    model = segvit.build_model(make_config(img_size=32, stride=20)).eval()
    images = torch.randn(1, 3, 40, 70)
    windows = []
    original = model.encode_decode

    def record(crop):
        windows.append(tuple(crop.shape[-2:]))
        return original(crop)

    model.encode_decode = record
    scores = model.predict(images, mode="slide")
    # rows: (40-32+19)//20+1 = 2 -> starts 0, 8; cols: (70-32+19)//20+1 = 3 -> starts 0, 20, 38
    assert windows == [(32, 32)] * 6
    model.encode_decode = original
    total = torch.zeros(1, 5, 40, 70)
    count = torch.zeros(1, 1, 40, 70)
    for y in (0, 8):
        for x in (0, 20, 38):
            total[..., y:y + 32, x:x + 32] += original(images[..., y:y + 32, x:x + 32])
            count[..., y:y + 32, x:x + 32] += 1
    torch.testing.assert_close(scores, total / count)


def test_non_square_and_odd_grids_work(make_config):
    """The original fails on odd or non-square token grids; we use the real grid."""
    model = segvit.build_model(make_config(img_size=64)).eval()
    images = torch.randn(1, 3, 80, 50)  # 5 x 4 tokens (the width is padded 50 -> 64)
    out = model(images)
    assert out["pred_masks"].shape == (1, 5, 5, 4)
    assert model.predict(images, mode="whole").shape == (1, 5, 80, 50)
    assert model.predict(torch.randn(1, 3, 100, 90), mode="slide").shape == (1, 5, 100, 90)


def test_position_embedding_resized_bicubic(make_config):
    model = segvit.build_model(make_config(img_size=64))
    pos = model.backbone.position_embedding((6, 3))
    grid = model.backbone.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pos, expected)
    assert model.backbone.position_embedding((4, 4)) is not None


@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_gradients_reach_every_parameter(make_config, head):
    model = segvit.build_model(make_config(head=head, img_size=48, num_classes=4, drop_path_rate=0.1)).train()
    images = torch.randn(2, 3, 48, 48)
    labels = torch.randint(0, 4, (2, 48, 48))
    labels[0, :10] = 255
    losses = segvit.SegViTLoss.for_model(model)(model(images), labels)
    sum(losses.values()).backward()
    # The CLS token only ever meets its own (dropped) position: no gradient, exactly as in the original.
    no_grad = {"backbone.cls_token"}
    for name, p in model.named_parameters():
        if name in no_grad:
            assert p.grad is None or not p.grad.any()
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dropout_only_in_training(make_config):
    model = segvit.build_model(make_config(img_size=48, drop_path_rate=0.3))
    images = torch.randn(1, 3, 48, 48)
    model.eval()
    a, b = model(images), model(images)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=0, atol=0)
    model.train()
    c, d = model(images), model(images)
    assert not torch.allclose(c["pred_masks"], d["pred_masks"])
    assert model.head.stages[0].layers[0].dropout.p == 0.1
    assert model.head.stages[0].layers[0].self_attn.dropout == 0.1
    assert model.head.stages[0].layers[0].cross_attn.attn_drop == 0.1
    assert [blk.drop_path.p for blk in model.backbone.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_decoder_layers_start_from_identical_in_proj(make_config):
    """nn.TransformerDecoder deep-copies one layer: in_proj_weight starts equal in every layer of a decoder."""
    model = segvit.build_model(make_config(img_size=48, head_layers=3))
    layers = model.head.stages[0].layers
    assert torch.equal(layers[0].self_attn.in_proj_weight, layers[2].self_attn.in_proj_weight)
    assert not torch.equal(layers[0].fc1.weight, layers[2].fc1.weight)
