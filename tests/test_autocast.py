"""The ops and the models under ``torch.autocast``, as GPU users run them (segvit/ops/_autocast.py states the policy).

CPU autocast stands in for CUDA's: bfloat16 for the eager and cpp backends, float16 for triton under
TRITON_INTERPRET=1 (the triton 3.8 interpreter computes bfloat16 dots and reductions wrongly; cpp has no float16
kernels). Each op runs with float32, low-precision and mixed inputs, forward and backward, against the float64
reference on the same inputs. Rule: the op's error is at most 3x the error of the original's math (the op module's
``eager`` function) called directly under the same autocast on the same inputs, plus a floor per compute dtype for
outputs where both errors are at rounding level. Outputs are poisoned with NaN (triton launchers and cpp kernels).
"""
import importlib

import pytest
import torch

import segvit
from helpers import max_err
from segvit import _extension
from segvit.kernels import _common

atm_mod, mc_mod, ml_mod, qp_mod = (importlib.import_module(f"segvit.ops.{name}") for name in (
    "atm_attention", "mask_classify", "mask_losses", "query_pool_attention"))

FACTOR = 3.0
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
LOSS_FLOOR = 1e-5  # mask_losses computes in float32 on every backend: the floor of a float32 sum
BACKENDS = [pytest.param("eager", torch.bfloat16, id="eager-bf16"),
            pytest.param("cpp", torch.bfloat16, id="cpp-bf16"),
            pytest.param("triton", torch.float16, id="triton-fp16",
                         marks=pytest.mark.skipif(not _common.INTERPRET, reason="needs TRITON_INTERPRET=1"))]
INPUTS = ["float32", "low", "mixed"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)
    monkeypatch.setenv("SEGVIT_POISON_OUTPUTS", "1")


def _leaves(shapes, kind, low, scales=None):
    """Random leaves: all float32, all ``low``, or alternating float32 / ``low`` (the first is float32)."""
    scales = scales or [1.0] * len(shapes)
    dtypes = {"float32": [torch.float32] * len(shapes), "low": [low] * len(shapes),
              "mixed": [torch.float32 if i % 2 == 0 else low for i in range(len(shapes))]}[kind]
    return [(torch.randn(*s, dtype=torch.float64) * c).to(d).requires_grad_() for s, d, c in zip(shapes, dtypes, scales)]


def _grads(outputs, inputs, cotangents):
    used = [(o, c.to(o.dtype)) for o, c in zip(outputs, cotangents) if c is not None]
    return list(torch.autograd.grad([o for o, _ in used], inputs, [c for _, c in used]))


def _run(fn, inputs, cotangents):
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.detach() for o in outputs], _grads(outputs, inputs, cotangents)


def _run_forward(fn, inputs, _cotangents):
    outputs = fn(*inputs)
    return list(outputs if isinstance(outputs, tuple) else (outputs,)), []


# op name -> (input shapes, input scales, call(*inputs), eager(*inputs), reference(*float64 inputs), differentiable)
CASES = {
    "atm_attention": dict(shapes=[(2, 7, 3, 8), (2, 13, 3, 8), (2, 13, 3, 8)],
                          call=lambda q, k, v: segvit.ops.atm_attention(q, k, v),
                          eager=lambda q, k, v: atm_mod.eager(q, k, v, scale=8 ** -0.5, dropout_p=0.0),
                          reference=lambda q, k, v: atm_mod.reference(q, k, v)),
    "query_pool_attention": dict(shapes=[(2, 35, 16), (48, 16), (48,)], scales=[1.0, 0.25, 0.1],
                                 call=lambda x, w, b: segvit.ops.query_pool_attention(x, (5, 7), w, b, 2),
                                 eager=lambda x, w, b: qp_mod.eager(x, (5, 7), w, b, 2),
                                 reference=lambda x, w, b: qp_mod.reference(x, (5, 7), w, b, 2)),
    "mask_classify": dict(shapes=[(2, 6, 5), (2, 6, 5, 7)], grad=False,
                          call=lambda c, m: segvit.ops.mask_classify(c, m, (13, 9)),
                          eager=lambda c, m: mc_mod.eager(c, m, (13, 9)),
                          reference=lambda c, m: mc_mod.reference(c, m, (13, 9))),
}


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("backend,low", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_lower_precision_ops_under_autocast(name, backend, low, kind):
    case = CASES[name]
    grad = case.get("grad", True)
    inputs = _leaves(case["shapes"], kind, low, case.get("scales"))
    if not grad:
        inputs = [t.detach() for t in inputs]
    refs = [t.detach().double().requires_grad_(grad) for t in inputs]
    with torch.no_grad():
        ref_out = case["reference"](*refs)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    cotangents = [torch.randn_like(o) for o in ref_out]
    if grad:
        ref_outs, ref_grads = _run(case["reference"], refs, cotangents)
    else:
        ref_outs, ref_grads = list(ref_out), []
    runner = _run if grad else _run_forward
    with torch.autocast("cpu", dtype=low):
        eager_outs, eager_grads = runner(case["eager"], inputs, cotangents)
        with segvit.ops.use_backend(backend):
            outs, grads = runner(case["call"], inputs, cotangents)
    for i, (out, e, r) in enumerate(zip(outs, eager_outs, ref_outs, strict=True)):
        assert out.dtype == low, f"{name} output {i}: autocast {low} gives {out.dtype}"
        _within(f"{name} output {i}", out, e, r, FLOOR[low])
    for i, (g, e, r, x) in enumerate(zip(grads, eager_grads, ref_grads, inputs[:len(grads)], strict=True)):
        assert g.dtype == x.dtype, f"{name} grad {i}: {g.dtype} for a {x.dtype} input"
        _within(f"{name} grad {i}", g, e, r, FLOOR[low])


def _within(what, actual, eager, expected, floor):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (or NaN poison left)"
    err, eager_err = max_err(actual, expected), max_err(eager, expected)
    scale = max(1.0, expected.abs().max().item())
    assert err <= FACTOR * eager_err + floor * scale, (
        f"{what}: error {err:.3g}, eager under autocast {eager_err:.3g}, bound {FACTOR:g}x + {floor * scale:.3g}")


@pytest.mark.parametrize("kind", ["float32", "low"])
@pytest.mark.parametrize("backend,low", BACKENDS)
def test_mask_losses_stay_float32_under_autocast(backend, low, kind):
    (logits,) = _leaves([(2, 5, 6, 7)], kind, low, [2.0])
    labels = torch.randint(0, 5, (2, 17, 15))
    labels[0, :3] = 255
    labels[1][labels[1] == 2] = 4  # a class absent from one image
    ref_logits = logits.detach().double().requires_grad_()
    ref = ml_mod.reference(ref_logits, labels)
    ref_grad, = torch.autograd.grad(ref[0] + 0.5 * ref[1], ref_logits)
    with torch.autocast("cpu", dtype=low):
        eager = ml_mod.eager(logits, labels)
        eager_grad, = torch.autograd.grad(eager[0] + 0.5 * eager[1], logits)
        with segvit.ops.use_backend(backend):
            ours = segvit.ops.mask_losses(logits, labels)
        grad, = torch.autograd.grad(ours[0] + 0.5 * ours[1], logits)
    assert [t.dtype for t in ours] == [torch.float32, torch.float32, torch.int64]
    assert int(ours[2]) == int(ref[2])
    assert grad.dtype == logits.dtype
    for what, a, e, r in [("focal", ours[0], eager[0], ref[0]), ("dice", ours[1], eager[1], ref[1]),
                          ("grad", grad, eager_grad, ref_grad)]:
        floor = LOSS_FLOOR if what != "grad" or kind == "float32" else FLOOR[low]
        _within(f"mask_losses {what}", a, e, r, floor)


@pytest.mark.parametrize("backend,low", BACKENDS)
def test_compiled_ops_under_autocast_keep_the_eager_dtypes(backend, low):
    # torch.compile(fullgraph=True) traces every custom op through its fake kernel: a fake that states another dtype
    # than the real kernel returns makes the compiled outputs (or their gradients) differ from the eager call's.
    x, w, b = _leaves(CASES["query_pool_attention"]["shapes"], "mixed", low, [1.0, 0.25, 0.1])
    q, k, v = _leaves(CASES["atm_attention"]["shapes"], "mixed", low)
    cls, masks = (t.detach() for t in _leaves(CASES["mask_classify"]["shapes"], "mixed", low))

    def fn(x, w, b, q, k, v):
        pooled = segvit.ops.query_pool_attention(x, (5, 7), w, b, 2)
        out, sim = segvit.ops.atm_attention(q, k, v)
        with torch.no_grad():
            scores = segvit.ops.mask_classify(cls, masks, (13, 9))
        return pooled, out, sim, scores

    inputs = (x, w, b, q, k, v)
    with segvit.ops.use_backend(backend), torch.autocast("cpu", dtype=low):
        expected = fn(*inputs)
        actual = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
        loss = lambda outs: sum(o.float().square().sum() for o in outs[:3])  # noqa: E731
        expected_grads = torch.autograd.grad(loss(expected), inputs)
        actual_grads = torch.autograd.grad(loss(actual), inputs)
    assert [t.dtype for t in actual] == [t.dtype for t in expected] == [low] * 4
    assert [g.dtype for g in actual_grads] == [g.dtype for g in expected_grads] == [t.dtype for t in inputs]
    for a, e in zip(actual + actual_grads, expected + expected_grads):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)


def _fake_and_real(op, *args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    return [(t.dtype, tuple(t.shape)) for t in real], [(t.dtype, tuple(t.shape)) for t in fake]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_fake_kernel_states_the_real_dtypes(dtype):
    """The fake kernels of the custom ops (C++ and Triton) against the real ones, for each input dtype they take,
    called inside autocast (a direct call: the op is its own boundary)."""
    ok, why = _extension.status()
    ops = torch.ops.segvit
    x, w, b = (torch.randn(*s).to(dtype) for s in [(2, 35, 16), (48, 16), (48,)])
    q, k, v = (torch.randn(2, n, 2, 8).to(dtype) for n in (7, 13, 13))
    cls, masks = torch.randn(2, 6, 5).to(dtype), torch.randn(2, 6, 5, 7).to(dtype)
    logits, labels = torch.randn(2, 5, 6, 7).to(dtype), torch.randint(0, 5, (2, 17, 15))
    calls = []
    if ok and dtype != torch.float16:  # the cpp kernels take float32 and bfloat16
        calls += [(ops.atm_attention_fwd, q, k, v, 0.3), (ops.query_pool_attention_fwd, x, [5, 7], w, b, 2, 2),
                  (ops.mask_classify, cls, masks, [13, 9])]
    if _common.INTERPRET and dtype != torch.bfloat16:  # the interpreter's bfloat16 is wrong (module docstring)
        importlib.import_module("segvit.kernels.mask_classify")  # registers its op (imported lazily by segvit.ops)
        importlib.import_module("segvit.kernels.mask_losses")
        calls += [(ops.triton_atm_attention, q, k, v, 0.3, 0.0), (ops.triton_query_pool_attention, x, [5, 7], w, b,
                   2, 2), (ops.triton_mask_classify, cls, masks, [13, 9]),
                  (ops.triton_mask_losses, logits, labels, 255, 0.25, 2.0)]
    if not calls:
        pytest.skip(f"no kernel here takes {dtype} ({why if not ok else 'interpreter off'})")
    for autocast_dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=autocast_dtype):
            for op, *args in calls:
                real, fake = _fake_and_real(op, *args)
                assert real == fake, f"{op}: real {real}, fake {fake} ({dtype} inputs, {autocast_dtype} autocast)"
                if op is not getattr(ops, "triton_mask_losses", None):  # a loss: float32 (the FLOAT32 rule)
                    assert real[0][0] == dtype, f"{op}: {real[0][0]} output for {dtype} inputs inside autocast"


def test_dtype_errors_inside_and_outside_autocast():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(as q\), got torch.bfloat16 "
                                        r"\(mixed dtypes are cast only inside torch.autocast\)"):
        segvit.ops.atm_attention(q, q.bfloat16(), q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, sim = segvit.ops.atm_attention(q, q.bfloat16(), q)  # cast, not an error
        assert out.dtype == sim.dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"k: expected dtype torch.bfloat16 \(as q\), got torch.float64"):
            segvit.ops.atm_attention(q, q.double(), q)  # float64 is never cast, as autocast does


def test_inputs_on_two_devices_are_named():
    # The device check comes before any cast or dispatch, inside autocast too ("meta" stands in for a second device).
    meta = dict(device="meta")
    calls = [("k", lambda: segvit.ops.atm_attention(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8, **meta),
                                                    torch.randn(1, 3, 2, 8))),
             ("in_proj_bias", lambda: segvit.ops.query_pool_attention(
                 torch.randn(1, 6, 4), (2, 3), torch.randn(12, 4), torch.randn(12, **meta), 2)),
             ("mask_logits", lambda: segvit.ops.mask_classify(torch.randn(1, 2, 3), torch.randn(1, 2, 3, 3, **meta),
                                                              (4, 4))),
             ("labels", lambda: segvit.ops.mask_losses(torch.randn(1, 2, 3, 3), torch.zeros(1, 4, 4, dtype=torch.long,
                                                                                             **meta)))]
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for name, call in calls:
                with pytest.raises(ValueError, match=rf"{name}: expected device cpu \(as \w+\), got meta"):
                    call()


# ------------------------------------------------------------------------------------------------- the models

def _set_dropout(model, p):
    """The decoder's dropout (attention weights and residual branches) and the backbone's drop path set to ``p``
    (the backbone's attention dropout is 0 in every published config)."""
    for module in model.head.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for name in ("dropout", "attn_drop"):  # nn.MultiheadAttention's and ATMAttention's float rates
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)
    for block in model.backbone.blocks:
        block.drop_path.p = p


def _step(model, images, labels, dtype=None):
    """One training step's loss (float) and the parameters' gradients, under autocast when ``dtype`` is given."""
    model.zero_grad()
    criterion = segvit.SegViTLoss.for_model(model)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(images)
        losses = criterion(out, labels)
        loss = sum(losses.values())
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _model(make_config, head):
    return segvit.build_model(make_config(head=head, img_size=48, num_classes=4, drop_path_rate=0.1))


def _data():
    images = torch.randn(2, 3, 48, 48)
    labels = torch.randint(0, 4, (2, 48, 48))
    labels[0, :7] = 255
    return images, labels


@pytest.mark.parametrize("backend,low", BACKENDS)
@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_model_training_step_under_autocast_with_dropout(make_config, head, backend, low):
    model = _model(make_config, head).train()
    _set_dropout(model, 0.1)  # the published rate, in the decoder's attention and residuals (and drop path)
    images, labels = _data()
    with segvit.ops.use_backend(backend):
        loss, grads = _step(model, images, labels, low)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name == "backbone.cls_token":  # never reaches the output (tests/test_models.py)
            continue
        g = grads.get(name)
        assert g is not None and g.dtype == torch.float32, f"{name}: gradient {None if g is None else g.dtype}"
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


@pytest.mark.parametrize("backend,low", BACKENDS)
@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_model_under_autocast_tracks_float32(make_config, head, backend, low):
    # Dropout off, so the float32 step and the autocast step compute the same function: the low-precision loss and
    # gradients stay close to float32 (loss within 3 %, every parameter group's gradient direction within 0.98).
    model = _model(make_config, head).train()
    _set_dropout(model, 0.0)
    images, labels = _data()
    with segvit.ops.use_backend(backend):
        loss32, grads32 = _step(model, images, labels)
        grads32 = {n: g.clone() for n, g in grads32.items()}
        loss_low, grads_low = _step(model, images, labels, low)
    assert abs(loss_low.item() - loss32.item()) <= 0.03 * abs(loss32.item())
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat_low = torch.cat([grads_low[n].flatten() for n in grads32])
    cosine = torch.nn.functional.cosine_similarity(flat32, flat_low, dim=0).item()
    assert cosine >= 0.98, f"gradient cosine similarity {cosine:.4f} between float32 and {low} autocast"


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("backend,low", BACKENDS)
@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_model_predict_under_autocast(make_config, head, backend, low, mode):
    model = _model(make_config, head).eval()
    images = torch.randn(1, 3, 48, 56)
    with torch.no_grad(), segvit.ops.use_backend(backend):
        expected = model.predict(images, mode=mode)
        with torch.autocast("cpu", dtype=low):
            scores = model.predict(images, mode=mode)
    assert scores.shape == expected.shape == (1, 4, 48, 56) and torch.isfinite(scores).all()
    assert scores.dtype in (low, torch.float32)
    # Scores are sums of (probability x sigmoid) over the queries: low precision moves them by ~1e-2 at most.
    assert (scores.float() - expected).abs().max().item() <= 5e-2
    agree = (scores.float().argmax(1) == expected.argmax(1)).float().mean().item()
    assert agree >= 0.9, f"{agree:.1%} of the pixels keep their float32 class under {low} autocast"
