"""Readers for the dataset layouts mmsegmentation's data preparation produces.

| dataset | root (``--data``) | images / labels | classes | labels |
|---|---|---|---|---|
| ADE20K | ``ADEChallengeData2016`` | ``images/{training,validation}/*.jpg``, ``annotations/.../*.png`` | 150 | reduce_zero_label |
| COCO-Stuff-10K | ``coco_stuff10k`` | ``images/{train2014,test2014}/*.jpg``, ``annotations/.../*_labelTrainIds.png`` | 171 | as the config (reduce_zero_label True in SegViT's) |
| PASCAL-Context | ``VOC2010`` | ``JPEGImages/*.jpg``, ``SegmentationClassContext/*.png``, ``ImageSets/SegmentationContext/{train,val}.txt`` | 60 | background is class 0 |

reduce_zero_label (mmseg): 0 -> 255 (ignored), v -> v - 1 for 1 <= v <= 254, 255 stays 255.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from segvit.data.transforms import EvalPipeline, TrainPipeline

ADE20K_CLASSES = 150
COCO_STUFF_CLASSES = 171
PASCAL_CONTEXT_CLASSES = 60


def read_image(path: str) -> np.ndarray:
    """H x W x 3 uint8, RGB."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def read_label(path: str) -> np.ndarray:
    """H x W uint8 class indices as stored (palette PNGs give their indices, not colours)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: expected a single-channel or palette label PNG, got mode {im.mode}")
        return np.array(im).astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.int64) - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out.astype(np.uint8)


class SegDataset(torch.utils.data.Dataset):
    """Pairs ``img_dir/NAME + img_suffix`` with ``ann_dir/NAME + seg_suffix`` (from ``split`` if given, else
    every image found under img_dir, sorted). ``dataset[i]`` is ``(image, label, index)``: with a
    ``TrainPipeline``, the augmented (3, S, S) float tensor and (S, S) int64 label, drawing its randomness from
    ``numpy.random.default_rng([seed, epoch, i])`` (``dataset[(epoch, i)]``, or ``set_epoch``); without one, the raw
    uint8 RGB image and the (reduced) uint8 label."""

    img_suffix = ".jpg"
    seg_suffix = ".png"
    num_classes: int | None = None
    reduce_zero_label = False

    def __init__(self, root: str, img_dir: str, ann_dir: str, split: str | None = None,
                 reduce_zero_label: bool | None = None, pipeline: TrainPipeline | None = None, seed: int = 0,
                 num_classes: int | None = None):
        self.root = root
        self.img_dir, self.ann_dir = os.path.join(root, img_dir), os.path.join(root, ann_dir)
        if reduce_zero_label is not None:
            self.reduce_zero_label = reduce_zero_label
        if num_classes is not None:
            self.num_classes = num_classes
        self.pipeline, self.seed, self.epoch = pipeline, seed, 0
        if not os.path.isdir(self.img_dir):
            raise FileNotFoundError(f"{type(self).__name__}: image folder {self.img_dir!r} does not exist "
                                    f"(is --data the dataset root, e.g. .../ADEChallengeData2016?)")
        if split is not None:
            with open(os.path.join(root, split)) as f:
                names = [line.strip() for line in f if line.strip()]
        else:
            names = sorted(os.path.relpath(os.path.join(d, f), self.img_dir)[:-len(self.img_suffix)]
                           for d, _, files in os.walk(self.img_dir) for f in files if f.endswith(self.img_suffix))
        if not names:
            raise FileNotFoundError(f"{type(self).__name__}: no '*{self.img_suffix}' images in {self.img_dir!r}")
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def paths(self, index: int) -> tuple[str, str]:
        name = self.names[index]
        return (os.path.join(self.img_dir, name + self.img_suffix),
                os.path.join(self.ann_dir, name + self.seg_suffix))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, seg_path = self.paths(index)
        img, label = read_image(img_path), read_label(seg_path)
        if img.shape[:2] != label.shape:
            raise ValueError(f"{img_path}: image {img.shape[:2]} and label {label.shape} sizes differ")
        return img, reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, index):
        # (epoch, index) pairs come from the training sampler, so workers need no shared epoch state.
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        img, label = self.load(index)
        if self.pipeline is None:
            return img, label, index
        rng = np.random.default_rng([self.seed, epoch, index])
        img, label = self.pipeline(img, label, rng)
        return img, label, index


class ADE20KDataset(SegDataset):
    num_classes = ADE20K_CLASSES
    reduce_zero_label = True


class COCOStuffDataset(SegDataset):
    seg_suffix = "_labelTrainIds.png"
    num_classes = COCO_STUFF_CLASSES


class PascalContextDataset(SegDataset):
    num_classes = PASCAL_CONTEXT_CLASSES


DATASETS = {cls.__name__: cls for cls in (ADE20KDataset, COCOStuffDataset, PascalContextDataset)}


def build_dataset(config: dict, split: str, root: str | None = None, *, train_pipeline: bool | None = None,
                  seed: int = 0, num_classes: int | None = None) -> SegDataset:
    """The dataset of a whole original config's ``data[split]`` (split: train, val or test) with ``root``
    replacing its ``data_root``. ``train_pipeline`` (default: split == "train") attaches the config's
    training pipeline; otherwise items are raw (use ``eval_pipeline(config)``). ``num_classes`` defaults to
    the model's decode head's."""
    data = config["data"][split]
    kind = data["type"]
    if kind not in DATASETS:
        raise NotImplementedError(f"data.{split}.type {kind!r} is not supported (supported: {', '.join(DATASETS)})")
    reduce = data.get("reduce_zero_label")
    for step in data.get("pipeline", []):
        if step["type"] == "LoadAnnotations" and "reduce_zero_label" in step:
            reduce = step["reduce_zero_label"]
    if train_pipeline is None:
        train_pipeline = split == "train"
    pipeline = TrainPipeline(data["pipeline"], ignore_index=data.get("ignore_index", 255)) if train_pipeline else None
    if num_classes is None and "model" in config:
        num_classes = config["model"]["decode_head"]["num_classes"]
    return DATASETS[kind](root if root is not None else data["data_root"], data["img_dir"], data["ann_dir"],
                          split=data.get("split"), reduce_zero_label=reduce, pipeline=pipeline, seed=seed,
                          num_classes=num_classes)


def eval_pipeline(config: dict, split: str = "test") -> EvalPipeline:
    return EvalPipeline(config["data"][split]["pipeline"])
