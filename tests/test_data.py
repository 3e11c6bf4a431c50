import colorsys
import os

import numpy as np
import pytest
import torch
from PIL import Image

import segvit
from segvit.data import build_dataset, eval_pipeline, read_label, write_synthetic_ade20k
from segvit.data.transforms import (Pad, PhotoMetricDistortion, RandomCrop, RandomFlip, TrainPipeline, hsv_to_rgb,
                                    keep_ratio_size, rescale_size, rgb_to_hsv)


def _smooth_image(rng, h, w):
    # Smooth content survives JPEG nearly unchanged, so the round trip can be checked tightly.
    base = rng.integers(40, 215, size=3)
    yy, xx = np.mgrid[:h, :w]
    return np.clip(base + 0.3 * yy[..., None] - 0.2 * xx[..., None], 0, 255).astype(np.uint8)


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, quality=100) if path.endswith(".jpg") else Image.fromarray(array).save(path)


LAYOUTS = {
    # config name, image path, label path, stored label values -> expected read values
    "segvit_vit-l16_ade20k_640": ("images/validation/a{i}.jpg", "annotations/validation/a{i}.png", "test"),
    "segvit_vit-l16_cocostuff10k_512": ("images/test2014/c{i}.jpg", "annotations/test2014/c{i}_labelTrainIds.png",
                                        "test"),
    "segvit_vit-l16_pc60_480": ("JPEGImages/p{i}.jpg", "SegmentationClassContext/p{i}.png", "test"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_round_trip(tmp_path, name):
    img_t, ann_t, split = LAYOUTS[name]
    cfg = segvit.published_config(name)
    rng = np.random.default_rng(0)
    written = []
    for i in range(3):
        h, w = 17 + i, 23 - i
        img = _smooth_image(rng, h, w)
        label = rng.integers(0, 60, size=(h, w)).astype(np.uint8)
        label[0, :3] = [0, 255, 1]
        _write(str(tmp_path / img_t.format(i=i)), img)
        _write(str(tmp_path / ann_t.format(i=i)), label)
        written.append((img, label))
    if "pc60" in name:
        split_file = tmp_path / "ImageSets/SegmentationContext/val.txt"
        split_file.parent.mkdir(parents=True)
        split_file.write_text("p2\np0\n")  # the split file decides which images and in what order
        written = [written[2], written[0]]
    ds = build_dataset(cfg, split, str(tmp_path))
    assert len(ds) == len(written)
    assert ds.num_classes == {"ade": 150, "coc": 171, "pc6": 60}[name.split("_")[2][:3]]
    for (img, label), (got_img, got_label, _) in zip(written, (ds[i] for i in range(len(ds)))):
        assert got_img.dtype == np.uint8 and got_img.shape == img.shape
        assert np.abs(got_img.astype(int) - img).mean() < 2.0
        if "pc60" in name:  # background 0 is a class, nothing reduced
            expected = label
        else:  # reduce_zero_label: 0 -> 255, v -> v - 1, 255 stays 255
            expected = np.where(label == 0, 255, np.where(label == 255, 255, label.astype(int) - 1))
        np.testing.assert_array_equal(got_label, expected)
        assert list(got_label[0, :3]) == ([0, 255, 1] if "pc60" in name else [255, 255, 0])


def test_synthetic_writer_and_reader(tmp_path):
    root = write_synthetic_ade20k(str(tmp_path / "ADEChallengeData2016"), num_train=3, num_val=2, num_classes=4,
                                  size=(32, 40), seed=3, every_class=True)
    raw = read_label(os.path.join(root, "annotations/training/synthetic_training_00000.png"))
    assert set(np.unique(raw)) == {1, 2, 3, 4}
    cfg = segvit.published_config("segvit_vit-b16_ade20k_512")
    ds = build_dataset(cfg, "val", root)
    assert len(ds) == 2
    img, label, _ = ds[0]
    assert img.shape == (32, 40, 3) and set(np.unique(label)) == {0, 1, 2, 3}


def test_rescale_rules_by_hand():
    assert rescale_size(100, 200, (2048, 512)) == (512, 1024)  # short side bound: factor 5.12
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound: factor 2.048, 204.8 -> 205
    # mmseg 0.24 min_size: PC (520, 520) with min_size 480 keeps the short side at 520.
    assert keep_ratio_size(300, 400, (520, 520), 480) == (520, 693)
    # COCO aug-test at ratio 0.5: scale (1024, 256) is raised to a short side of 512 by min_size.
    assert keep_ratio_size(400, 300, (1024, 256), 512) == (683, 512)


def test_eval_pipeline_sizes_from_configs():
    img = np.full((300, 400, 3), 127, np.uint8)
    assert eval_pipeline(segvit.published_config("segvit_vit-l16_ade20k_640"))(img).shape == (3, 640, 853)
    assert eval_pipeline(segvit.published_config("segvit_vit-l16_pc60_480"))(img).shape == (3, 520, 693)
    out = eval_pipeline(segvit.published_config("segvit_vit-l16_ade20k_640"))(img, ratio=0.5, flip=True)
    assert out.shape == (3, 320, 427)
    assert torch.allclose(out, torch.full_like(out, (127 - 127.5) / 127.5))


def test_random_crop_cat_max_ratio():
    # Left half class 0, right half class 1, crop 4x4 out of 4x8: only the crop at x=2 has both classes below
    # the 0.75 ratio (x=1 and x=3 give exactly 0.75, x=0 and x=4 a single class).
    label = np.zeros((4, 8), np.uint8)
    label[:, 4:] = 1
    img = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)

    def balanced_rate(crop):
        hits = 0
        for seed in range(60):
            _, out = crop(img, label, np.random.default_rng(seed))
            hits += int((out == 0).sum() == (out == 1).sum())
        return hits / 60

    assert balanced_rate(RandomCrop((4, 4), cat_max_ratio=0.75)) > 0.8  # fails 11 draws with p < 0.1
    assert balanced_rate(RandomCrop((4, 4))) < 0.45  # uniform: 1 in 5
    small = RandomCrop((16, 16))(img, label, np.random.default_rng(0))  # smaller than the crop: kept whole
    assert small[1].shape == (4, 8)


def test_flip_pad_and_label_alignment():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    flipped = [RandomFlip(prob=1.0)(img, label, np.random.default_rng(0)), RandomFlip(prob=0.0)(img, label, None)]
    np.testing.assert_array_equal(flipped[0][1], label[:, ::-1])
    np.testing.assert_array_equal(flipped[0][0], img[:, ::-1])
    np.testing.assert_array_equal(flipped[1][1], label)
    padded_img, padded_label = Pad((4, 5), pad_val=0, seg_pad_val=255)(torch.ones(3, 2, 3), label)
    assert padded_img.shape == (3, 4, 5) and padded_label.shape == (4, 5)
    assert padded_img[:, 2:].eq(0).all() and padded_img[:, :, 3:].eq(0).all() and padded_img[:, :2, :3].eq(1).all()
    assert padded_label[2:].eq(255).all() and padded_label[:, 3:].eq(255).all()
    assert padded_label[:2, :3].tolist() == label.tolist()


def test_hsv_matches_colorsys():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    hsv = rgb_to_hsv(img)
    for y in range(5):
        for x in range(7):
            h, s, v = colorsys.rgb_to_hsv(*(img[y, x] / 255.0))
            # cv2's uint8 units: H in degrees / 2, S and V * 255
            assert abs(((int(hsv[y, x, 0]) - h * 180 + 90) % 180) - 90) <= 1
            assert abs(int(hsv[y, x, 1]) - s * 255) <= 1 and abs(int(hsv[y, x, 2]) - v * 255) <= 1
    assert np.abs(hsv_to_rgb(hsv).astype(int) - img).max() <= 5  # uint8 HSV quantisation


def test_photometric_distortion_changes_image_not_label():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(9, 11, 3)).astype(np.uint8)
    label = rng.integers(0, 4, size=(9, 11)).astype(np.uint8)
    changed = 0
    for seed in range(8):
        out, out_label = PhotoMetricDistortion()(img, label, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out_label, label)
        changed += int(not np.array_equal(out, img))
    assert changed >= 6  # each of the 4 steps is skipped with p 1/2: unchanged with p 1/16


def test_train_pipeline_from_config_is_deterministic_per_rng(tmp_path):
    cfg = segvit.published_config("segvit_vit-b16_ade20k_512")
    cfg["data"]["train"]["pipeline"] = [
        dict(s, img_scale=[256, 64]) if s["type"] == "Resize" else
        dict(s, crop_size=[48, 48]) if s["type"] == "RandomCrop" else
        dict(s, size=[48, 48]) if s["type"] == "Pad" else s for s in cfg["data"]["train"]["pipeline"]]
    root = write_synthetic_ade20k(str(tmp_path), num_train=2, num_val=1, size=(40, 50), seed=1)
    ds = build_dataset(cfg, "train", root)
    a, la, _ = ds[1]
    b, lb, _ = ds[1]
    assert a.shape == (3, 48, 48) and la.shape == (48, 48) and la.dtype == torch.int64
    assert torch.equal(a, b) and torch.equal(la, lb)
    ds.set_epoch(1)
    c, _, _ = ds[1]
    assert not torch.equal(a, c)
    assert set(la.unique().tolist()) <= {0, 1, 2, 3, 255}
    with pytest.raises(NotImplementedError, match="Bogus"):
        TrainPipeline([{"type": "Bogus"}])
