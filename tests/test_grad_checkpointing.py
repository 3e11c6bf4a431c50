"""Activation checkpointing (issue 12): ``model.set_grad_checkpointing(True, every=k)`` recomputes the backbone
blocks (the Shrunk query-pooling block included) and the decoder layers in the backward. A checkpointed step gives
the plain step's loss and gradients, with every dropout and drop path on (the recompute replays the RNG), on every
CPU backend, under bf16 autocast and with torch.compile; and it keeps fewer activations."""
import pytest
import torch
import torch.utils.checkpoint

import segvit
from segvit.kernels import _common

BACKENDS = ["eager", "cpp"]  # triton: test_triton_op_under_checkpoint (a model step takes minutes interpreted)


def _model(make_config, head, **kw):
    cfg = make_config(head=head, img_size=48, drop_path_rate=0.3, **kw)
    cfg["backbone"]["drop_rate"] = 0.1  # with drop path 0.3, and the decoder layers' dropout 0.1
    return segvit.build_model(cfg).train()


def _labels(batch=2, size=48, classes=5):
    labels = torch.randint(0, classes, (batch, size, size))
    labels[:, :5] = 255
    return labels


def _step(model, images, labels, seed=3, autocast=None):
    """Loss and gradients of one training step, the RNG seeded first (dropout draws the same masks)."""
    criterion = segvit.SegViTLoss.for_model(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(images)
    loss = sum(criterion(out, labels).values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain, ckpt, rtol=1e-5, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = plain, ckpt
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_checkpointed_step_equals_plain_step_with_dropout(make_config, head, backend):
    model = _model(make_config, head)
    images, labels = torch.randn(2, 3, 48, 48), _labels()
    with segvit.ops.use_backend(backend):
        plain = _step(model, images, labels)
        model.set_grad_checkpointing(True)
        ckpt = _step(model, images, labels)
        other_seed = _step(model, images, labels, seed=4)
    _assert_same(plain, ckpt)
    # The masks matter: another seed gives other gradients (so the equality above is not dropout being off).
    assert any(not torch.allclose(other_seed[1][n], g, rtol=1e-3, atol=1e-6) for n, g in plain[1].items())


@pytest.mark.skipif(not _common.INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_op_under_checkpoint():
    # The Triton atm_attention draws its dropout seed from torch's CPU generator: the recompute must draw the same.
    q, k, v = (torch.randn(2, n, 2, 8, requires_grad=True) for n in (7, 19, 19))

    def fn(q, k, v):
        out, sim = segvit.ops.atm_attention(q, k, v, dropout_p=0.3)
        return out.square().sum() + sim.sum()

    with segvit.ops.use_backend("triton"):
        torch.manual_seed(5)
        plain = torch.autograd.grad(fn(q, k, v), (q, k, v))
        torch.manual_seed(5)
        ckpt = torch.autograd.grad(torch.utils.checkpoint.checkpoint(fn, q, k, v, use_reentrant=False), (q, k, v))
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("every", [2, 3])
def test_every_kth_block(make_config, every):
    model = _model(make_config, "TPNATMHead")
    images, labels = torch.randn(2, 3, 48, 48), _labels()
    plain = _step(model, images, labels)
    assert model.set_grad_checkpointing(True, every=every) is model
    _assert_same(plain, _step(model, images, labels))
    with pytest.raises(ValueError, match="every: expected a positive int"):
        model.set_grad_checkpointing(True, every=0)


@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_under_bf16_autocast(make_config, head):
    model = _model(make_config, head)
    images, labels = torch.randn(2, 3, 48, 48), _labels()
    with segvit.ops.use_backend("cpp"):
        plain = _step(model, images, labels, autocast=torch.bfloat16)
        model.set_grad_checkpointing(True)
        ckpt = _step(model, images, labels, autocast=torch.bfloat16)
    _assert_same(plain, ckpt, rtol=1e-5, atol=1e-5)


def test_with_torch_compile(make_config):
    model = segvit.build_model(make_config(img_size=48)).train()
    for module in model.modules():  # dropout off: compiled code draws its masks through another RNG path
        for name in ("p", "dropout", "attn_drop"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    images, labels = torch.randn(2, 3, 48, 48), _labels()

    def step(fn):
        criterion = segvit.SegViTLoss.for_model(model)
        model.zero_grad(set_to_none=True)
        loss = sum(criterion(fn(images), labels).values())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with segvit.ops.use_backend("cpp"):
        plain = step(model)
        model.set_grad_checkpointing(True)
        compiled = step(torch.compile(model, backend="aot_eager"))
    _assert_same(plain, compiled, rtol=1e-4, atol=1e-5)


def _saved_bytes(model, images):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images)
    return total[0], out


def test_checkpointing_keeps_fewer_activations(make_config):
    model = _model(make_config, "TPNATMHead", num_layers=6)
    images = torch.randn(2, 3, 48, 48)
    plain, _ = _saved_bytes(model, images)
    model.set_grad_checkpointing(True)
    ckpt, _ = _saved_bytes(model, images)
    assert ckpt < 0.5 * plain, (ckpt, plain)
    model.set_grad_checkpointing(False)
    assert _saved_bytes(model, images)[0] == plain
