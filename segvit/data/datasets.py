"""Readers for the dataset layouts mmsegmentation's data preparation produces.

| dataset | root (``--data``) | images / labels | classes | labels |
|---|---|---|---|---|
| ADE20K | ``ADEChallengeData2016`` | ``images/{training,validation}/*.jpg``, ``annotations/.../*.png`` | 150 | reduce_zero_label |
| COCO-Stuff-10K | ``coco_stuff10k`` | ``images/{train2014,test2014}/*.jpg``, ``annotations/.../*_labelTrainIds.png`` | 171 | as the config (reduce_zero_label True in SegViT's) |
| PASCAL-Context | ``VOC2010`` | ``JPEGImages/*.jpg``, ``SegmentationClassContext/*.png``, ``ImageSets/SegmentationContext/{train,val}.txt`` | 60 | background is class 0 |

reduce_zero_label (mmseg): 0 -> 255 (ignored), v -> v - 1 for 1 <= v <= 254, 255 stays 255.

Labels are read exactly (8-bit, palette indices, 16-bit and 32-bit PNGs alike, never wrapped to 8 bits) and every
loaded label is checked: after the dataset's own mapping each value must be < ``num_classes`` or the ignore index.
Any error while loading a sample is re-raised as a ``DataError`` naming the sample's image and label files, with
the original exception as its ``__cause__`` (``python -m segvit.data check ROOT`` scans a whole dataset).
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


class DataError(RuntimeError):
    """A file of a dataset, or a sample made of an image and a label file, is unusable; the message names the
    file(s). ``SegDataset.__getitem__`` raises one for any error while loading a sample, with ``paths`` (image,
    label) and the original exception as ``__cause__``; through DataLoader workers the main process gets a
    DataError whose message holds the worker's traceback (paths and cause included)."""

    sample: int | None = None  # the dataset index, once __getitem__ has named the sample

    def __init__(self, message: str, *paths: str):
        super().__init__(message)
        self.paths = paths

    def __reduce__(self):
        return type(self), (str(self), *self.paths)


# Label image modes read as class indices: 8-bit grey, palette (its indices, not its colours), 1-bit, 16-bit and
# 32-bit integer grey.
LABEL_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I;16N", "I")


def _open_error(path: str, e: Exception) -> DataError:
    kind = ("missing" if isinstance(e, FileNotFoundError) else "truncated" if "truncated" in str(e).lower() else
            "unreadable")
    return DataError(f"{path}: {kind} ({type(e).__name__}: {e})", path)


def read_image(path: str) -> np.ndarray:
    """H x W x 3 uint8, RGB. A missing, unreadable or truncated file raises a DataError naming it."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from e


def read_label(path: str) -> np.ndarray:
    """H x W class indices exactly as stored: uint8 for 8-bit, palette and 1-bit images (palette PNGs give their
    indices, not colours), uint16 for 16-bit and int32 for 32-bit ones (never wrapped to 8 bits: the dataset
    checks the values against its classes). Other modes (RGB, grey with alpha, float) and missing, unreadable
    or truncated files raise a DataError naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                raise DataError(f"{path}: expected a single-channel or palette label image (mode L, P, I;16 or I), "
                                f"got mode {im.mode}", path)
            label = np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from e
    if label.dtype == bool:
        label = label.astype(np.uint8)
    elif label.dtype.byteorder == ">":
        label = label.astype(label.dtype.newbyteorder("="))
    return label


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255, 255 stays 255, v -> v - 1 otherwise; in the label's own integer type (never wrapped)."""
    out = label.astype(np.int64) - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out.astype(label.dtype)


def describe_values(values: np.ndarray, limit: int = 10) -> str:
    values = [int(v) for v in values]
    shown = ", ".join(map(str, values[:limit]))
    return f"[{shown}{f', ... ({len(values)} values)' if len(values) > limit else ''}]"


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
    ignore_index = 255

    def __init__(self, root: str, img_dir: str, ann_dir: str, split: str | None = None,
                 reduce_zero_label: bool | None = None, pipeline: TrainPipeline | None = None, seed: int = 0,
                 num_classes: int | None = None, ignore_index: int | None = None):
        self.root, self.split = root, split
        if ignore_index is not None:
            self.ignore_index = ignore_index
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

    def map_label(self, label: np.ndarray) -> np.ndarray:
        """Stored values -> class indices (reduce_zero_label where the dataset has it)."""
        return reduce_zero_label(label) if self.reduce_zero_label else label

    def label_problem(self, label: np.ndarray, stored: np.ndarray | None = None) -> str | None:
        """Why a mapped label is unusable (values that are neither < num_classes nor the ignore index; with
        num_classes unknown, values outside 0 ... 255), or None."""
        if label.dtype in (np.uint8, np.uint16):  # a histogram: several times faster than np.unique
            values = np.flatnonzero(np.bincount(label.ravel()))
        else:
            values = np.unique(label)
        if self.num_classes is not None:
            bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
            expected = f"< {self.num_classes} (classes) or {self.ignore_index} (ignored)"
        else:
            bad = values[(values < 0) | (values > 255)]
            expected = "in 0 ... 255"
        if not len(bad):
            return None
        pixels = int(np.isin(label, bad).sum())
        message = f"label values {describe_values(bad)} out of range ({pixels} pixels; expected {expected}"
        if stored is not None and self.reduce_zero_label:
            stored_bad = np.unique(stored[np.isin(label, bad)])
            message += f"; stored as {describe_values(stored_bad)}, before reduce_zero_label"
        return message + ")"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H x W x 3 uint8 RGB image, H x W label: class indices or the ignore index, uint8 when they fit).
        Raises a DataError naming the file for a label of another size than its image or with values out of
        range."""
        img_path, seg_path = self.paths(index)
        img, stored = read_image(img_path), read_label(seg_path)
        if img.shape[:2] != stored.shape:
            raise DataError(f"{seg_path}: label size {stored.shape[1]}x{stored.shape[0]} differs from the image's "
                            f"{img.shape[1]}x{img.shape[0]} ({img_path}) (width x height)", seg_path, img_path)
        label = self.map_label(stored)
        problem = self.label_problem(label, stored)
        if problem:
            raise DataError(f"{seg_path}: {problem}", seg_path)
        if label.dtype != np.uint8 and (not label.size or (label.min() >= 0 and label.max() <= 255)):
            label = label.astype(np.uint8)
        return img, label

    def __getitem__(self, index):
        # (epoch, index) pairs come from the training sampler, so workers need no shared epoch state.
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        try:
            img, label = self.load(index)
            if self.pipeline is None:
                return img, label, index
            rng = np.random.default_rng([self.seed, epoch, index])
            img, label = self.pipeline(img, label, rng)
            return img, label, index
        except MemoryError:
            raise
        except Exception as e:
            if getattr(e, "sample", None) is not None:  # already names its sample (a dataset wrapping another)
                raise
            try:
                img_path, seg_path = self.paths(index)
            except Exception:
                raise e  # no such sample (IndexError ends iteration over the dataset)
            what = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            error = DataError(f"{type(self).__name__}[{index}] (image {img_path}, label {seg_path}): {what}",
                              img_path, seg_path)
            error.sample = index
            raise error from e


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
    ignore_index = data.get("ignore_index", 255)
    if "model" in config:
        if num_classes is None:
            num_classes = config["model"]["decode_head"]["num_classes"]
        ignore_index = config["model"]["decode_head"].get("ignore_index", ignore_index)  # the loss's
    return DATASETS[kind](root if root is not None else data["data_root"], data["img_dir"], data["ann_dir"],
                          split=data.get("split"), reduce_zero_label=reduce, pipeline=pipeline, seed=seed,
                          num_classes=num_classes, ignore_index=ignore_index)


def eval_pipeline(config: dict, split: str = "test") -> EvalPipeline:
    return EvalPipeline(config["data"][split]["pipeline"])
