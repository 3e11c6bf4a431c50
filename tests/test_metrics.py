import math

import pytest
import torch

from segvit.metrics import IoUAccumulator, format_table, mean_iou

NAN = math.nan


def close(actual, expected):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual, expected, equal_nan=True, atol=1e-12), (actual, expected)


def test_hand_computed_with_absent_class_and_ignored_pixels():
    # 3 classes; class 2 is neither labelled nor predicted (NaN IoU and Acc); 255 pixels are skipped even where
    # the prediction is right or a class outside the range.
    pred = torch.tensor([[0, 0, 1], [1, 1, 0], [7, 1, 0]])
    label = torch.tensor([[0, 1, 1], [1, 255, 255], [255, 0, 0]])
    # valid pixels (pred, label): (0,0) (0,1) (1,1) (1,1) (1,0) (0,0)
    # class 0: intersect 2, pred 3, label 3 -> IoU 2/4, Acc 2/3
    # class 1: intersect 2, pred 3, label 3 -> IoU 2/4, Acc 2/3
    r = mean_iou(pred[None], label[None], num_classes=3)
    close(r["IoU"], [0.5, 0.5, NAN])
    close(r["Acc"], [2 / 3, 2 / 3, NAN])
    assert r["mIoU"] == pytest.approx(0.5) and r["mAcc"] == pytest.approx(2 / 3)
    assert r["aAcc"] == pytest.approx(4 / 6)


def test_class_only_predicted_has_zero_iou_and_nan_acc():
    pred = torch.tensor([[2, 0], [0, 0]])
    label = torch.tensor([[0, 0], [0, 0]])
    r = mean_iou(pred[None], label[None], num_classes=3)
    close(r["IoU"], [0.75, NAN, 0.0])
    close(r["Acc"], [0.75, NAN, NAN])
    assert r["mIoU"] == pytest.approx(0.375)
    assert r["mAcc"] == pytest.approx(0.75)


def test_areas_are_summed_over_images_not_averaged():
    # image 1: class 0 perfect on 1 pixel; image 2: class 0 labelled on 3 pixels, predicted on 1 of them.
    preds = [torch.tensor([[0]]), torch.tensor([[0, 1, 1]])]
    labels = [torch.tensor([[0]]), torch.tensor([[0, 0, 0]])]
    r = mean_iou(preds, labels, num_classes=2)
    # summed: class 0 intersect 2, union 4 -> 0.5 (the mean of per-image IoUs would be (1 + 1/3) / 2).
    close(r["IoU"], [0.5, 0.0])
    assert r["aAcc"] == pytest.approx(0.5)


def test_all_ignored_image_contributes_nothing():
    preds = [torch.tensor([[1, 1], [0, 1]]), torch.tensor([[0, 1, 0]])]
    labels = [torch.tensor([[1, 1], [0, 0]]), torch.full((1, 3), 255)]
    with_ignored = mean_iou(preds, labels, num_classes=2)
    alone = mean_iou(preds[:1], labels[:1], num_classes=2)
    close(with_ignored["IoU"], alone["IoU"].tolist())
    close(alone["IoU"], [0.5, 2 / 3])
    only_ignored = mean_iou(preds[1:], labels[1:], num_classes=2)
    assert math.isnan(only_ignored["mIoU"]) and math.isnan(only_ignored["aAcc"])


def test_batch_tensor_equals_sequence_and_accumulator():
    g = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 5, (3, 7, 9), generator=g)
    labels = torch.randint(0, 6, (3, 7, 9), generator=g)
    labels[labels == 5] = 255
    a = mean_iou(preds, labels, num_classes=5)
    b = mean_iou(list(preds), list(labels), num_classes=5)
    acc = IoUAccumulator(5)
    for p, l in zip(preds, labels):
        acc.update(p, l)
    c = acc.compute()
    for r in (b, c):
        close(r["IoU"], a["IoU"].tolist())
        assert r["mIoU"] == pytest.approx(a["mIoU"])
    # independent count for one class
    valid = labels != 255
    inter = ((preds == 3) & (labels == 3) & valid).sum()
    union = (((preds == 3) | (labels == 3)) & valid).sum()
    assert a["IoU"][3].item() == pytest.approx(inter.item() / union.item())
    assert "mIoU" in format_table(a)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="shapes differ"):
        mean_iou([torch.zeros(2, 2, dtype=torch.long)], [torch.zeros(2, 3, dtype=torch.long)], 2)
    with pytest.raises(TypeError, match="preds: expected an integer"):
        mean_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 2)
