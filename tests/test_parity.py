"""Our models against outputs of the original SegViT code (tests/data/*.pt, see shared/design/parity)."""
import pytest
import torch
import torch.nn.functional as F

import segvit
from conftest import parity_data

# Float32 rounding: the original and we run the same math with different op orders (measured ~1e-6 relative).
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module", params=["dev_vit.pt", "dev_shrunk.pt"])
def case(request):
    data = parity_data(request.param)
    model = segvit.build_model(data["config_model"])
    segvit.load_checkpoint(model, {"state_dict": data["state_dict"], "meta": {}})
    return model.eval(), data


@pytest.fixture(params=["eager", "auto"])
def backend(request):
    with segvit.ops.use_backend(request.param):
        yield request.param


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


@torch.no_grad()
def test_backbone_features(case):
    model, data = case
    for (tokens, grid), expected in zip(model.backbone(data["img"]), data["backbone_feats"]):
        if expected.dim() == 4:  # the plain ViT returns NCHW maps
            assert tuple(grid) == tuple(expected.shape[-2:])
            expected = expected.flatten(2).transpose(1, 2)
        close(tokens, expected)


@torch.no_grad()
def test_head_outputs(case, backend):
    model, data = case
    out, expected = model(data["img"]), data["head_train_out"]
    size = (model.head.img_size,) * 2
    close(out["pred_logits"], expected["pred_logits"])
    close(F.interpolate(out["pred_masks"], size, mode="bilinear", align_corners=False), expected["pred_masks"])
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"])
    for ours, theirs in zip(out["aux_outputs"], expected["aux_outputs"]):
        close(ours["pred_logits"], theirs["pred_logits"])
        close(ours["pred_masks"], theirs["pred_masks"])
    close(segvit.ops.mask_classify(out["pred_logits"], out["pred_masks"], size), data["head_eval_out"])


@torch.no_grad()
def test_whole_and_slide_inference(case, backend):
    model, data = case
    close(model.predict(data["img"], mode="whole"), data["encode_decode"])
    close(model.predict(data["slide_img"], mode="slide"), data["slide_inference"])
    close(model.predict(data["slide_img"]), data["slide_inference"])  # the config's test mode is slide


def test_loss_dict(case, backend):
    model, data = case
    with torch.no_grad():
        out = model(data["img"])
    losses = segvit.SegViTLoss.for_model(model)(out, data["gt_semantic_seg"][:, 0])
    expected = {k: v for k, v in data["head_losses"].items() if k.startswith("loss")}
    assert set(losses) == set(expected)
    for key, value in expected.items():
        close(losses[key], value)
