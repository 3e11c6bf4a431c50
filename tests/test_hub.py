"""The official checkpoints by name (issue 13, item 3). Nothing is downloaded: a local Hugging Face cache is seeded
(huggingface_hub's layout: models--Akide--SegViTv1/refs/main and snapshots/<commit>/<file>) with a small
checkpoint in the original mmcv format under a published file name, and HF_HUB_OFFLINE=1 is set."""
import copy
import os
import sys

import pytest
import torch

import segvit
from segvit import hub
from segvit.checkpoint import to_original
from segvit.models import factory

from conftest import tiny_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_the_table_covers_every_published_model():
    assert hub.official_models() == segvit.list_models()
    files = [c.filename for c in hub.OFFICIAL_CHECKPOINTS.values()]
    assert len(set(files)) == len(files) and all(f.endswith(".pth") for f in files)
    info = hub.checkpoint_info("segvit_vit-l16_ade20k_640")
    assert info.filename == "ade_54.6.pth" and (info.miou_single_scale, info.miou_multi_scale) == (54.6, 55.2)
    assert info.url == "https://huggingface.co/Akide/SegViTv1/resolve/main/ade_54.6.pth"
    # shared/design/checkpoints.md, transcribed independently of segvit/hub.py
    spec = {"segvit_vit-b16_ade20k_512": "ade_51.3.pth", "segvit_vit-l16_shrunk_ade20k_640": "ade_shrunk_53.9.pth",
            "segvit_vit-l16_ade20k_640": "ade_54.6.pth",
            "segvit_vit-l16_shrunk_cocostuff10k_512": "COCOstuff10k_shrunk_49.1.pth",
            "segvit_vit-l16_cocostuff10k_512": "COCOstuff_49.9.pth",
            "segvit_vit-l16_shrunk_pc60_480": "PC59cls_62.3.pth", "segvit_vit-l16_pc60_480": "PC59cls_64.1.pth"}
    assert {name: c.filename for name, c in hub.OFFICIAL_CHECKPOINTS.items()} == spec
    for name, c in hub.OFFICIAL_CHECKPOINTS.items():  # the filenames carry the single-scale mIoU
        assert f"_{c.miou_single_scale}.pth" in c.filename and c.miou_multi_scale > c.miou_single_scale, name


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match=r"no official checkpoint for 'vit-h'.*segvit_vit-b16_ade20k_512"):
        hub.official_checkpoint("vit-h")
    with pytest.raises(TypeError, match="name: expected a model name"):
        hub.official_checkpoint(3)
    with pytest.raises(TypeError, match="cache_dir"):
        hub.official_checkpoint("segvit_vit-b16_ade20k_512", cache_dir=1)
    with pytest.raises(TypeError, match="force_download"):
        hub.official_checkpoint("segvit_vit-b16_ade20k_512", force_download="yes")
    with pytest.raises(ValueError, match="either pretrained=True .* or checkpoint=PATH"):
        segvit.build_model("segvit_vit-b16_ade20k_512", checkpoint="x.pth", pretrained=True)
    with pytest.raises(ValueError, match="pretrained=True needs a published model name"):
        segvit.build_model(tiny_config(), pretrained=True)
    with pytest.raises(TypeError, match="pretrained: expected a bool"):
        segvit.build_model(tiny_config(), pretrained="yes")


def test_without_huggingface_hub_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError) as info:
        segvit.build_model("segvit_vit-l16_shrunk_pc60_480", pretrained=True)
    message = str(info.value)
    assert "pip install segvit[hub]" in message and "huggingface_hub" in message
    assert "https://huggingface.co/Akide/SegViTv1/resolve/main/PC59cls_62.3.pth" in message
    assert "checkpoint=PATH" in message


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face home under tmp_path, offline; returns a function seeding a file into it."""
    pytest.importorskip("huggingface_hub")
    home = tmp_path / "hf"
    for variable in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def seed(filename, obj, cache=home / "hub"):
        repo = cache / "models--Akide--SegViTv1"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        torch.save(obj, snapshot / filename)
        return snapshot / filename
    return seed


def tiny_published(monkeypatch, name, head):
    """Make the published config of ``name`` a tiny one (the real ones are ViT-L sized); the hub lookup, the
    file table and the load stay the real ones."""
    whole = {"model": tiny_config(head=head, num_classes=5)}
    real = factory.published_config

    def published_config(n):
        return copy.deepcopy(whole) if n == name else real(n)
    monkeypatch.setattr(factory, "published_config", published_config)
    return whole["model"]


@pytest.mark.parametrize("name, head", [("segvit_vit-b16_ade20k_512", "ATMHead"),
                                        ("segvit_vit-l16_shrunk_cocostuff10k_512", "TPNATMHead")])
def test_pretrained_loads_the_cached_official_file(hub_cache, monkeypatch, name, head):
    cfg = tiny_published(monkeypatch, name, head)
    source = segvit.build_model(cfg)
    filename = hub.checkpoint_info(name).filename
    seeded = hub_cache(filename, {"state_dict": to_original(source), "meta": {"iter": 80000}})
    assert os.path.samefile(hub.official_checkpoint(name), seeded)
    model = segvit.build_model(name, pretrained=True)
    assert not model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(model.predict(images), source.predict(images))


def test_offline_variable_set_after_import_and_cache_dir(hub_cache, tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE once, at its import (already done in this process):
    # official_checkpoint reads them when called.
    import huggingface_hub  # noqa: F401

    elsewhere = tmp_path / "elsewhere"
    seeded = hub_cache("ade_51.3.pth", {"state_dict": {}}, cache=elsewhere)
    with pytest.raises(hub.OfficialCheckpointError):
        hub.official_checkpoint("segvit_vit-b16_ade20k_512")
    assert os.path.samefile(hub.official_checkpoint("segvit_vit-b16_ade20k_512", cache_dir=elsewhere), seeded)
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))
    assert os.path.samefile(hub.official_checkpoint("segvit_vit-b16_ade20k_512"), seeded)
    with pytest.raises(ValueError, match="force_download=True needs the network"):
        hub.official_checkpoint("segvit_vit-b16_ade20k_512", force_download=True)


def test_offline_without_the_file_says_how_to_get_it(hub_cache):
    hub_cache("ade_51.3.pth", {"state_dict": {}})  # another model's file is cached, not this one
    name = "segvit_vit-l16_ade20k_640"
    with pytest.raises(hub.OfficialCheckpointError) as info:
        segvit.build_model(name, pretrained=True)
    message = str(info.value)
    for part in (name, "Akide/SegViTv1", "'ade_54.6.pth'", "https://huggingface.co/Akide/SegViTv1/resolve/main/"
                 "ade_54.6.pth", "HF_HUB_OFFLINE is set", "checkpoint=PATH", "unset HF_HUB_OFFLINE", "HF_HOME",
                 "HF_HUB_CACHE", os.environ["HF_HUB_CACHE"]):
        assert part in message, part
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, FileNotFoundError)


def test_a_failed_download_says_how_to_get_it(hub_cache, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(repo_id, filename, **kwargs):  # what a machine without network gets, without the retries
        calls.append((repo_id, filename, kwargs))
        raise ConnectionError("cannot reach huggingface.co")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(hub.OfficialCheckpointError, match=r"(?s)'COCOstuff_49.9.pth'.*cannot reach huggingface.co"
                       r".*download https://huggingface.co/Akide/SegViTv1/resolve/main/COCOstuff_49.9.pth by hand"):
        hub.official_checkpoint("segvit_vit-l16_cocostuff10k_512")
    (repo_id, filename, kwargs), = calls
    assert (repo_id, filename) == ("Akide/SegViTv1", "COCOstuff_49.9.pth")
    assert kwargs["revision"] == "main" and kwargs["local_files_only"] is False
    assert kwargs["cache_dir"] == os.environ["HF_HUB_CACHE"]


def test_a_damaged_cached_file_says_to_fetch_it_again(hub_cache, monkeypatch):
    name = "segvit_vit-b16_ade20k_512"
    tiny_published(monkeypatch, name, "ATMHead")
    path = hub_cache("ade_51.3.pth", {"state_dict": to_original(segvit.build_model(tiny_config()))})
    path.write_bytes(path.read_bytes()[:200])  # an interrupted copy
    with pytest.raises(segvit.checkpoint.CheckpointError, match=r"(?s)truncated.*official_checkpoint\("
                       r"'segvit_vit-b16_ade20k_512', force_download=True\)"):
        segvit.build_model(name, pretrained=True)
