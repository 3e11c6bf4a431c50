"""Pictures of label maps: colours, overlays on the image, a legend of the classes present, and PNG files.

Label maps are (H, W) integer arrays or tensors of class indices; a palette is (N, 3) uint8 (``segvit.classes``,
or ``model.palette``). Values outside [0, N), the ignore index 255 among them, have no colour: black in
``colorize``, the image unchanged in ``overlay``, left out of the legend. Pillow only (no matplotlib).
"""
from __future__ import annotations

import os

import numpy as np
import torch

# Legend layout (pixels): one row per class, a square colour swatch then the name.
LEGEND_ROW = 20
LEGEND_MARGIN = 4
LEGEND_SWATCH = 14
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def _labels(label_map, name: str = "label_map") -> np.ndarray:
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"{name}: expected a (H, W) label map, got shape {label_map.shape}")
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool):
        raise TypeError(f"{name}: expected integer class indices, got {label_map.dtype}")
    return label_map.astype(np.int64, copy=False)


def _palette(palette) -> np.ndarray:
    if isinstance(palette, torch.Tensor):
        palette = palette.cpu().numpy()
    arr = np.asarray(palette)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"palette: expected an (N, 3) array of RGB colours, N >= 1, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
        raise ValueError("palette: expected integer colours in 0..255 (uint8)")
    return arr.astype(np.uint8)


def colorize(label_map, palette) -> np.ndarray:
    """(H, W, 3) uint8: each pixel the palette colour of its class; values outside [0, N) (255: ignored) black."""
    labels, colors = _labels(label_map), _palette(palette)
    valid = (labels >= 0) & (labels < len(colors))
    out = colors[np.where(valid, labels, 0)]
    out[~valid] = 0
    return out


def overlay(image, label_map, palette, opacity: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: ``(1 - opacity) * image + opacity * colorize(label_map)``, rounded, where the pixel has a
    class; pixels without one (255, out of the palette) show the image unchanged. ``image``: a uint8 (H, W[, C])
    array or tensor, a PIL image or a file path, of the label map's size."""
    from segvit.inference import load_image

    if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity: expected a number in [0, 1], got {opacity!r}")
    img = load_image(image, "image")
    labels, colors = _labels(label_map), _palette(palette)
    if img.shape[:2] != labels.shape:
        raise ValueError(f"image and label_map: expected the same size, got image {img.shape[:2]} and label map "
                         f"{labels.shape}")
    valid = (labels >= 0) & (labels < len(colors))
    blend = (1.0 - opacity) * img.astype(np.float32) + opacity * colorize(labels, colors).astype(np.float32)
    out = img.copy()
    out[valid] = np.clip(np.round(blend[valid]), 0, 255).astype(np.uint8)
    return out


def present_classes(label_map, num_classes: int) -> list[tuple[int, int]]:
    """(class, pixel count) of the classes in [0, num_classes) present in ``label_map``, most frequent first (ties:
    lower class first)."""
    labels = _labels(label_map)
    valid = labels[(labels >= 0) & (labels < num_classes)]
    counts = np.bincount(valid.ravel(), minlength=num_classes)
    order = sorted(np.nonzero(counts)[0].tolist(), key=lambda c: (-counts[c], c))
    return [(c, int(counts[c])) for c in order]


def legend(label_map, class_names, palette, *, max_entries: int | None = None) -> np.ndarray:
    """(h, w, 3) uint8 image listing the classes present in ``label_map``, most frequent first: one
    ``LEGEND_ROW``-pixel row each, a ``LEGEND_SWATCH``-pixel colour square at (``LEGEND_MARGIN``, row top + 3) then
    "name (share %)", in Pillow's default font, black on white. ``max_entries`` rows at most (then a last row
    "+ N more"). Classes beyond ``class_names`` are named by their index."""
    from PIL import Image, ImageDraw, ImageFont

    colors = _palette(palette)
    if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, int)
                                    or max_entries < 1):
        raise ValueError(f"max_entries: expected None or a positive int, got {max_entries!r}")
    names = list(class_names) if class_names is not None else []
    present = present_classes(label_map, len(colors))
    total = sum(n for _, n in present)
    shown = present if max_entries is None else present[:max_entries]
    rows = [(c, f"{names[c] if c < len(names) else c} ({100.0 * n / total:.1f}%)") for c, n in shown]
    if len(shown) < len(present):
        rows.append((None, f"+ {len(present) - len(shown)} more"))
    if not rows:
        rows.append((None, "(no class)"))
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_x = 2 * LEGEND_MARGIN + LEGEND_SWATCH
    width = text_x + max(int(np.ceil(measure.textlength(text, font=font))) for _, text in rows) + LEGEND_MARGIN
    canvas = Image.new("RGB", (width, LEGEND_ROW * len(rows)), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (c, text) in enumerate(rows):
        top = r * LEGEND_ROW
        if c is not None:
            y0 = top + (LEGEND_ROW - LEGEND_SWATCH) // 2
            draw.rectangle([LEGEND_MARGIN, y0, LEGEND_MARGIN + LEGEND_SWATCH - 1, y0 + LEGEND_SWATCH - 1],
                           fill=tuple(int(v) for v in colors[c]))
        draw.text((text_x, top + LEGEND_ROW // 2), text, fill=_TEXT, font=font, anchor="lm")
    return np.array(canvas)


def save_label_png(path, label_map, palette) -> None:
    """A palette ("P" mode) PNG whose pixel values are the class indices (read back exactly, e.g. with
    ``np.array(PIL.Image.open(path))``; 255 stays 255) and whose palette is ``palette`` (entries N ... 255
    black), so viewers show the colours."""
    from PIL import Image

    labels, colors = _labels(label_map), _palette(palette)
    if len(colors) > 256:
        raise ValueError(f"palette: a palette PNG holds at most 256 colours, got {len(colors)}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label_map: a palette PNG stores values 0..255, got values in "
                         f"[{labels.min()}, {labels.max()}]")
    full = np.zeros((256, 3), np.uint8)
    full[:len(colors)] = colors
    # frombytes keeps every index as is (no quantisation), on every Pillow version.
    im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes())
    im.putpalette(full.ravel().tolist())
    im.save(os.fspath(path), format="PNG")


def compose(overlay_image: np.ndarray, legend_image: np.ndarray | None) -> np.ndarray:
    """The overlay with the legend on its right, on white (the taller sets the height)."""
    if legend_image is None:
        return overlay_image
    h = max(overlay_image.shape[0], legend_image.shape[0])
    w = overlay_image.shape[1] + legend_image.shape[1]
    out = np.full((h, w, 3), _BACKGROUND, np.uint8)
    out[:overlay_image.shape[0], :overlay_image.shape[1]] = overlay_image
    out[:legend_image.shape[0], overlay_image.shape[1]:] = legend_image
    return out


def save_overlay(path, image, label_map, palette, class_names=None, opacity: float = 0.5,
                 max_entries: int | None = None) -> None:
    """An RGB PNG of ``overlay(image, label_map, palette, opacity)``, with ``legend(...)`` beside it (right) when
    ``class_names`` are given."""
    from PIL import Image

    over = overlay(image, label_map, palette, opacity)
    side = legend(label_map, class_names, palette, max_entries=max_entries) if class_names is not None else None
    Image.fromarray(compose(over, side)).save(os.fspath(path), format="PNG")


__all__ = ["LEGEND_MARGIN", "LEGEND_ROW", "LEGEND_SWATCH", "colorize", "compose", "legend", "overlay",
           "present_classes", "save_label_png", "save_overlay"]
