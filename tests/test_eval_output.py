"""segvit.eval as a reader uses it (issue 13): class names in the table and in --out (one unit: percent),
PASCAL-Context's published 59-class means, --show-dir pictures, a clear error for an original .py config."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import segvit
from segvit import eval as seg_eval
from segvit.data import write_synthetic_ade20k

from conftest import DATA

TINY = os.path.join(DATA, "tiny_train_config.json")


def _results(iou, acc):
    iou, acc = torch.tensor(iou, dtype=torch.float64), torch.tensor(acc, dtype=torch.float64)
    nanmean = lambda v: float(v[~torch.isnan(v)].mean())  # noqa: E731
    return {"IoU": iou, "Acc": acc, "mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": 0.625}


def test_headline_leaves_the_background_out_of_the_means_and_keeps_the_all_class_ones():
    r = _results([0.9, 0.2, float("nan"), 0.4], [0.95, 0.3, float("nan"), 0.5])
    h = seg_eval.headline(r, background=0)
    assert h["mIoU"] == pytest.approx(0.3) and h["mAcc"] == pytest.approx(0.4)
    assert h["mIoU_all"] == pytest.approx(0.5) and h["mAcc_all"] == pytest.approx((0.95 + 0.3 + 0.5) / 3)
    assert h["aAcc"] == 0.625
    assert seg_eval.headline(r, None) is r
    assert seg_eval.summary(h) == {"mIoU": 30.0, "aAcc": 62.5, "mAcc": 40.0, "mIoU_all": 50.0,
                                   "mAcc_all": round(100 * (0.95 + 0.3 + 0.5) / 3, 2)}
    out = seg_eval.report(h, ["background", "a", "b", "c"])
    assert out["units"] == "percent" and out["background"] == "background"
    assert out["IoU"] == [90.0, 20.0, None, 40.0] and out["Acc"] == [95.0, 30.0, None, 50.0]
    table = segvit.metrics.format_table(h, ["background", "a", "b", "c"])
    assert "mIoU 30.00" in table and "without background" in table and "mIoU 50.00" in table


def test_pascal_context_is_reported_over_59_classes():
    cfg = segvit.published_config("segvit_vit-l16_pc60_480")
    names, palette, background = seg_eval.dataset_classes(cfg, 60)
    assert background == 0 and names[0] == "background" and len(names) == 60 and len(palette) == 60
    names, _, background = seg_eval.dataset_classes(segvit.published_config("segvit_vit-l16_ade20k_640"), 150)
    assert background is None and names[0] == "wall"
    # a class count the dataset does not have: generic names, no background
    names, palette, background = seg_eval.dataset_classes(cfg, 7)
    assert names == [f"class {i}" for i in range(7)] and len(palette) == 7 and background is None


@pytest.mark.parametrize("path, same", [
    ("configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py", "segvit_vit-l16_ade20k_640"),
    ("configs/segvit/shrink/segvit_vit-l_jax_shrink8_tpnatm_640x640_160k_ade20k.py",
     "segvit_vit-l16_shrunk_ade20k_640"),
    ("configs/segvit/segvit_vit-l_jax_480x480_80k_pc.py", "segvit_vit-l16_pc60_480"),
    ("configs/segvit/segvit_vit-l_jax_512x512_80k_cocostuff10k.py", "segvit_vit-l16_cocostuff10k_512"),
    ("configs/my_experiment.py", None),
])
def test_an_original_py_config_names_its_published_equivalent(tmp_path, path, same):
    file = tmp_path / path
    file.parent.mkdir(parents=True)
    file.write_text("_base_ = ['../_base_/models/seg_vit-b16.py']\n")
    with pytest.raises(ValueError, match=r"\.py config") as info:
        seg_eval.load_config(str(file))
    if same:
        assert f"--config {same}" in str(info.value)
    else:
        assert "segvit_vit-l16_ade20k_640" in str(info.value)  # the list of published ones


def test_a_config_that_is_not_json_says_so(tmp_path):
    file = tmp_path / "cfg.json"
    file.write_text("model = dict(type='EncoderDecoder')\n")
    with pytest.raises(ValueError, match=r"cfg\.json: not a JSON config"):
        seg_eval.load_config(str(file))


@pytest.fixture(scope="module")
def ade150(tmp_path_factory):
    """A tiny ADE20K model with the dataset's 150 classes, its checkpoint and a synthetic ADE20K."""
    tmp = tmp_path_factory.mktemp("ade150")
    with open(TINY) as f:
        cfg = json.load(f)
    cfg["model"]["decode_head"]["num_classes"] = 150
    cfg["model"]["decode_head"]["loss_decode"]["num_classes"] = 150
    config = tmp / "tiny150.json"
    config.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = segvit.build_model(cfg["model"])
    checkpoint = tmp / "tiny150.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    data = write_synthetic_ade20k(str(tmp / "ADEChallengeData2016"), num_train=1, num_val=3, num_classes=150,
                                  size=(45, 61), seed=1)
    return str(config), str(checkpoint), data


def test_eval_prints_class_names_and_writes_percent_and_pictures(ade150, tmp_path, capsys):
    config, checkpoint, data = ade150
    out, show = tmp_path / "r.json", tmp_path / "show"
    results = seg_eval.main(["--config", config, "--checkpoint", checkpoint, "--data", data, "--split", "val",
                             "--out", str(out), "--show-dir", str(show)])
    printed = capsys.readouterr().out
    from segvit import classes

    names = classes.class_names("ade20k")
    assert printed.splitlines()[1].split()[0] == "wall" and "building" in printed
    written = json.loads(out.read_text())
    assert written["units"] == "percent" and written["classes"] == list(names)
    assert written["mIoU"] == round(100 * results["mIoU"], 2)
    for mine, theirs in zip(written["IoU"], results["IoU"].tolist()):
        assert (mine is None) == math.isnan(theirs) and (mine is None or mine == round(100 * theirs, 2))
    images = sorted(os.listdir(os.path.join(data, "images", "validation")))
    assert sorted(os.listdir(show)) == sorted(os.path.splitext(n)[0] + ".png" for n in images)
    for name in os.listdir(show):
        with Image.open(show / name) as im:
            assert im.mode == "RGB" and im.height >= 45 and im.width >= 61
            pixels = np.asarray(im)
        assert pixels.std() > 0


def test_eval_refuses_pretrained_for_a_json_config(ade150):
    config, _, data = ade150
    with pytest.raises(SystemExit):
        seg_eval.main(["--config", config, "--pretrained", "--data", data])
