"""segvit.inference on every input kind against a hand-written preprocess + model.predict and segvit.eval; the
data attributes build_model attaches; segvit.classes."""
import copy
import json
import os
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import segvit
from conftest import DATA, tiny_config
from segvit import classes
from segvit.data import eval_pipeline
from segvit.eval import inference as eval_inference
from segvit.inference import inference


def tiny_whole_config():
    with open(os.path.join(DATA, "tiny_train_config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cfg():
    return tiny_whole_config()


def varied_model(cfg, seed=1):
    """A small random model whose labels vary over an image: the head's Linear weights drawn wider than the
    trunc-normal(0.02) init, which predicts one class everywhere."""
    torch.manual_seed(seed)
    model = segvit.build_model(cfg).eval()
    for module in model.head.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    return model


@pytest.fixture(scope="module")
def model(cfg):
    return varied_model(cfg)


def random_image(height=37, width=53, seed=0, channels=3):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def manual_probs(model, img, mode=None, to_rgb=True):
    """The test pipeline written out: mmcv keep-ratio rescale into (256, 64) (tiny config), bilinear half-pixel
    resize rounded to uint8, (x - 127.5) / 127.5, predict, bilinear back to the image, softmax."""
    h, w = img.shape[:2]
    factor = min(256 / max(h, w), 64 / min(h, w))
    size = (int(h * factor + 0.5), int(w * factor + 0.5))
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    if not to_rgb:
        t = t.flip(1)
    x = (t - 127.5) / 127.5
    scores = model.predict(x, mode)
    return F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]


def test_numpy_matches_manual_and_eval(model, cfg):
    img = random_image()
    labels, probs = inference(model, img, return_scores=True)
    assert labels.shape == (37, 53) and labels.dtype == torch.int64
    assert probs.shape == (4, 37, 53) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, manual_probs(model, img), atol=1e-5, rtol=1e-5)
    reference = eval_inference(model, img, eval_pipeline(cfg))
    torch.testing.assert_close(probs, reference, atol=0, rtol=0)
    assert torch.equal(labels, reference.argmax(0))
    assert len(labels.unique()) > 1  # one class everywhere would make the checks vacuous


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_modes(model, mode):
    img = random_image(71, 29, seed=3)
    labels, probs = inference(model, img, mode=mode, return_scores=True)
    torch.testing.assert_close(probs, manual_probs(model, img, mode), atol=1e-5, rtol=1e-5)
    assert labels.shape == (71, 29)


def test_every_input_kind_gives_the_same_labels(model, tmp_path):
    img = random_image(seed=5)
    expected = inference(model, img)
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    rgba = np.concatenate([img, random_image(seed=6, channels=1)], axis=2)
    kinds = {
        "str path": str(png), "pathlib path": pathlib.Path(png), "PIL": Image.fromarray(img),
        "PIL RGBA": Image.fromarray(rgba, "RGBA"), "numpy RGBA": rgba,
        "tensor CHW": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "tensor HWC": torch.from_numpy(img),
        "tensor CHW RGBA": torch.from_numpy(rgba).permute(2, 0, 1),
    }
    for kind, value in kinds.items():
        assert torch.equal(inference(model, value), expected), kind
    assert torch.equal(inference(model, img, device="cpu"), expected)


def test_grayscale_is_repeated(model):
    grey = random_image(seed=7, channels=None)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    expected = inference(model, rgb)
    for value in (grey, grey[:, :, None], torch.from_numpy(grey), torch.from_numpy(grey)[None],
                  Image.fromarray(grey, "L")):
        assert torch.equal(inference(model, value), expected)


def test_bgr_model(model):
    img = random_image(seed=8)
    bgr_model = copy.copy(model)  # shares the weights; own attributes
    bgr_model.data_config = dict(model.data_config, to_rgb=False)
    _, probs = inference(bgr_model, img, return_scores=True)
    torch.testing.assert_close(probs, manual_probs(model, img, to_rgb=False), atol=1e-5, rtol=1e-5)


def test_no_resize_config(model):
    img = random_image(40, 48, seed=9)
    plain = copy.copy(model)
    plain.data_config = {"mean": [127.5] * 3, "std": [127.5] * 3, "to_rgb": True, "img_scale": None}
    _, probs = inference(plain, img, return_scores=True)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() - 127.5) / 127.5
    torch.testing.assert_close(probs, model.predict(x).softmax(1)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_lists_keep_each_size(model, batch_size):
    # Two images share a resized size (the same shape), so batch_size > 1 stacks them in one predict call.
    images = [random_image(37, 53, seed=10), random_image(64, 64, seed=11), random_image(37, 53, seed=12),
              random_image(90, 31, seed=13)]
    out = inference(model, images, batch_size=batch_size, return_scores=True)
    assert isinstance(out, list) and len(out) == 4
    for img, (labels, probs) in zip(images, out):
        single_labels, single_probs = inference(model, img, return_scores=True)
        assert labels.shape == img.shape[:2] and probs.shape == (4, *img.shape[:2])
        torch.testing.assert_close(probs, single_probs, atol=1e-5, rtol=1e-5)
        top2 = single_probs.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-4  # batched matmuls may round differently at near-ties
        assert torch.equal(labels[clear], single_labels[clear])
    labels_only = inference(model, tuple(images[:2]))
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in labels_only)


def test_amp_bf16(model):
    img = random_image(seed=14)
    labels, probs = inference(model, img, amp="bf16", return_scores=True)
    assert labels.shape == (37, 53) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(37, 53))


def test_errors(model, cfg, tmp_path):
    img = random_image()
    with pytest.raises(TypeError, match="uint8.*model.predict takes normalized float"):
        inference(model, img.astype(np.float32) / 255)
    with pytest.raises(TypeError, match="uint8.*model.predict takes normalized float"):
        inference(model, torch.rand(3, 20, 20))
    with pytest.raises(TypeError, match=r"inputs\[1\]: expected a uint8 image, got int16"):
        inference(model, [img, img.astype(np.int16)])
    with pytest.raises(ValueError, match=r"got shape \(2, 37, 53, 3\) \(a batch: pass a list"):
        inference(model, np.stack([img, img]))
    with pytest.raises(ValueError, match=r"got shape \(37, 53, 2\)"):
        inference(model, img[:, :, :2])
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        inference(model, [img, missing])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(Exception, match="broken.png"):
        inference(model, str(broken))
    with pytest.raises(TypeError, match="expected a file path, a PIL image"):
        inference(model, 3)
    with pytest.raises(ValueError, match="amp"):
        inference(model, img, amp="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        inference(model, img, batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        inference(model, img, mode="tiles")
    bare = segvit.build_model(cfg["model"])
    with pytest.raises(ValueError, match="no data_config.*published name or a whole config"):
        inference(bare, img)


# -- build_model's data attributes ----------------------------------------------------------------------------

def test_whole_config_attributes(model):
    assert model.data_config == {"mean": [127.5] * 3, "std": [127.5] * 3, "to_rgb": True, "img_scale": [256, 64],
                                 "keep_ratio": True}
    assert model.dataset == "ade20k"
    assert model.class_names is None  # 4 classes: not ADE20K's 150
    assert model.palette.shape == (4, 3) and model.palette.dtype == np.uint8


def test_bare_model_dict_has_none(cfg):
    bare = segvit.build_model(cfg["model"])
    assert (bare.data_config, bare.dataset, bare.class_names, bare.palette) == (None, None, None, None)


@pytest.mark.parametrize("name", segvit.list_models())
def test_published_configs(name):
    """The published data parts on a small model with the published class count."""
    whole = segvit.published_config(name)
    num_classes = whole["model"]["decode_head"]["num_classes"]
    whole["model"] = tiny_config(num_classes=num_classes)
    m = segvit.build_model(whole)
    aug = whole["data"]["test"]["pipeline"][1]
    resize = aug["transforms"][0]
    expected = {"mean": whole["img_norm_cfg"]["mean"], "std": whole["img_norm_cfg"]["std"], "to_rgb": True,
                "img_scale": aug["img_scale"], "keep_ratio": True}
    if "min_size" in resize:
        expected["min_size"] = resize["min_size"]
    assert m.data_config == expected
    assert m.dataset == {150: "ade20k", 171: "cocostuff10k", 60: "pascal_context"}[num_classes]
    assert m.class_names == classes.class_names(m.dataset)
    np.testing.assert_array_equal(m.palette, classes.palette(m.dataset))


def test_published_name_path():
    """build_model(name) reads the same config (checked on a small model: ViT-L takes long to initialise)."""
    from segvit.models.factory import _attach_data_attributes

    m = segvit.build_model(tiny_config(num_classes=150))
    _attach_data_attributes(m, "segvit_vit-b16_ade20k_512")
    assert m.data_config["mean"] == [123.675, 116.28, 103.53] and m.data_config["img_scale"] == [2048, 512]
    assert m.class_names[:3] == ("wall", "building", "sky") and m.dataset == "ade20k"


# -- segvit.classes ---------------------------------------------------------------------------------------------

def test_class_lists():
    ade, coco, pc = (classes.class_names(k) for k in ("ade20k", "cocostuff10k", "pascal_context"))
    assert (len(ade), len(coco), len(pc)) == (150, 171, 60)
    assert all(len(set(names)) == len(names) for names in (ade, coco, pc))
    assert ade[:5] == ("wall", "building", "sky", "floor", "tree") and ade[7] == "bed"
    assert (ade[12], ade[20], ade[89], ade[127], ade[149]) == ("person", "car", "television receiver", "bicycle",
                                                               "flag")
    assert coco[:2] == ("person", "bicycle") and coco[79] == "toothbrush" and coco[80] == "banner"
    assert (coco[62], coco[157], coco[170]) == ("tv", "tree", "wood")
    assert list(coco[80:]) == sorted(coco[80:])  # COCO's stuff ids are alphabetical
    assert pc[:4] == ("background", "aeroplane", "bag", "bed") and pc[15] == "cat" and pc[59] == "wood"
    assert list(pc[1:]) == sorted(pc[1:])
    assert all(name == name.strip() for names in (ade, coco, pc) for name in names)


@pytest.mark.parametrize("dataset", sorted(classes.DATASETS))
def test_palettes_distinct(dataset):
    pal = classes.palette(dataset)
    assert pal.shape == (len(classes.class_names(dataset)), 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal.tolist()}) == len(pal)
    assert not (pal == 0).all(axis=1).any()  # black is left for ignored pixels
    np.testing.assert_array_equal(pal, classes.palette(dataset))  # deterministic
    np.testing.assert_array_equal(classes.colormap(3), [[128, 0, 0], [0, 128, 0], [128, 128, 0]])


def test_dataset_of_and_background():
    assert classes.dataset_of(segvit.published_config("segvit_vit-l16_cocostuff10k_512")) == "cocostuff10k"
    assert classes.dataset_of(segvit.published_config("segvit_vit-l16_pc60_480")) == "pascal_context"
    assert classes.dataset_of({"data": {"test": {"type": "CityscapesDataset"}}}) is None
    assert classes.dataset_of({"model": {}}) is None
    assert classes.background_index("pascal_context") == 0 and classes.background_index("ade20k") is None
    with pytest.raises(ValueError, match="'ade20k', 'cocostuff10k', 'pascal_context'"):
        classes.class_names("cityscapes")
    with pytest.raises(ValueError, match="ade20k"):
        classes.palette("voc")
    with pytest.raises(ValueError, match="num_classes"):
        classes.colormap(-1)


def test_an_exif_rotated_photo_is_segmented_upright(tmp_path):
    """A phone photo stored landscape with EXIF orientation 6 (shown rotated 90 degrees clockwise): read upright, as
    a viewer and OpenCV's imread show it; the label map has the upright shape."""
    from PIL import Image

    from segvit.inference import load_image

    rng = np.random.default_rng(4)
    stored = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "photo.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = np.rot90(stored, k=-1)  # 90 degrees clockwise
    np.testing.assert_array_equal(load_image(str(path)), upright)
    with Image.open(path) as im:
        np.testing.assert_array_equal(load_image(im), upright)
    np.testing.assert_array_equal(load_image(stored), stored)  # arrays are taken as they are
