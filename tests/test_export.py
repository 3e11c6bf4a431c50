"""torch.export with a dynamic batch, ONNX export checked with onnxruntime, and FlopCounterMode over the model
(issue 13 item 4). torch.compile from a fresh process: tests/test_compile.py."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import segvit
from segvit.export import Predictor, export_onnx, export_program
from segvit.ops import _flops


def _model(make_config, head="ATMHead"):
    return segvit.build_model(make_config(head=head, img_size=32)).eval()


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [out["pred_logits"], out["pred_masks"]] + [t for a in out["aux_outputs"] for t in a.values()]


def _segvit_ops(program) -> set[str]:
    """The torch.ops.segvit calls anywhere in an exported program (predict's no_grad region is a nested graph)."""
    return {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if str(node.target).startswith("segvit.")}


# --- torch.export ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head, predict, mode, size", [("ATMHead", False, None, 32), ("TPNATMHead", True, "whole", 32),
                                                       ("ATMHead", True, "slide", 40)])
def test_export_with_dynamic_batch_matches_eager(make_config, head, predict, mode, size):
    model = _model(make_config, head)
    with segvit.ops.use_backend("auto"):
        program = export_program(model, torch.randn(2, 3, size, size), predict=predict, mode=mode)
    # the default backend's fused kernels stay in the program (the cpp kernels where the extension is built)
    if segvit.ops.available_backends()["cpp"] == "available":
        expected_ops = {"segvit.atm_attention_fwd.default"} | (
            {"segvit.query_pool_attention_fwd.default"} if head == "TPNATMHead" else set()) | (
            {"segvit.mask_classify.default"} if predict else set())
        assert _segvit_ops(program) == expected_ops
    for batch in (1, 3):  # neither is the traced batch of 2
        images = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = _flat(model.predict(images, mode) if predict else model(images))
        actual = _flat(program.module()(images))
        assert actual[0].shape[0] == batch
        for a, e in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)  # the same kernels, traced


def test_export_of_the_eager_backend_holds_no_custom_op(make_config):
    model = _model(make_config)
    with segvit.ops.use_backend("eager"):
        program = torch.export.export(Predictor(model), (torch.randn(2, 3, 32, 32),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert not _segvit_ops(program)


def test_export_helpers_check_their_arguments(make_config):
    model = _model(make_config)
    with pytest.raises(ValueError, match="mode: expected None, 'whole' or 'slide', got 'tiles'"):
        Predictor(model, "tiles")
    with pytest.raises(TypeError, match="model: expected a segvit model with a predict method"):
        Predictor(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode: only applies with predict=True"):
        export_program(model, torch.randn(2, 3, 32, 32), mode="whole")
    with pytest.raises(ValueError, match=r"images: expected an example float tensor \(B, 3, H, W\), got shape \(3, 32"):
        export_program(model, torch.randn(3, 32, 32))


def test_export_from_a_batch_of_one_is_still_dynamic(make_config):
    # torch.export would specialize a size-1 batch to the constant 1; the helper traces a batch of 2 instead.
    model = _model(make_config)
    program = export_program(model, torch.randn(1, 3, 32, 32))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images)["pred_masks"], model(images)["pred_masks"],
                                   rtol=1e-5, atol=1e-6)


# --- ONNX --------------------------------------------------------------------------------------------------------

def test_onnx_export_on_the_default_backend_matches_eager_in_onnxruntime(make_config, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    # Shrunk: all three inference ops (query_pool_attention, atm_attention, mask_classify) are in predict
    model = _model(make_config, "TPNATMHead")
    path = tmp_path / "segvit.onnx"
    with segvit.ops.use_backend("auto"):
        export_onnx(model, torch.randn(2, 3, 32, 32), path, mode="whole")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["scores"]
    # only standard ONNX operators: the fused ops were exported as their eager math
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, {node.domain for node in graph.node}
    assert {"MatMul", "Softmax", "Resize", "Sigmoid"} <= {node.op_type for node in graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch is dynamic
        images = torch.randn(batch, 3, 32, 32)
        (actual,) = session.run(None, {"images": images.numpy()})
        with segvit.ops.use_backend("auto"):
            expected = model.predict(images, "whole")
        # scores are probabilities times sigmoids in [0, 1]: float32 rounding of onnxruntime's own kernels
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-5)


def test_onnx_export_on_an_explicit_fused_backend_says_why_it_cannot(make_config):
    pytest.importorskip("onnxscript")
    if segvit.ops.available_backends()["cpp"] != "available":
        pytest.skip("the cpp backend is not built")
    model = _model(make_config)
    with segvit.ops.use_backend("cpp"), pytest.raises(Exception, match="backend 'cpp' cannot run these inputs: "
                                                                       "torch.onnx.export: the cpp kernel is a custom "
                                                                       "op without an ONNX translation"):
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), dynamo=True, verbose=False)


def test_onnx_export_needs_the_extra(make_config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=r"pip install segvit\[onnx\]"):
        export_onnx(_model(make_config), torch.randn(2, 3, 32, 32))


# --- FlopCounterMode -----------------------------------------------------------------------------------------------

def _flops_by_op(backend, fn):
    with segvit.ops.use_backend(backend), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_flop_counter_over_predict_counts_the_fused_ops_as_eager(make_config, head):
    if segvit.ops.available_backends()["cpp"] != "available":
        pytest.skip("the cpp backend is not built")
    model = _model(make_config, head)
    images = torch.randn(2, 3, 32, 32)
    eager_total, eager_ops = _flops_by_op("eager", lambda: model.predict(images))
    auto_total, auto_ops = _flops_by_op("auto", lambda: model.predict(images))
    fused = {"segvit.atm_attention_fwd", "segvit.mask_classify"} | (
        {"segvit.query_pool_attention_fwd"} if head == "TPNATMHead" else set())
    assert fused <= set(auto_ops) and not any(op.startswith("segvit.") for op in eager_ops)
    assert auto_total == eager_total > 0
    # the mask_classify formula alone: the einsum's bmm, (B, K, Q) @ (B, Q, Hout * Wout) with K = Q = 5
    assert auto_ops["segvit.mask_classify"] == 2 * 2 * 5 * 5 * 32 * 32


def test_flop_counter_over_a_training_step_counts_the_fused_backward_as_eager(make_config):
    if segvit.ops.available_backends()["cpp"] != "available":
        pytest.skip("the cpp backend is not built")
    model = segvit.build_model(make_config(head="TPNATMHead", img_size=32)).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    loss_fn = segvit.SegViTLoss.for_model(model)

    def step():
        sum(loss_fn(model(images), labels).values()).backward()

    eager_total, _ = _flops_by_op("eager", step)
    auto_total, auto_ops = _flops_by_op("auto", step)
    assert {"segvit.atm_attention_bwd", "segvit.query_pool_attention_bwd"} <= set(auto_ops)
    assert auto_total == eager_total > 0


def test_flop_counter_counts_the_triton_ops_as_eager(make_config):
    pytest.importorskip("triton")
    from segvit.kernels import _common

    if not (_common.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs the Triton interpreter or CUDA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(make_config, "TPNATMHead").to(device)
    images = torch.randn(1, 3, 32, 32, device=device)
    eager_total, _ = _flops_by_op("eager", lambda: model.predict(images))
    triton_total, triton_ops = _flops_by_op("triton", lambda: model.predict(images))
    assert {"segvit.triton_atm_attention", "segvit.triton_query_pool_attention",
            "segvit.triton_mask_classify"} <= set(triton_ops)
    assert triton_total == eager_total > 0


def test_flop_formulas_match_the_counted_eager_math():
    # Each formula against FlopCounterMode over the op's eager kernel, at shapes unlike the model's.
    import importlib

    # the modules (segvit.ops.atm_attention etc. are the functions)
    atm_attention, mask_classify, query_pool_attention = (
        importlib.import_module(f"segvit.ops.{name}") for name in ("atm_attention", "mask_classify",
                                                                     "query_pool_attention"))

    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 7, 4, 8)
    x, w, b = torch.randn(2, 35, 12), torch.randn(36, 12), torch.randn(36)
    cls, masks = torch.randn(2, 6, 4), torch.randn(2, 6, 3, 5)
    cases = [(lambda: atm_attention.eager(q, k, k, scale=0.3, dropout_p=0.0),
              _flops.atm_attention_forward(q.shape, k.shape)),
             (lambda: query_pool_attention.eager(x, (5, 7), w, b, 3, stride=2),
              _flops.query_pool_attention_forward(x.shape, (5, 7), 2)),
             (lambda: mask_classify.eager(cls, masks, (9, 11)), _flops.mask_classify_forward(cls.shape, masks.shape,
                                                                                              (9, 11)))]
    for fn, formula in cases:
        with FlopCounterMode(display=False) as counter:
            fn()
        assert counter.get_total_flops() == formula > 0
    # backward: the eager backward with every input requiring grad
    q, k, x, w, b = (t.clone().requires_grad_() for t in (q, k, x, w, b))
    for fn, formula in [(lambda: sum(t.sum() for t in atm_attention.eager(q, k, k, scale=0.3, dropout_p=0.0)),
                         _flops.atm_attention_backward(q.shape, k.shape)),
                        (lambda: query_pool_attention.eager(x, (5, 7), w, b, 3, stride=2).sum(),
                         _flops.query_pool_attention_backward(x.shape, (5, 7), 2))]:
        loss = fn()
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        assert counter.get_total_flops() == formula > 0


def test_the_export_command_writes_a_program_and_a_checked_onnx_model(make_config, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import json

    from segvit.export import main

    whole = {"model": make_config(head="TPNATMHead", img_size=32)}
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(whole))
    model = segvit.build_model(whole).eval()
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    program, onnx_path = tmp_path / "p.pt2", tmp_path / "m.onnx"
    written = main(["--model", str(config), "--checkpoint", str(checkpoint), "--program", str(program),
                    "--onnx", str(onnx_path), "--mode", "whole", "--check"])
    assert written["max_abs_diff"] < 1e-4 and "max |difference|" in capsys.readouterr().out
    images = torch.randn(3, 3, 32, 32)  # the program's batch is dynamic
    torch.testing.assert_close(torch.export.load(str(program)).module()(images), model.predict(images, "whole"),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):  # nothing to write
        main(["--model", str(config), "--checkpoint", str(checkpoint)])
    with pytest.raises(SystemExit):  # --check needs --onnx
        main(["--model", str(config), "--checkpoint", str(checkpoint), "--program", str(program), "--check"])
