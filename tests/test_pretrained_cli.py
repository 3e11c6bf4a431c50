"""The official weights from the command line (issue 13): ``segvit.eval --pretrained``, ``segvit.predict
--pretrained`` and ``segvit.train --load-from official|PATH``, through the real hub lookup of a seeded offline
Hugging Face cache (test_hub.py's), with the published ADE20K config's model made tiny."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import segvit
from segvit import hub
from segvit.checkpoint import to_original
from segvit.data import write_synthetic_ade20k
from segvit.models import factory

from conftest import tiny_config
from test_hub import hub_cache  # noqa: F401  (the fixture)

NAME = "segvit_vit-b16_ade20k_512"


@pytest.fixture
def official(hub_cache, monkeypatch):  # noqa: F811
    """NAME's published config with a tiny 150-class model; its official file seeded into the cache. Returns the
    model the file holds."""
    real = factory.published_config
    whole = copy.deepcopy(real(NAME))
    whole["model"] = tiny_config(num_classes=150)
    whole["model"]["test_cfg"] = {"mode": "whole"}
    monkeypatch.setattr(factory, "published_config", lambda n: copy.deepcopy(whole) if n == NAME else real(n))
    torch.manual_seed(1)
    source = segvit.build_model(whole).eval()
    hub_cache(hub.checkpoint_info(NAME).filename, {"state_dict": to_original(source), "meta": {}})
    return source


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    return write_synthetic_ade20k(str(root), num_train=4, num_val=2, num_classes=150, size=(40, 52), seed=2)


def test_eval_pretrained_equals_eval_of_the_file(official, ade, tmp_path):
    from segvit import eval as seg_eval

    by_name = seg_eval.main(["--config", NAME, "--pretrained", "--data", ade, "--split", "val", "--mode", "whole"])
    path = hub.official_checkpoint(NAME)
    config = tmp_path / "same.json"  # the (patched) published config, as a file
    config.write_text(json.dumps(factory.published_config(NAME)))
    by_file = seg_eval.main(["--config", str(config), "--checkpoint", path, "--data", ade, "--split", "val",
                             "--mode", "whole"])
    assert torch.equal(by_name["IoU"].nan_to_num(-1), by_file["IoU"].nan_to_num(-1))
    with pytest.raises(SystemExit):  # one or the other
        seg_eval.main(["--config", NAME, "--pretrained", "--checkpoint", path, "--data", ade])


def test_predict_pretrained_writes_what_inference_of_the_official_model_gives(official, tmp_path):
    from segvit import predict

    image = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    written = predict.main(["--model", NAME, "--pretrained", str(tmp_path / "photo.png"), "--out-dir",
                            str(tmp_path / "out"), "--no-progress", "--mode", "whole"])
    assert sorted(os.path.basename(p) for p in written) == ["photo.png", "photo_overlay.png"]
    with Image.open(tmp_path / "out" / "photo.png") as im:
        labels = np.asarray(im)
    expected = segvit.inference(official, image, mode="whole")
    assert labels.shape == (37, 53) and np.array_equal(labels, expected.numpy())


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("how", ["official", "path"])
def test_train_load_from_starts_from_the_weights(official, ade, tmp_path, how):
    from segvit import train

    source, config = official, NAME
    if how == "path":  # a local file, with the (patched) published config as a file
        path = str(tmp_path / "weights.pth")
        torch.save({"state_dict": to_original(source), "meta": {}}, path)
        config = str(tmp_path / "same.json")
        with open(config, "w") as f:
            json.dump(factory.published_config(NAME), f)
    work = tmp_path / "w"
    args = ["--config", config, "--data", ade, "--work-dir", str(work), "--iters", "1", "--batch-size", "1",
            "--eval-interval", "0", "--workers", "0", "--no-progress", "--load-from",
            "official" if how == "official" else path]
    train.main(args)
    trained = segvit.build_model(NAME, checkpoint=str(work / "latest.pth"))
    start, fresh = _weights(source), _weights(segvit.build_model(factory.published_config(NAME)["model"]))
    moved = (_weights(trained) - start).abs().max()
    # one AdamW step at the recipe's lr moves every weight by about lr (x10 in the head), far less than a fresh init
    assert moved < 1e-2 < (fresh - start).abs().max()


def test_train_load_from_errors(ade, tmp_path, hub_cache):  # noqa: F811
    from segvit import train

    common = ["--data", ade, "--work-dir", str(tmp_path / "w"), "--iters", "1", "--no-progress"]
    with pytest.raises(SystemExit):  # a JSON config has no official weights
        train.main(["--config", os.path.join(os.path.dirname(__file__), "data", "tiny_train_config.json"),
                    "--load-from", "official", *common])
    with pytest.raises(SystemExit):  # the whole model or its backbone, not both
        train.main(["--config", NAME, "--load-from", "official", "--pretrained", "x.pth", *common])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        train.main(["--config", NAME, "--load-from", str(tmp_path / "missing.pth"), *common])
