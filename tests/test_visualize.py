"""segvit.visualize: colours, overlays, the legend, and the PNGs read back."""
import numpy as np
import pytest
import torch
from PIL import Image

from segvit import classes
from segvit.visualize import (LEGEND_MARGIN, LEGEND_ROW, LEGEND_SWATCH, colorize, legend, overlay, present_classes,
                              save_label_png, save_overlay)

PALETTE = classes.palette("ade20k")
NAMES = classes.class_names("ade20k")


def random_labels(height=37, width=53, num_classes=6, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, (height, width))
    if ignore:
        labels[rng.random((height, width)) < 0.1] = 255
    return labels


def random_image(height=37, width=53, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def swatch_color(image, row):
    """The colour at the centre of legend row ``row``'s swatch."""
    y = row * LEGEND_ROW + LEGEND_ROW // 2
    return tuple(image[y, LEGEND_MARGIN + LEGEND_SWATCH // 2].tolist())


def test_colorize():
    labels = random_labels()
    labels[0, 0], labels[0, 1] = 400, -3  # out of the palette
    out = colorize(torch.from_numpy(labels), PALETTE)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    valid = (labels >= 0) & (labels < len(PALETTE))
    np.testing.assert_array_equal(out[valid], PALETTE[labels[valid]])
    assert (out[~valid] == 0).all() and (~valid).sum() > 2


def test_overlay_blend():
    img, labels = random_image(), random_labels()
    valid = labels != 255
    for opacity in (0.0, 0.3, 1.0):
        out = overlay(img, labels, PALETTE, opacity=opacity)
        expected = np.round((1 - opacity) * img.astype(np.float64) + opacity * PALETTE[np.where(valid, labels, 0)])
        assert np.abs(out[valid].astype(np.int64) - expected[valid]).max() <= 1  # float32 rounding at .5
        np.testing.assert_array_equal(out[~valid], img[~valid])  # ignored pixels: the image
    np.testing.assert_array_equal(overlay(img, labels, PALETTE, 1.0)[valid], PALETTE[labels[valid]])
    np.testing.assert_array_equal(overlay(Image.fromarray(img), labels, PALETTE), overlay(img, labels, PALETTE))


def test_overlay_errors():
    img, labels = random_image(), random_labels()
    with pytest.raises(ValueError, match="same size"):
        overlay(img, labels[:-1], PALETTE)
    with pytest.raises(ValueError, match="opacity"):
        overlay(img, labels, PALETTE, opacity=1.5)
    with pytest.raises(ValueError, match=r"palette: expected an \(N, 3\)"):
        overlay(img, labels, PALETTE[:, :2])
    with pytest.raises(TypeError, match="integer class indices"):
        overlay(img, labels.astype(np.float32), PALETTE)
    with pytest.raises(ValueError, match=r"label_map: expected a \(H, W\)"):
        colorize(labels[None], PALETTE)


def test_present_classes_and_legend():
    labels = np.full((30, 40), 255)
    labels[:, :20] = 3           # 600 pixels
    labels[:10, 20:] = 17        # 200
    labels[10:, 20:25] = 5       # 100
    labels[29, 39] = 500         # out of the palette: not a class
    assert present_classes(labels, len(PALETTE)) == [(3, 600), (17, 200), (5, 100)]
    img = legend(labels, NAMES, PALETTE)
    assert img.dtype == np.uint8 and img.shape[0] == 3 * LEGEND_ROW and img.shape[2] == 3
    assert [swatch_color(img, r) for r in range(3)] == [tuple(PALETTE[c].tolist()) for c in (3, 17, 5)]
    # Text is drawn right of the swatch, and longer names make a wider legend.
    text = img[:, 2 * LEGEND_MARGIN + LEGEND_SWATCH:]
    assert (text.min(axis=2) < 128).any()
    assert legend(labels, [n * 3 for n in NAMES], PALETTE).shape[1] > img.shape[1]
    short = legend(labels, NAMES, PALETTE, max_entries=2)
    assert short.shape[0] == 3 * LEGEND_ROW  # two classes and "+ 1 more"
    assert [swatch_color(short, r) for r in range(2)] == [tuple(PALETTE[c].tolist()) for c in (3, 17)]
    assert swatch_color(short, 2) == (255, 255, 255)
    empty = legend(np.full((4, 4), 255), NAMES, PALETTE)
    assert empty.shape[0] == LEGEND_ROW
    with pytest.raises(ValueError, match="max_entries"):
        legend(labels, NAMES, PALETTE, max_entries=0)


@pytest.mark.parametrize("dataset", sorted(classes.DATASETS))
def test_label_png_reads_back(tmp_path, dataset):
    pal = classes.palette(dataset)
    labels = random_labels(num_classes=len(pal), seed=2)
    path = tmp_path / "labels.png"
    save_label_png(path, torch.from_numpy(labels), pal)
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == (53, 37)
        np.testing.assert_array_equal(np.array(im), labels)  # 255 stays 255
        stored = np.array(im.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(stored[:len(pal)], pal)
    assert (stored[len(pal):] == 0).all()


def test_label_png_errors(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(tmp_path / "x.png", np.full((3, 3), 256), PALETTE)
    with pytest.raises(ValueError, match="at most 256"):
        save_label_png(tmp_path / "x.png", np.zeros((3, 3), np.int64), classes.colormap(300))


def test_overlay_png_reads_back(tmp_path):
    img, labels = random_image(), random_labels(seed=3)
    path = tmp_path / "overlay.png"
    save_overlay(path, img, labels, PALETTE, class_names=NAMES, opacity=0.4)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        out = np.array(im)
    side = legend(labels, NAMES, PALETTE)
    assert out.shape == (max(37, side.shape[0]), 53 + side.shape[1], 3)
    np.testing.assert_array_equal(out[:37, :53], overlay(img, labels, PALETTE, 0.4))
    np.testing.assert_array_equal(out[:side.shape[0], 53:], side)
    present = [c for c, _ in present_classes(labels, len(PALETTE))]
    assert [swatch_color(out[:, 53:], r) for r in range(len(present))] == [tuple(PALETTE[c].tolist())
                                                                          for c in present]
    plain = tmp_path / "plain.png"
    save_overlay(plain, img, labels, PALETTE)
    with Image.open(plain) as im:
        np.testing.assert_array_equal(np.array(im), overlay(img, labels, PALETTE))
