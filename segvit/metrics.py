"""Segmentation metrics as mmsegmentation computes them: areas summed over the whole dataset, then divided.

For every class c, over all pixels whose label is not ``ignore_index``:
    intersect[c] = #(pred == c and label == c),  pred_area[c] = #(pred == c),  label_area[c] = #(label == c),
    union[c] = pred_area[c] + label_area[c] - intersect[c]
    IoU[c] = intersect[c] / union[c],  Acc[c] = intersect[c] / label_area[c]   (NaN where the denominator is 0)
    mIoU = nanmean(IoU),  mAcc = nanmean(Acc),  aAcc = sum(intersect) / sum(label_area)
Predictions outside [0, num_classes) count in no class (as mmseg's histogram with that range).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


class IoUAccumulator:
    """Running sums of the four areas; ``update(pred, label)`` per image or batch, ``compute()`` at the end.
    An evaluation over a dataset and one ``mean_iou`` call over the same pairs give the same numbers."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersect = torch.zeros(num_classes, dtype=torch.float64)
        self.pred_area = torch.zeros(num_classes, dtype=torch.float64)
        self.label_area = torch.zeros(num_classes, dtype=torch.float64)

    def _areas(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if pred.shape != label.shape:
            raise ValueError(f"preds and labels: shapes differ, {tuple(pred.shape)} vs {tuple(label.shape)}")
        for name, t in (("preds", pred), ("labels", label)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
        pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
        valid = label != self.ignore_index
        pred, label = pred[valid], label[valid]
        k = self.num_classes

        def hist(values):
            values = values[(values >= 0) & (values < k)]
            return torch.bincount(values, minlength=k).double().cpu()

        return torch.stack([hist(pred[pred == label]), hist(pred), hist(label)])

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        intersect, pred_area, label_area = self._areas(torch.as_tensor(pred), torch.as_tensor(label))
        self.intersect += intersect
        self.pred_area += pred_area
        self.label_area += label_area

    def merge_(self, areas: torch.Tensor) -> None:
        """Add (3, K) areas (intersect, pred, label), e.g. summed over processes."""
        self.intersect += areas[0]
        self.pred_area += areas[1]
        self.label_area += areas[2]

    def areas(self) -> torch.Tensor:
        return torch.stack([self.intersect, self.pred_area, self.label_area])

    def compute(self) -> dict:
        union = self.pred_area + self.label_area - self.intersect
        iou = _safe_div(self.intersect, union)
        acc = _safe_div(self.intersect, self.label_area)
        total = self.label_area.sum()
        return {"IoU": iou, "Acc": acc, "mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
                "aAcc": float(self.intersect.sum() / total) if total > 0 else math.nan}


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def mean_iou(preds: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor | Sequence[torch.Tensor],
             num_classes: int, ignore_index: int = 255) -> dict:
    """Per-class ``IoU`` and ``Acc`` (float64 tensors of length ``num_classes``, NaN where a class never occurs
    in labels or predictions), ``mIoU``, ``mAcc`` (NaN-means) and ``aAcc`` (floats; NaN if every pixel is
    ignored), accumulated over all images as in the module docstring.

    preds, labels: integer tensors (B, H, W), or sequences of (H, W) tensors (sizes may differ between images,
    each pred must match its label)."""
    if isinstance(preds, torch.Tensor) != isinstance(labels, torch.Tensor):
        raise TypeError("preds and labels: give both as tensors or both as sequences")
    if isinstance(preds, torch.Tensor):
        if preds.dim() != 3:
            raise ValueError(f"preds: expected (B, H, W), got shape {tuple(preds.shape)}")
        preds, labels = list(preds), list(labels)
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"preds and labels: {len(preds)} predictions for {len(labels)} labels")
    acc = IoUAccumulator(num_classes, ignore_index)
    for pred, label in zip(preds, labels):
        acc.update(pred, label)
    return acc.compute()


def format_table(results: dict, class_names: Iterable[str] | None = None) -> str:
    """Per-class IoU / Acc table (percent) followed by the summary line, as text."""
    iou, acc = results["IoU"], results["Acc"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    width = max([5] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, i, a in zip(names, iou.tolist(), acc.tolist()):
        lines.append(f"{name:<{width}}  {100 * i:6.2f}  {100 * a:6.2f}")
    line = f"mIoU {100 * results['mIoU']:.2f}  aAcc {100 * results['aAcc']:.2f}  mAcc {100 * results['mAcc']:.2f}"
    if "background" in results:  # segvit.eval.headline: the means without the background class, as published
        line += (f"  (without {names[results['background']]}; over all {len(names)} classes: mIoU "
                 f"{100 * results['mIoU_all']:.2f}  mAcc {100 * results['mAcc_all']:.2f})")
    lines.append(line)
    return "\n".join(lines)
