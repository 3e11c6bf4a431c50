"""The Triton launches of the published models, run through the real launchers in compile-only mode.

A ``LaunchCase`` is one op call at the shape a published configuration gives it (``segvit.list_models()``), at a
batch, a dtype and, for the ATM attention, a dropout rate; ``run()`` calls the op's Triton entry point (the one
``segvit.ops`` dispatches to) with CPU tensors of that shape, forward and, for training ops, backward, tagging the
launches with the case and the pass. Under ``compile_only(arch)`` this compiles exactly what a GPU would compile
for the call (launch-time specialization, autotune pruning, every config the autotuner may pick) and records it.

Which op runs where in the models:
- ``atm_attention``: every decoder layer, (B, K queries, H, D) over (B, (S/16)^2 tokens, H, D); inference runs it
  without grad and dropout 0, training forward+backward with the published attention dropout 0.1 (0 is also
  compiled: fine-tuning and the dropout-off tests).
- ``mask_classify``: inference, (B, K, K+1) class logits and (B, K, S/16, S/16) mask logits to (S, S).
- ``mask_losses``: training, forward+backward at the label size S with ~10 classes present per image.
- ``query_pool_attention``: the Shrunk backbones' query-pooling block, forward+backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from segvit.kernels.compile_only import tag

BATCHES = (1, 8)
DTYPES = ("bf16", "fp32")
TRAIN_DROPOUT = 0.1
PRESENT_PER_IMAGE = 10  # classes present in an ADE20K training crop: about 8-15
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LaunchCase:
    op: str
    model: str
    batch: int
    dtype: str
    shape: dict
    dropout: float = 0.0
    backward: bool = False
    key: tuple = field(default=())  # what the launches depend on: cases with equal keys launch the same kernels

    @property
    def name(self) -> str:
        mode = "fwd+bwd" if self.backward else "fwd"
        drop = f" p={self.dropout:g}" if self.op == "atm_attention" else ""
        return f"{self.op} {self.model.replace('segvit_', '')} B{self.batch} {self.dtype} {mode}{drop}"

    def run(self) -> None:
        """The op's launches at this case (CPU tensors: under ``compile_only`` nothing runs on a device)."""
        inputs, forward, seed, extra = RUNNERS[self.op]
        with tag(case=self.name, op=self.op, model=self.model, batch=self.batch, dtype=self.dtype,
                 dropout=self.dropout, **{k: v for k, v in self.shape.items() if isinstance(v, (int, float))},
                 **extra):
            with tag(pass_=None):  # building the inputs is not part of the op
                tensors, leaves = inputs(self, "cpu")
            with tag(pass_="fwd"):
                outputs = forward(self, *tensors)
            if self.backward:
                with tag(pass_=None):
                    grads = _incoming_grads(outputs, seed)
                with tag(pass_="bwd"):
                    torch.autograd.grad(outputs, leaves, grads)

    def callable_on(self, device, backward: bool):
        """A no-argument function that runs the op at this case on ``device`` (forward, and the backward when
        ``backward``), its inputs and incoming gradients made once: what a timer calls."""
        inputs, forward, seed, _ = RUNNERS[self.op]
        tensors, leaves = inputs(self, device)
        if not backward:
            def call():
                with torch.set_grad_enabled(False):
                    return forward(self, *tensors)
            return call
        grads = _incoming_grads(forward(self, *tensors), seed)

        def call_with_backward():
            return torch.autograd.grad(forward(self, *tensors), leaves, grads)
        return call_with_backward


def model_shapes(name: str) -> dict:
    import segvit

    cfg = segvit.published_config(name)["model"]
    head, backbone = cfg["decode_head"], cfg["backbone"]
    grid = head["img_size"] // backbone["patch_size"]
    return dict(classes=head["num_classes"], heads=head["num_heads"], head_dim=head["embed_dims"] // head["num_heads"],
                img=head["img_size"], grid=grid, channels=backbone["embed_dims"],
                backbone_heads=backbone["num_heads"], shrunk=backbone.get("type") == "vit_shrink")


def published_cases(models=None, batches=BATCHES, dtypes=DTYPES) -> list[LaunchCase]:
    """Every (op, model, batch, dtype, dropout) the published models launch, one case per distinct shape key."""
    import segvit

    cases, seen = [], set()

    def add(case: LaunchCase):
        if case.key not in seen:
            seen.add(case.key)
            cases.append(case)

    for model in models or segvit.list_models():
        s = model_shapes(model)
        for batch in batches:
            for dtype in dtypes:
                atm = (batch, s["classes"], s["grid"] ** 2, s["heads"], s["head_dim"], dtype)
                for dropout, backward in ((0.0, False), (0.0, True), (TRAIN_DROPOUT, True)):
                    add(LaunchCase("atm_attention", model, batch, dtype, s, dropout, backward,
                                   ("atm",) + atm + (dropout, backward)))
                add(LaunchCase("mask_classify", model, batch, dtype, s,
                               key=("mc", batch, s["classes"], s["grid"], s["img"], dtype)))
                add(LaunchCase("mask_losses", model, batch, dtype, s, backward=True,
                               key=("ml", batch, s["classes"], s["grid"], s["img"], dtype)))
                if s["shrunk"]:
                    add(LaunchCase("query_pool_attention", model, batch, dtype, s, backward=True,
                                   key=("qp", batch, s["grid"], s["channels"], s["backbone_heads"], dtype)))
    return cases


def _randn(shape, dtype, seed, scale=1.0, grad=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=TORCH_DTYPES[dtype])
    return t.requires_grad_(grad)


def training_labels(batch: int, size: int, classes: int, present: int = PRESENT_PER_IMAGE, seed: int = 0,
                    ignore_index: int = 255) -> torch.Tensor:
    """(B, S, S) int64 labels with ``present`` classes per image in 8 x 8 blocks and an ignored bottom band."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(batch, size, size, dtype=torch.int64)
    cell = math.ceil(size / 8)
    for b in range(batch):
        chosen = torch.randperm(classes, generator=g)[:present]
        blocks = chosen[torch.randperm(64, generator=g) % len(chosen)].view(8, 8)
        out[b] = blocks.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:size, :size]
        out[b, size - size // 16:] = ignore_index
    return out


def _incoming_grads(outputs, seed):
    return [_randn(o.shape, "fp32", seed + i, device=o.device).to(o.dtype) for i, o in enumerate(outputs)]


# Each op: inputs(case, device) -> (tensors, the leaves its backward differentiates), forward(case, *tensors) ->
# the outputs the backward starts from, and the seed of the incoming gradients.

def _atm_inputs(case: LaunchCase, device):
    s, B = case.shape, case.batch
    q, k, v = (_randn((B, n, s["heads"], s["head_dim"]), case.dtype, seed, grad=case.backward, device=device)
               for n, seed in ((s["classes"], 1), (s["grid"] ** 2, 2), (s["grid"] ** 2, 3)))
    return (q, k, v), (q, k, v)


def _atm_forward(case: LaunchCase, q, k, v):
    from segvit.kernels import atm_attention

    with torch.set_grad_enabled(case.backward):
        return atm_attention.atm_attention(q, k, v, scale=case.shape["head_dim"] ** -0.5, dropout_p=case.dropout)


def _mask_classify_inputs(case: LaunchCase, device):
    s, B = case.shape, case.batch
    cls = _randn((B, s["classes"], s["classes"] + 1), case.dtype, 5, scale=3.0, device=device)
    masks = _randn((B, s["classes"], s["grid"], s["grid"]), case.dtype, 6, scale=3.0, device=device)
    return (cls, masks), ()


def _mask_classify_forward(case: LaunchCase, cls, masks):
    from segvit.kernels import mask_classify

    with torch.no_grad():
        return (mask_classify.mask_classify(cls, masks, (case.shape["img"], case.shape["img"])),)


def _mask_losses_inputs(case: LaunchCase, device):
    s, B = case.shape, case.batch
    logits = _randn((B, s["classes"], s["grid"], s["grid"]), case.dtype, 7, scale=3.0, grad=True, device=device)
    labels = training_labels(B, s["img"], s["classes"], seed=8).to(device)
    return (logits, labels), (logits,)


def _mask_losses_forward(case: LaunchCase, logits, labels):
    from segvit.kernels import mask_losses

    focal, dice, _ = mask_losses.mask_losses(logits, labels, ignore_index=255, alpha=0.25, gamma=2.0)
    return focal, dice


def _query_pool_inputs(case: LaunchCase, device):
    s, B, C = case.shape, case.batch, case.shape["channels"]
    x = _randn((B, s["grid"] ** 2, C), case.dtype, 10, grad=True, device=device)
    w = _randn((3 * C, C), case.dtype, 11, scale=C ** -0.5, grad=True, device=device)
    bias = _randn((3 * C,), case.dtype, 12, scale=0.1, grad=True, device=device)
    return (x, w, bias), (x, w, bias)


def _query_pool_forward(case: LaunchCase, x, w, bias):
    from segvit.kernels import query_pool_attention

    s = case.shape
    return (query_pool_attention.query_pool_attention(x, [s["grid"], s["grid"]], w, bias, s["backbone_heads"],
                                                      stride=2),)


# op -> (inputs, forward, seed of the incoming gradients, tags of the launches)
RUNNERS = {"atm_attention": (_atm_inputs, _atm_forward, 4, {}),
           "mask_classify": (_mask_classify_inputs, _mask_classify_forward, 0, {}),
           "mask_losses": (_mask_losses_inputs, _mask_losses_forward, 9, {"present": PRESENT_PER_IMAGE}),
           "query_pool_attention": (_query_pool_inputs, _query_pool_forward, 13, {})}
