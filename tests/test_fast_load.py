"""build_model(..., checkpoint=...) skips the random initialisation the checkpoint replaces (issue 13, item 3): the
modules are built on the meta device and the checkpoint's tensors assigned. The result must be the model that
building (with the full init) and then loading gives, bit for bit, with the same kinds of tensors."""
import pytest
import torch
import torch.nn as nn

import segvit
from segvit.checkpoint import load_checkpoint, load_or_rebuild, skip_init, to_original

from conftest import tiny_config

FAMILIES = ["ATMHead", "TPNATMHead"]


def original_file(tmp_path, model, name="ckpt.pth", drop=(), extra=None, dtype=None):
    """``model`` saved as an original mmcv checkpoint (``state_dict`` under mmseg names, and ``meta``)."""
    state = to_original(model)
    for key in drop:
        del state[key]
    state.update(extra or {})
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    path = tmp_path / name
    torch.save({"state_dict": state, "meta": {"iter": 160000, "CLASSES": ["a", "b"]}}, path)
    return path


def build_then_load(cfg, checkpoint, strict=True):
    """What build_model(cfg, checkpoint=...) did before the init skip: the full init, then a copy."""
    model = segvit.build_model(cfg)
    load_checkpoint(model, checkpoint, strict=strict)
    return model.eval()


def assert_same_model(fast, slow):
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert list(fast_state) == list(slow_state)
    for key, value in slow_state.items():
        got = fast_state[key]
        assert got.dtype == value.dtype and got.device == value.device, key
        assert got.shape == value.shape and got.stride() == value.stride(), key
        assert torch.equal(got, value), key
    slow_params = dict(slow.named_parameters())
    for name, p in fast.named_parameters():
        assert type(p) is nn.Parameter, name
        assert p.requires_grad == slow_params[name].requires_grad, name
        assert p.is_leaf and p.grad is None, name
        assert p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous(), name
    for name, b in fast.named_buffers():
        assert not b.is_meta, name
    assert [m.training for m in fast.modules()] == [m.training for m in slow.modules()]
    assert not fast.training


@pytest.mark.parametrize("head", FAMILIES)
def test_fast_load_is_the_build_then_load_model(tmp_path, head):
    cfg = tiny_config(head=head)
    path = original_file(tmp_path, segvit.build_model(cfg))
    rng = torch.get_rng_state()
    fast = segvit.build_model(cfg, checkpoint=path)
    # The init was skipped: nothing was drawn (the full build draws from the global generator).
    assert torch.equal(torch.get_rng_state(), rng)
    slow = build_then_load(cfg, path)
    assert not torch.equal(torch.get_rng_state(), rng)
    assert_same_model(fast, slow)
    # Every parameter has storage of its own (assignment never aliases two entries).
    pointers = [p.untyped_storage().data_ptr() for p in fast.parameters()]
    assert len(set(pointers)) == len(pointers)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_fast, out_slow = fast(images), slow(images)
    assert torch.equal(out_fast["pred_logits"], out_slow["pred_logits"])
    assert torch.equal(out_fast["pred_masks"], out_slow["pred_masks"])
    assert torch.equal(fast.predict(images), slow.predict(images))
    assert fast.data_config == slow.data_config and fast.loss_options == slow.loss_options


def test_fast_loaded_model_trains_as_the_slow_one(tmp_path):
    cfg = tiny_config()
    path = original_file(tmp_path, segvit.build_model(cfg))
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    grads = []
    for model in (segvit.build_model(cfg, checkpoint=path), build_then_load(cfg, path)):
        model.train()
        torch.manual_seed(1)  # the same dropout draws
        sum(segvit.SegViTLoss.for_model(model)(model(images), labels).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert any(g is not None for g in grads[0].values())
    for name, grad in grads[1].items():
        assert (grad is None) == (grads[0][name] is None), name
        assert grad is None or torch.equal(grads[0][name], grad), name


def test_half_precision_checkpoint_converts_as_a_copy_does(tmp_path):
    cfg = tiny_config()
    path = original_file(tmp_path, segvit.build_model(cfg), dtype=torch.float16)
    assert_same_model(segvit.build_model(cfg, checkpoint=path), build_then_load(cfg, path))


def test_a_state_dict_argument_is_copied_not_aliased():
    cfg = tiny_config(head="TPNATMHead")
    source = segvit.build_model(cfg)
    state = source.state_dict()  # shares storage with source's parameters
    fast = segvit.build_model(cfg, checkpoint=state)
    assert_same_model(fast, build_then_load(cfg, state))
    with torch.no_grad():
        source.backbone.pos_embed.add_(1.0)
    assert not torch.equal(fast.backbone.pos_embed, source.backbone.pos_embed)


def test_shared_storage_in_the_file_is_not_shared_by_the_parameters(tmp_path):
    cfg = tiny_config()
    state = segvit.build_model(cfg).state_dict()
    # Two entries viewing one storage (torch.save keeps views): the model must still get one tensor each.
    weight = state["backbone.blocks.0.norm1.weight"]
    state["backbone.blocks.0.norm2.weight"] = weight
    path = tmp_path / "shared.pth"
    torch.save({"model": state}, path)
    fast = segvit.build_model(cfg, checkpoint=path)
    assert_same_model(fast, build_then_load(cfg, path))
    block = fast.backbone.blocks[0]
    assert block.norm1.weight.untyped_storage().data_ptr() != block.norm2.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("head", FAMILIES)
def test_mismatches_raise_what_load_checkpoint_raises(tmp_path, head):
    cfg = tiny_config(head=head)
    model = segvit.build_model(cfg)
    original = to_original(model)
    some_key = next(k for k in original if k.startswith("decode_head.") and k.endswith(".weight"))
    cases = {"missing": original_file(tmp_path, model, "missing.pth", drop=[some_key]),
             "unexpected": original_file(tmp_path, model, "unexpected.pth", extra={"decode_head.extra": torch.ones(2)}),
             "mis-shaped": original_file(tmp_path, model, "shape.pth", extra={some_key: torch.ones(3)})}
    for case, path in cases.items():
        with pytest.raises(RuntimeError) as slow:
            load_checkpoint(segvit.build_model(cfg), path)
        with pytest.raises(RuntimeError) as fast:
            segvit.build_model(cfg, checkpoint=path)
        assert str(fast.value) == str(slow.value), case
        assert "does not match the model" in str(fast.value), case


def test_non_strict_missing_keys_get_the_full_init(tmp_path):
    cfg = tiny_config()
    model = segvit.build_model(cfg)
    missing = ["backbone.layers.1.ln1.weight", "decode_head.q.weight"]
    path = original_file(tmp_path, model, drop=missing, extra={"decode_head.extra": torch.ones(2)})
    torch.manual_seed(7)
    fast = segvit.build_model(cfg, checkpoint=path, strict=False)
    torch.manual_seed(7)
    slow = build_then_load(cfg, path, strict=False)
    assert_same_model(fast, slow)  # the missing entries too: the same random draws as a plain build
    with pytest.raises(RuntimeError, match=r"missing keys \(2\)"):
        segvit.build_model(cfg, checkpoint=path)


def test_non_strict_unexpected_keys_stay_on_the_fast_path(tmp_path):
    cfg = tiny_config()
    path = original_file(tmp_path, segvit.build_model(cfg), extra={"decode_head.extra": torch.ones(2)})
    rng = torch.get_rng_state()
    fast = segvit.build_model(cfg, checkpoint=path, strict=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_model(fast, build_then_load(cfg, path, strict=False))


def test_load_checkpoint_fills_a_skeleton_and_refuses_to_leave_holes(tmp_path):
    cfg = tiny_config(head="TPNATMHead")
    source = segvit.build_model(cfg)
    with skip_init():
        skeleton = segvit.build_model(cfg)
    assert all(p.is_meta for p in skeleton.parameters())
    assert load_checkpoint(skeleton, original_file(tmp_path, source)) is skeleton
    assert_same_model(skeleton.eval(), source.eval())
    with skip_init():
        skeleton = segvit.build_model(cfg)
    partial = original_file(tmp_path, source, "partial.pth", drop=["decode_head.q.weight"])
    with pytest.raises(RuntimeError, match=r"meta device.*head\.grid_queries\.weight"):
        load_checkpoint(skeleton, partial, strict=False)


class _WithDerivedBuffer(nn.Module):
    """A module with a value outside its state dict (a non-persistent buffer computed in __init__)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("grid", torch.arange(4.0), persistent=False)


def test_values_outside_the_state_dict_fall_back_to_the_full_build():
    source = _WithDerivedBuffer()
    with skip_init():
        skeleton = _WithDerivedBuffer()
    assert skeleton.grid.is_meta
    with pytest.raises(RuntimeError, match="grid"):
        load_checkpoint(skeleton, source.state_dict())
    rebuilt = []

    def rebuild():
        rebuilt.append(True)
        return _WithDerivedBuffer()

    model = load_or_rebuild(skeleton, source.state_dict(), rebuild=rebuild)
    assert rebuilt and not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model.grid, torch.arange(4.0)) and torch.equal(model.lin.weight, source.lin.weight)


def test_skip_init_leaves_real_tensors_alone():
    # Outside the meta device the init functions still run (a model built next to a skeleton keeps its init).
    with skip_init():
        real = torch.zeros(3, device="cpu")
        nn.init.ones_(real)
        meta = torch.zeros(3)
    assert torch.equal(real, torch.ones(3)) and meta.is_meta


def test_strict_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="strict: expected a bool"):
        segvit.build_model(tiny_config(), checkpoint=tmp_path / "x.pth", strict="no")
