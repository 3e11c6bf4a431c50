"""Second-order gradients of the fused backends: the eager formula, differentiated again.

The fused kernels' backward passes (C++, Triton, CUDA) compute first-order gradients only: their results carry no
autograd graph, so ``torch.autograd.grad(..., create_graph=True)`` through them would give gradients whose own
gradient is silently zero, or an unrelated error (an ``out=`` ATen op, a backward op without a formula). The
dispatcher therefore runs a fused kernel, whenever an input requires grad, behind one autograd node,
``EagerSecondOrder``, that owns the kernel's autograd graph privately (the outputs it returns are detached from it):

* backward with grad mode off (``loss.backward()``, ``autograd.grad`` without ``create_graph``: every first-order
  use, training included) runs the fused kernel's own backward on that private graph (a nested
  ``torch.autograd.grad`` from the node to the op's inputs) and hands the result on. Nothing is recomputed; the
  private graph is freed with the outer one unless the outer backward retains its graph.
* backward with grad mode on (``create_graph=True``) recomputes the op by its eager formula from the saved inputs
  and differentiates that with ``create_graph=True``, so the returned gradients are differentiable again, exactly
  as on the eager backend and at its cost (the eager formula materializes what the fused kernels avoid). The fused
  backward does not run.

An op may refuse the second-order path with a clear error (``Op.second_order_refusal``): ``atm_attention`` with
dropout, whose fused keep mask the eager formula cannot replay. Under ``torch.compile`` the node is not added
(compiled autograd graphs do not support double backward and say so themselves).
"""
from __future__ import annotations

import torch


def needs_node(args, kwargs) -> bool:
    """Whether a fused call should get the node: grad mode on, some input requiring grad, not compiling."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def attach(op, backend: str, result, args, kwargs):
    """``result`` (a tensor or a tuple of them, as the op returns it) behind the node of op ``op``: the same
    values, detached from the fused graph and attached to the node instead."""
    outputs = result if isinstance(result, tuple) else (result,)
    # Only outputs in the fused graph carry gradients (mask_losses' num_masks is int64); the others pass by.
    diff_out = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not diff_out:
        return result
    tensor_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    spec = _Spec(op, backend, args, kwargs, tensor_args, [outputs[i] for i in diff_out], diff_out)
    wrapped = EagerSecondOrder.apply(spec, *(args[i] for i in tensor_args))
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    new = list(outputs)
    for i, t in zip(diff_out, wrapped):
        new[i] = t
    return tuple(new) if isinstance(result, tuple) else new[0]


class _Spec:
    """The fused outputs (with their graph) and how to rebuild the eager call from the saved input tensors (the
    non-tensor arguments are kept as given)."""

    def __init__(self, op, backend, args, kwargs, tensor_args, fused, diff_out):
        self.op, self.backend = op, backend
        self.args = [None if i in tensor_args else a for i, a in enumerate(args)]
        self.kwargs = kwargs
        self.tensor_args = tensor_args
        self.fused = fused
        self.diff_out = diff_out

    def call_args(self, tensors):
        args = list(self.args)
        for i, t in zip(self.tensor_args, tensors):
            args[i] = t
        return args

    def eager_outputs(self, tensors):
        result = self.op.kernels["eager"].fn(*self.call_args(tensors), **self.kwargs)
        result = result if isinstance(result, tuple) else (result,)
        return [result[i] for i in self.diff_out]


def _keep_graph() -> bool:
    """Whether the running backward retains its graph (``retain_graph=True``); True when torch cannot say."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def _grad(outputs, grads, inputs, wanted, **kwargs):
    """Gradients of ``outputs`` (given their ``grads``, None for an unused one) for ``inputs[i]``, i in ``wanted``,
    as a list over all inputs (None elsewhere)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    found = [None] * len(inputs)
    if wanted and pairs:
        result = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                     allow_unused=True, **kwargs)
        for i, g in zip(wanted, result):
            found[i] = g
    return found


class EagerSecondOrder(torch.autograd.Function):
    """The fused outputs, detached; see the module docstring."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        ctx.spec = spec
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        outs = tuple(o.detach() for o in spec.fused)
        return outs if len(outs) != 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec
        inputs = ctx.saved_tensors
        wanted = [i for i in range(len(inputs)) if ctx.needs_input_grad[1 + i]]
        if not torch.is_grad_enabled():  # first order: the fused kernel's own backward, on its private graph
            if spec.fused is None:
                raise RuntimeError(f"segvit.ops.{spec.op.name}: trying to backward through the graph a second time "
                                   "(specify retain_graph=True the first time)")
            keep = _keep_graph()
            found = _grad(spec.fused, grads, inputs, wanted, retain_graph=keep)
            if not keep:
                spec.fused = None
            return (None, *found)
        refusal = spec.op.second_order_refusal
        why = refusal(*spec.call_args(inputs), **spec.kwargs) if refusal is not None else None
        if why:
            raise RuntimeError(f"segvit.ops.{spec.op.name}: second-order gradients (create_graph=True) are not "
                               f"supported on backend {spec.backend!r} {why}; use segvit.ops.use_backend('eager') "
                               f"for this computation")
        return (None, *_grad(spec.eager_outputs(inputs), grads, inputs, wanted, create_graph=True))
