"""Checkpoint load errors say what happened to the file (issue 11): missing, empty, truncated, not a checkpoint, or
a valid checkpoint holding objects that safe loading refuses (only then the weights_only advice)."""
import collections
import pickle

import pytest
import torch

import segvit
from segvit.checkpoint import CheckpointError, read_checkpoint_file


class NotAllowed:  # a global that weights_only=True refuses
    pass


@pytest.fixture
def saved(tmp_path):
    def save(obj, name="good.pth", **kwargs):
        path = tmp_path / name
        torch.save(obj, path, **kwargs)
        return path
    return save


def test_missing_file_is_file_not_found_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth") as info:
        read_checkpoint_file(tmp_path / "missing.pth")
    assert info.value.filename == str(tmp_path / "missing.pth")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth.*is empty \(0 bytes\)"):
        read_checkpoint_file(tmp_path / "empty.pth")


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_file(saved, tmp_path, zip_format, fraction):
    data = saved({"model": {"w": torch.randn(64, 64)}}, _use_new_zipfile_serialization=zip_format).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=r"cut.pth.*(truncated or corrupt|could not be read)") as info:
        read_checkpoint_file(cut)
    assert "weights_only=False" not in str(info.value)


def test_text_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("model: vit-l\n")
    with pytest.raises(CheckpointError, match=r"notes.pth.*is not a torch checkpoint"):
        read_checkpoint_file(tmp_path / "notes.pth")


def test_weights_only_advice_only_for_a_valid_file_with_objects(saved):
    path = saved({"state_dict": {"w": torch.ones(2)}, "meta": NotAllowed})
    with pytest.raises(CheckpointError, match="weights_only=False") as info:
        read_checkpoint_file(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_valid_files_load(saved):
    # Zip and legacy formats, and an mmcv-style meta of allowed containers.
    for i, kwargs in enumerate([{}, {"_use_new_zipfile_serialization": False}]):
        obj = {"state_dict": {"w": torch.arange(3.0)}, "meta": collections.OrderedDict(iter=4)}
        got = read_checkpoint_file(saved(obj, f"ok{i}.pth", **kwargs))
        assert torch.equal(got["state_dict"]["w"], torch.arange(3.0)) and got["meta"]["iter"] == 4


def test_load_checkpoint_and_build_model_report_the_file(make_config, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    model = segvit.build_model(make_config())
    with pytest.raises(CheckpointError, match="empty.pth"):
        segvit.load_checkpoint(model, tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        segvit.build_model(make_config(), checkpoint=tmp_path / "nothing.pth")


# ---- predict and build_model(checkpoint=...) are deterministic (issue 11, item 4) ----

def test_predict_is_deterministic_in_training_mode_and_keeps_the_modes(make_config):
    # Dropout and drop path on (the published configs use drop path 0.3): predict must switch them off.
    cfg = make_config(drop_path_rate=0.5)
    cfg["backbone"].update(attn_drop_rate=0.3, drop_rate=0.3)
    model = segvit.build_model(cfg)
    model.train()
    model.backbone.eval()  # a mixed-mode model: predict restores each submodule's own flag
    modes = {name: m.training for name, m in model.named_modules()}
    images = torch.randn(1, 3, 64, 64)
    first, second = model.predict(images), model.predict(images)
    assert torch.equal(first, second)
    model.eval()
    assert torch.equal(model.predict(images), first)
    model.train()
    model.backbone.eval()
    model.predict(images)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_build_model_with_a_checkpoint_is_in_eval_mode(make_config, tmp_path):
    trained = segvit.build_model(make_config())
    torch.save({"model": trained.state_dict()}, tmp_path / "ckpt.pth")
    loaded = segvit.build_model(make_config(), checkpoint=tmp_path / "ckpt.pth")
    assert not any(m.training for m in loaded.modules())
    assert segvit.build_model(make_config()).training  # no checkpoint: a fresh module, in training mode


def test_a_checkpoint_of_another_size_gives_a_short_error_with_a_hint():
    from conftest import tiny_config

    small = segvit.build_model(tiny_config(embed_dims=32))
    large = segvit.build_model(tiny_config(embed_dims=64, num_layers=6))
    with pytest.raises(RuntimeError) as info:
        segvit.load_checkpoint(large, small.state_dict())
    message = str(info.value)
    assert "more)" in message and "another configuration" in message
    assert len(message) < 3000, len(message)


def test_an_mmcv_meta_with_numpy_values_loads_safely(tmp_path):
    """mmcv writes numpy scalars and arrays into ``meta`` (hook_msgs' best_score, a PALETTE array): those load under
    safe loading; anything else stays refused with the advice."""
    import fractions

    import numpy as np

    from conftest import tiny_config
    from segvit.checkpoint import RefusedObjectsError, to_original

    model = segvit.build_model(tiny_config())
    meta = {"hook_msgs": {"best_score": np.float64(0.5), "best_ckpt": "x.pth"}, "PALETTE": np.arange(6).reshape(2, 3),
            "CLASSES": ("wall", "floor"), "iter": np.int64(80000)}
    path = tmp_path / "mmcv.pth"
    torch.save({"state_dict": to_original(model), "meta": meta}, path)
    state = read_checkpoint_file(path)
    assert state["meta"]["hook_msgs"]["best_score"] == 0.5 and state["meta"]["iter"] == 80000
    assert np.array_equal(state["meta"]["PALETTE"], np.arange(6).reshape(2, 3))
    loaded = segvit.build_model(tiny_config(), checkpoint=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"state_dict": to_original(model), "meta": {"np": np.float64(1.0), "odd": fractions.Fraction(1, 3)}},
               path)
    with pytest.raises(RefusedObjectsError, match="weights_only=False"):
        read_checkpoint_file(path)
