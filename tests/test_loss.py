"""SegViTLoss and mask_losses on cases computed by hand (python floats, no torch loss functions)."""
import math

import pytest
import torch

import segvit

ALPHA, GAMMA = 0.25, 2.0


def sig(x):
    return 1 / (1 + math.exp(-x))


def focal_pixel(x, t):
    p = sig(x)
    ce = -math.log(p) if t else -math.log(1 - p)
    p_t = p if t else 1 - p
    alpha_t = ALPHA if t else 1 - ALPHA
    return alpha_t * ce * (1 - p_t) ** GAMMA


def dice_by_hand(x, targets):
    p = sig(x)  # a 1x1 mask grid upsamples to a constant
    return 1 - (2 * p * sum(targets) + 1) / (p * len(targets) + sum(targets) + 1)


def hand_case():
    # K = 3 classes; 1x1 mask grids; labels 2x2 with an ignored pixel (a negative for every mask).
    mask_logits = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    labels = torch.tensor([[[0, 0], [2, 255]]])
    targets = {0: [1, 1, 0, 0], 2: [0, 0, 1, 0]}
    x = {0: 0.5, 2: 2.0}
    focal = sum(sum(focal_pixel(x[c], t) for t in ts) / 4 for c, ts in targets.items()) / 2
    dice = sum(dice_by_hand(x[c], ts) for c, ts in targets.items()) / 2
    return mask_logits, labels, focal, dice


def test_mask_losses_by_hand():
    mask_logits, labels, focal, dice = hand_case()
    loss_focal, loss_dice, num_masks = segvit.ops.mask_losses(mask_logits, labels)
    assert num_masks.item() == 2 and num_masks.dtype == torch.int64 and num_masks.dim() == 0
    assert loss_focal.item() == pytest.approx(focal, rel=1e-6)
    assert loss_dice.item() == pytest.approx(dice, rel=1e-6)


def test_loss_dict_by_hand():
    mask_logits, labels, focal, dice = hand_case()
    class_logits = torch.tensor([[[1.0, 0.0, -1.0, 0.5], [0.2, 0.3, 0.1, -0.4], [0.0, 1.0, 2.0, 0.0]]])
    out = {"pred_logits": class_logits, "pred_masks": mask_logits,
           "aux_outputs": [{"pred_logits": class_logits * 2, "pred_masks": mask_logits}]}
    losses = segvit.SegViTLoss(3)(out, labels)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}

    def ce(logits):
        # targets: query 0 -> class 0, query 1 (absent) -> no object (weight 0.1), query 2 -> class 2
        weights, targets = [1.0, 0.1, 1.0], [0, 3, 2]
        nll = [math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist()[0], targets)]
        return sum(w * n for w, n in zip(weights, nll)) / sum(weights)

    assert losses["loss_ce"].item() == pytest.approx(ce(class_logits), rel=1e-6)
    assert losses["loss_ce_0"].item() == pytest.approx(ce(class_logits * 2), rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(20 * focal, rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-6)


def test_image_without_valid_pixel():
    """No present class: the mask terms are 0 (num_masks clamps to 1), every query targets "no object"."""
    mask_logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    loss_focal, loss_dice, num_masks = segvit.ops.mask_losses(mask_logits, labels)
    assert num_masks.item() == 1 and loss_focal.item() == 0 and loss_dice.item() == 0
    (loss_focal + loss_dice).backward()
    assert torch.equal(mask_logits.grad, torch.zeros_like(mask_logits))
    class_logits = torch.randn(1, 3, 4)
    losses = segvit.SegViTLoss(3)({"pred_logits": class_logits, "pred_masks": mask_logits}, labels)
    expected = torch.nn.functional.cross_entropy(class_logits[0], torch.tensor([3, 3, 3]))
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_batch_mixes_images_and_counts_masks_over_batch():
    mask_logits = torch.randn(2, 4, 3, 3)
    labels = torch.full((2, 6, 6), 255)
    labels[0, :3] = 1
    labels[0, 3:] = 3
    labels[1, :, :2] = 2  # image 1: one class; rest ignored
    loss_focal, loss_dice, num_masks = segvit.ops.mask_losses(mask_logits, labels)
    assert num_masks.item() == 3
    single = [segvit.ops.mask_losses(mask_logits[b:b + 1], labels[b:b + 1]) for b in range(2)]
    torch.testing.assert_close(loss_focal, (single[0][0] * 2 + single[1][0]) / 3)
    torch.testing.assert_close(loss_dice, (single[0][1] * 2 + single[1][1]) / 3)


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\)"):
        segvit.ops.mask_losses(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 3]]]))
    with pytest.raises(ValueError, match="labels"):
        segvit.SegViTLoss(3)({"pred_logits": torch.randn(1, 3, 4), "pred_masks": torch.randn(1, 3, 2, 2)},
                             torch.tensor([[[0, -1]]]))


def test_loss_weights_and_empty_weight_buffer():
    loss = segvit.SegViTLoss(5, loss_weight=2.0)
    assert loss.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 1, 0.1])
    assert loss.weights == {"loss_ce": 2.0, "loss_mask": 40.0, "loss_dice": 2.0}


def test_dec_layers_limits_aux_terms_as_the_original(make_config):
    """The original's weight dict has dec_layers - 1 aux groups; terms of further aux outputs are dropped."""
    cfg = make_config(img_size=32)
    cfg["decode_head"]["loss_decode"]["dec_layers"] = 2  # the cascade head has 2 aux outputs
    model = segvit.build_model(cfg)
    labels = torch.randint(0, 5, (1, 32, 32))
    losses = segvit.SegViTLoss.for_model(model)(model(torch.randn(1, 3, 32, 32)), labels)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}


def test_labels_are_checked_once_per_loss_call(monkeypatch):
    """SegViTLoss checks the label values once for the main and every auxiliary output (each check reads a min/max
    back to the host: a device synchronisation); mask_losses alone still checks by default."""
    from segvit.ops import _checks

    calls = []
    check = _checks.label_values
    monkeypatch.setattr(_checks, "label_values", lambda *a: calls.append(a) or check(*a))
    out = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 2, 2),
           "aux_outputs": [{"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 2, 2)}] * 2}
    labels = torch.tensor([[[0, 2], [255, 1]], [[1, 1], [0, 0]]])
    losses = segvit.SegViTLoss(3)(out, labels)
    assert len(losses) == 9 and len(calls) == 1
    calls.clear()
    checked = segvit.ops.mask_losses(out["pred_masks"], labels)
    assert len(calls) == 1
    unchecked = segvit.ops.mask_losses(out["pred_masks"], labels, check_labels=False)
    assert len(calls) == 1
    for a, b in zip(checked, unchecked):
        assert torch.equal(a, b)
