"""python -m segvit.predict over files, folders and globs with a small checkpoint; the written PNGs read back.
(--pretrained goes through segvit.build_model(name, pretrained=True) and is tested with the Hub code.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import segvit
from conftest import DATA
from segvit.inference import inference
from segvit.predict import collect_inputs, main, output_stems
from segvit.visualize import LEGEND_ROW


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A whole JSON config, a checkpoint of a random model with varied labels, and the model itself."""
    root = tmp_path_factory.mktemp("predict")
    with open(os.path.join(DATA, "tiny_train_config.json")) as f:
        cfg = json.load(f)
    config_path = root / "tiny.json"
    config_path.write_text(json.dumps(cfg))
    torch.manual_seed(2)
    model = segvit.build_model(cfg)
    for module in model.head.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    checkpoint = root / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return str(config_path), str(checkpoint), model.eval()


def write_images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for name in names:
        img = rng.integers(0, 256, (int(rng.integers(30, 70)), int(rng.integers(30, 70)), 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / name)  # .png and .bmp only: lossless, so the pixels are known
        images[name] = img
    return images


def run(setup, inputs, out_dir, *extra):
    config, checkpoint, _ = setup
    return main(["--model", config, "--checkpoint", checkpoint, *map(str, inputs), "--out-dir", str(out_dir),
                 "--no-progress", "--device", "cpu", *extra])


def check_outputs(written, out_dir, stems_and_images, model, mode=None):
    assert written == [str(out_dir / f"{s}{suffix}.png") for s, _ in stems_and_images for suffix in ("", "_overlay")]
    classes_seen = set()
    for stem, img in stems_and_images:
        with Image.open(out_dir / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (img.shape[1], img.shape[0])
            labels = np.array(im)
            palette = np.array(im.getpalette(), np.uint8).reshape(-1, 3)[:model.num_classes]
        np.testing.assert_array_equal(labels, inference(model, img, mode=mode).numpy())
        classes_seen.update(np.unique(labels).tolist())
        np.testing.assert_array_equal(palette, model.palette)
        with Image.open(out_dir / f"{stem}_overlay.png") as im:
            assert im.mode == "RGB" and im.height == max(img.shape[0], LEGEND_ROW * len(np.unique(labels)))
            assert im.width > img.shape[1]  # the legend beside the overlay
    assert len(classes_seen) > 1  # one class everywhere would make the label checks vacuous


def test_folder(setup, tmp_path):
    images = write_images(tmp_path / "in", ["b.png", "a.PNG", "c.bmp"])
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "sub").mkdir()
    written = run(setup, [tmp_path / "in"], tmp_path / "out")
    check_outputs(written, tmp_path / "out", [(s, images[n]) for s, n in
                                              (("a", "a.PNG"), ("b", "b.png"), ("c", "c.bmp"))], setup[2])
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png",
                                                     "c_overlay.png"]


def test_glob_file_and_colliding_stems(setup, tmp_path):
    first = write_images(tmp_path / "x", ["img.png", "other.png"], seed=1)
    second = write_images(tmp_path / "y", ["img.bmp"], seed=2)
    written = run(setup, [tmp_path / "x" / "*.png", tmp_path / "y" / "img.bmp", tmp_path / "x" / "img.png"],
                  tmp_path / "out", "--mode", "whole", "--opacity", "0.7")
    # x/img.png appears twice (glob, then by name): written once; y/img.bmp gets a new stem.
    check_outputs(written, tmp_path / "out", [("img", first["img.png"]), ("other", first["other.png"]),
                                              ("img_1", second["img.bmp"])], setup[2], mode="whole")


def test_output_stems():
    assert output_stems(["a/x.jpg", "b/x.png", "c/x_1.png", "d/X.jpg"]) == ["x", "x_1", "x_1_1", "X_2"]
    # "<stem>_overlay" never meets another image's label file.
    assert output_stems(["a.png", "a_overlay.png"]) == ["a", "a_overlay_1"]


def test_errors(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        run(setup, [tmp_path / "empty", tmp_path / "*.jpg"], tmp_path / "out")
    assert "no image found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(setup, [tmp_path / "missing.jpg"], tmp_path / "out")
    assert "missing.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "nope", "--checkpoint", setup[1], str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert "--model" in capsys.readouterr().err
    write_images(tmp_path / "in", ["a.png"])
    with pytest.raises(SystemExit):
        main(["--model", setup[0], "--checkpoint", str(tmp_path / "no.pth"), str(tmp_path / "in"),
              "--out-dir", str(tmp_path / "o")])
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one of --checkpoint / --pretrained is required
        main(["--model", setup[0], str(tmp_path / "in"), "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        main(["--model", setup[0], "--pretrained", str(tmp_path / "in"), "--out-dir", str(tmp_path / "o")])
    assert "--pretrained: the official weights exist for the published models only" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_inputs([str(tmp_path / "nope")])


def test_module_help():
    out = subprocess.run([sys.executable, "-m", "segvit.predict", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--out-dir" in out and "--pretrained" in out and ".jpeg" in out


def test_a_corrupt_file_is_skipped_named_and_fails_the_run_after_the_others(setup, tmp_path, capsys):
    images = write_images(tmp_path / "in", ["a.png", "c.png"])
    good = (tmp_path / "in" / "c.png").read_bytes()
    (tmp_path / "in" / "b.png").write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(SystemExit) as exit_:
        run(setup, [tmp_path / "in"], tmp_path / "out")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "1 input(s) could not be read" in err and str(tmp_path / "in" / "b.png") in err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "a_overlay.png", "c.png", "c_overlay.png"]
    with Image.open(tmp_path / "out" / "c.png") as im:
        np.testing.assert_array_equal(np.array(im), inference(setup[2], images["c.png"]).numpy())
