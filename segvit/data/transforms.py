"""The original (mmseg 0.24 / mmcv 1.4) training and test pipelines, with numpy, PIL and torch only.

Images are H x W x 3 uint8 arrays in RGB order (PIL's), labels H x W uint8. Every random choice is drawn
from the ``numpy.random.Generator`` passed in, so a sample's augmentation depends only on that generator (the
training loop seeds it per (seed, epoch, index): the same data whatever the number of workers or processes).

Resizing follows cv2 as mmcv calls it: bilinear with half-pixel centres and no anti-aliasing for images
(``torch.nn.functional.interpolate(..., align_corners=False)``, rounded back to uint8; cv2's fixed-point
arithmetic can differ by one grey level), nearest with ``floor(dst * in / out)`` for labels (torch's ``nearest``,
the same rule as cv2's INTER_NEAREST). The HSV steps use cv2's uint8 units with float rounding (not verified
against cv2 here: cv2 is not a dependency).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# -- geometry -----------------------------------------------------------------------------------------------

def rescale_size(height: int, width: int, scale) -> tuple[int, int]:
    """mmcv.rescale_size for a (long, short) pair: the largest factor keeping the long side <= max(scale)
    and the short side <= min(scale); sizes rounded half up. Returns (new_h, new_w)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if label.shape[:2] == tuple(size):
        return label
    t = torch.from_numpy(np.ascontiguousarray(label))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy()


def keep_ratio_size(height: int, width: int, scale, min_size: int | None = None) -> tuple[int, int]:
    """mmseg 0.24 ``Resize`` with keep_ratio: rescale into ``scale``; with ``min_size``, the short side becomes
    max(min(scale), min_size) and the long side follows the aspect ratio (no long-edge bound then)."""
    if min_size is not None:
        short = max(min(scale), min_size)
        scale = (short * height / width, short) if height > width else (short, short * width / height)
    return rescale_size(height, width, scale)


# -- colour: cv2's uint8 HSV (H in [0, 180), S and V in [0, 255]) ------------------------------------------

def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    rgb = img.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta * 255.0 / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(delta, 1e-6)
    h = np.where(v == r, (g - b) * 60.0 / safe,
                 np.where(v == g, 120.0 + (b - r) * 60.0 / safe, 240.0 + (r - g) * 60.0 / safe))
    h = np.where(delta > 0, h, 0.0)
    h = np.where(h < 0, h + 360.0, h)
    hsv = np.stack([np.round(h / 2.0) % 180, np.round(s), np.round(v)], -1)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float32)
    for i, (r, g, b) in enumerate(choices):
        m = sector == i
        out[..., 0][m], out[..., 1][m], out[..., 2][m] = r[m], g[m], b[m]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# -- the pipeline steps ---------------------------------------------------------------------------------------

class RandomResize:
    """mmseg ``Resize(img_scale, ratio_range)``: scale = int(img_scale * r), r ~ U[lo, hi), then keep-ratio
    rescale into that scale."""

    def __init__(self, img_scale, ratio_range=None, keep_ratio=True, min_size=None):
        if not keep_ratio:
            raise NotImplementedError("Resize(keep_ratio=False) is not supported (the SegViT configs keep the ratio)")
        self.img_scale, self.ratio_range, self.min_size = tuple(img_scale), ratio_range, min_size

    def __call__(self, img, label, rng):
        scale = self.img_scale
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        size = keep_ratio_size(img.shape[0], img.shape[1], scale, self.min_size)
        return resize_image(img, size), resize_label(label, size)


class RandomCrop:
    """mmseg ``RandomCrop``: a uniform crop (smaller images are kept whole); with cat_max_ratio < 1, up to 10
    re-draws while the crop has a single class or one class covers >= cat_max_ratio of its labelled pixels."""

    def __init__(self, crop_size, cat_max_ratio=1.0, ignore_index=255):
        self.crop_size, self.cat_max_ratio, self.ignore_index = tuple(crop_size), cat_max_ratio, ignore_index

    def _bbox(self, shape, rng):
        margin_h, margin_w = max(shape[0] - self.crop_size[0], 0), max(shape[1] - self.crop_size[1], 0)
        y, x = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        return y, y + self.crop_size[0], x, x + self.crop_size[1]

    def __call__(self, img, label, rng):
        y1, y2, x1, x2 = self._bbox(img.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                classes, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
                counts = counts[classes != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y1, y2, x1, x2 = self._bbox(img.shape, rng)
        return img[y1:y2, x1:x2], label[y1:y2, x1:x2]


class RandomFlip:
    def __init__(self, prob=0.5, direction="horizontal"):
        if direction != "horizontal":
            raise NotImplementedError(f"RandomFlip(direction={direction!r}) is not supported (only horizontal)")
        self.prob = prob

    def __call__(self, img, label, rng):
        if self.prob and rng.random() < self.prob:
            return img[:, ::-1], label[:, ::-1]
        return img, label


class PhotoMetricDistortion:
    """mmseg's: random brightness (+-delta), contrast (mode 1: before, mode 0: after saturation and hue),
    saturation, hue (cv2 HSV units); each applied with probability 1/2, values clipped to uint8 after each."""

    def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18):
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def __call__(self, img, label, rng):
        if rng.integers(2):
            img = self._convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        mode = rng.integers(2)
        if mode == 1 and rng.integers(2):
            img = self._convert(img, alpha=rng.uniform(*self.contrast_range))
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = self._convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-self.hue_delta, self.hue_delta)) % 180
            img = hsv_to_rgb(hsv)
        if mode == 0 and rng.integers(2):
            img = self._convert(img, alpha=rng.uniform(*self.contrast_range))
        return img, label


class Normalize:
    """(img - mean) / std in float32, as a (3, H, W) tensor. Images here are RGB already; ``to_rgb=False``
    (a model trained on BGR input) swaps the channels to BGR first."""

    def __init__(self, mean, std, to_rgb=True):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.to_rgb = to_rgb

    def __call__(self, img, label=None, rng=None):
        if not self.to_rgb:
            img = img[..., ::-1]
        out = (img.astype(np.float32) - self.mean) / self.std
        out = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        return out if label is None else (out, label)


class Pad:
    """Pad at the bottom/right to ``size``: image with pad_val, label with seg_pad_val."""

    def __init__(self, size, pad_val=0, seg_pad_val=255):
        self.size, self.pad_val, self.seg_pad_val = tuple(size), pad_val, seg_pad_val

    def __call__(self, img: torch.Tensor, label: np.ndarray, rng=None):
        pad_h, pad_w = max(self.size[0] - img.shape[1], 0), max(self.size[1] - img.shape[2], 0)
        label = torch.from_numpy(np.ascontiguousarray(label)).long()
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h), value=float(self.pad_val))
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.seg_pad_val)
        return img, label


# -- whole pipelines from a config ----------------------------------------------------------------------------

_NO_OPS = {"LoadImageFromFile", "LoadAnnotations", "DefaultFormatBundle", "Collect", "ImageToTensor"}


def _kwargs(step: dict) -> dict:
    return {k: v for k, v in step.items() if k != "type"}


class TrainPipeline:
    """The config's ``data.train.pipeline`` list: ``(img uint8 RGB, label uint8) -> (image (3, S, S) float32,
    label (S, S) int64)``. Loading steps are done by the dataset; Normalize is applied before Pad as listed,
    so the image padding value is the normalised-space ``pad_val`` (0), as in the original."""

    _STEPS = {"Resize": RandomResize, "RandomCrop": RandomCrop, "RandomFlip": RandomFlip,
              "PhotoMetricDistortion": PhotoMetricDistortion, "Normalize": Normalize, "Pad": Pad}

    def __init__(self, pipeline: list[dict], ignore_index: int = 255):
        self.steps = []
        for step in pipeline:
            kind = step["type"]
            if kind in _NO_OPS:
                continue
            if kind not in self._STEPS:
                raise NotImplementedError(f"train pipeline step {kind!r} is not supported "
                                          f"(supported: {', '.join(sorted(self._STEPS))})")
            kwargs = _kwargs(step)
            if kind == "RandomCrop":
                kwargs.setdefault("ignore_index", ignore_index)
            if kind == "Pad" and "size" not in kwargs:
                raise NotImplementedError("Pad without a fixed size is not supported")
            self.steps.append(self._STEPS[kind](**kwargs))
        if not any(isinstance(s, Normalize) for s in self.steps):
            raise ValueError("train pipeline: no Normalize step")

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        for step in self.steps:
            img, label = step(img, label, rng)
        if not isinstance(label, torch.Tensor):
            label = torch.from_numpy(np.ascontiguousarray(label)).long()
        return img, label


class EvalPipeline:
    """The config's test pipeline (``MultiScaleFlipAug`` around Resize keep-ratio [min_size], Normalize):
    ``pipeline(img, ratio=1.0, flip=False)`` -> (3, h, w) float32 at the scale ``img_scale * ratio``."""

    def __init__(self, pipeline: list[dict]):
        aug = [s for s in pipeline if s["type"] == "MultiScaleFlipAug"]
        if len(aug) != 1:
            raise NotImplementedError("test pipeline: expected one MultiScaleFlipAug step")
        aug = aug[0]
        self.img_scale = tuple(aug["img_scale"])
        resize = [t for t in aug["transforms"] if t["type"] == "Resize"]
        norm = [t for t in aug["transforms"] if t["type"] == "Normalize"]
        if len(resize) != 1 or len(norm) != 1:
            raise NotImplementedError("test pipeline: expected one Resize and one Normalize inside MultiScaleFlipAug")
        if not resize[0].get("keep_ratio", True):
            raise NotImplementedError("test Resize(keep_ratio=False) is not supported")
        self.min_size = resize[0].get("min_size")
        self.normalize = Normalize(**_kwargs(norm[0]))

    def size(self, height: int, width: int, ratio: float = 1.0) -> tuple[int, int]:
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        return keep_ratio_size(height, width, scale, self.min_size)

    def __call__(self, img: np.ndarray, ratio: float = 1.0, flip: bool = False) -> torch.Tensor:
        img = resize_image(img, self.size(img.shape[0], img.shape[1], ratio))
        if flip:
            img = img[:, ::-1]
        return self.normalize(img)
