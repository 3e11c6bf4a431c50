"""A synthetic dataset in the ADE20K layout, for tests and demos: each image is a background class with a few
filled rectangles and ellipses of other classes, every class drawn in its own colour plus noise, so a small model
learns it in a few hundred steps. Written as JPEG images and PNG labels with ADE20K's encoding (0 = unlabelled,
class c stored as c + 1; ``ADE20KDataset`` reduces it back)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def class_colours(num_classes: int) -> np.ndarray:
    """Well separated RGB colours, one per class (fixed, independent of the seed)."""
    rng = np.random.default_rng(12345)
    colours = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
               (245, 130, 48), (240, 50, 230), (128, 128, 0), (0, 0, 128)]
    extra = rng.integers(0, 256, size=(max(num_classes - len(colours), 0), 3))
    return np.concatenate([np.array(colours[:num_classes], np.int64).reshape(-1, 3), extra]).astype(np.int64)


def synthetic_sample(rng: np.random.Generator, num_classes: int, size: tuple[int, int], every_class: bool = False,
                     unlabelled_border: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, label uint8 in ADE20K encoding). ``every_class``: each class 1.. gets one rectangle in
    its own cell of a grid, so every class is present in every image."""
    height, width = size
    label = np.zeros((height, width), np.int64)
    label[:] = int(rng.integers(num_classes))
    yy, xx = np.mgrid[:height, :width]
    if every_class:
        label[:] = 0
        others = list(range(1, num_classes))
        cols = int(np.ceil(np.sqrt(max(len(others), 1))))
        rows = int(np.ceil(len(others) / cols)) if others else 1
        for n, c in enumerate(others):
            r, q = divmod(n, cols)
            y0, x0 = r * height // rows, q * width // cols
            y1, x1 = (r + 1) * height // rows, (q + 1) * width // cols
            h, w = y1 - y0, x1 - x0
            label[y0 + h // 4:y1 - h // 4, x0 + w // 4:x1 - w // 4] = c
    else:
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(num_classes))
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.15, 0.4) * height, rng.uniform(0.15, 0.4) * width
            if rng.integers(2):
                inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            label[inside] = c
    colours = class_colours(num_classes)
    img = colours[label] + rng.normal(0, 12, size=(height, width, 3))
    stored = label + 1
    if unlabelled_border:
        b = unlabelled_border
        stored[:b], stored[-b:], stored[:, :b], stored[:, -b:] = 0, 0, 0, 0
    return np.clip(img, 0, 255).astype(np.uint8), stored.astype(np.uint8)


def write_synthetic_ade20k(root: str, num_train: int = 16, num_val: int = 4, num_classes: int = 4,
                           size: tuple[int, int] = (64, 80), seed: int = 0, every_class: bool = False,
                           unlabelled_border: int = 0) -> str:
    """Write ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``
    (ADE20K layout and label encoding) and return ``root``. JPEG quality 95; labels lossless PNG."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        img_dir, ann_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(count):
            img, label = synthetic_sample(rng, num_classes, size, every_class, unlabelled_border)
            name = f"synthetic_{split}_{i:05d}"
            Image.fromarray(img).save(os.path.join(img_dir, name + ".jpg"), quality=95)
            Image.fromarray(label, mode="L").save(os.path.join(ann_dir, name + ".png"))
    return root


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m segvit.data",
                                     description="Write a synthetic dataset in the ADE20K layout.",
                                     epilog="python -m segvit.data check ROOT: check a dataset instead (--help there)")
    parser.add_argument("root")
    parser.add_argument("--num-train", type=int, default=16)
    parser.add_argument("--num-val", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 80), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_synthetic_ade20k(args.root, args.num_train, args.num_val, args.num_classes, tuple(args.size),
                                 args.seed))
