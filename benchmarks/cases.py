"""The benchmark cases (op and model) and the variants each is timed with.

A ``Case`` knows how to build its inputs (``setup``, seeded, on the device) and lists its ``Variant``s; a variant
turns the inputs into a no-argument callable or raises ``NotAvailable`` with the reason. Shapes come from the
published configurations (``segvit.published_config``), so they cannot drift from the models. The eager baselines
are ``segvit.ops`` under the ``eager`` backend, the same functions the tests check against.

Cases are rebuilt from ``Settings`` alone, so a fresh subprocess (the CPU memory measurement) finds the same case
by its id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import segvit
from segvit.ops import use_backend
from segvit.ops.mask_losses import present_pairs
from segvit.ops.query_pool_attention import pooled_grid

from benchmarks import counts

OPS = ("atm_attention", "mask_classify", "query_pool_attention", "mask_losses")
GROUPS = OPS + ("models",)
FUSED_BACKENDS = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}
MODELS = ("segvit_vit-b16_ade20k_512", "segvit_vit-l16_shrunk_ade20k_640")
# Op shapes: each published configuration whose op shapes differ (the two ViT-L ADE20K 640 models share the ATM
# and mask shapes: one case covers both). Quick mode keeps the ViT-B shapes (and Shrunk ViT-L 640 for query pooling).
SHAPE_CONFIGS = ("segvit_vit-b16_ade20k_512", "segvit_vit-l16_shrunk_ade20k_640", "segvit_vit-l16_cocostuff10k_512",
                 "segvit_vit-l16_pc60_480")
QUICK_SHAPE_CONFIGS = ("segvit_vit-b16_ade20k_512",)
QPA_CONFIGS = ("segvit_vit-l16_shrunk_ade20k_640", "segvit_vit-l16_shrunk_cocostuff10k_512",
               "segvit_vit-l16_shrunk_pc60_480")
QUICK_QPA_CONFIGS = ("segvit_vit-l16_shrunk_ade20k_640",)
# Classes present per training image: ADE20K crops hold about 8-15 classes; 10 per image makes the 20 (image,
# class) masks of issue 4's batch-2 loss case, which set how many masks the loss upsamples.
PRESENT_CLASSES = 10


class NotAvailable(Exception):
    """A variant that cannot run these inputs here; the message says why."""


@dataclass
class Settings:
    device: str = "cpu"
    quick: bool = False
    groups: tuple = GROUPS
    dtypes: tuple = ("float32",)
    # model cases: published names, or {"name": ..., "model": <config dict>} (tests use a tiny one); None: MODELS
    # (quick on the CPU: the ViT-B one)
    models: tuple | None = None


@dataclass
class Variant:
    name: str
    # make(state, check=True) -> fn() returning the tensors the call produced; with check, runs fn once (the
    # first warm-up) and raises NotAvailable if the variant refuses the inputs
    make: Callable


@dataclass
class Case:
    id: str
    group: str  # op name or "models"
    label: str  # human description of the shape
    mode: str  # "fwd", "fwd+bwd", "fwd+bwd-dropout0.1" (atm_attention), "predict", "train"
    dtype: str
    batch: int
    setup: Callable  # () -> state (inputs on the device)
    variants: list = field(default_factory=list)
    flops: int | None = None
    bytes: int | None = None
    heavy: bool = False  # model cases: fewer rounds, memory measured on the first call


def _dtype(name):
    return getattr(torch, name)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, device, seed, requires_grad=False, scale=1.0):
    t = (torch.randn(shape, generator=_generator(seed)) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def blob_labels(batch, size, classes, seed, present=PRESENT_CLASSES, ignore_index=255):
    """Piecewise-constant labels (B, S, S): ``present`` classes per image in 8 x 8 blocks plus an ignored band at
    the bottom (the padding of a crop), as training labels look; deterministic in ``seed``. The compile report's and
    the cost model's labels (``segvit.kernels.launch_cases.training_labels``), so both see the same inputs."""
    from segvit.kernels.launch_cases import training_labels

    return training_labels(batch, size, classes, present=present, seed=seed, ignore_index=ignore_index)


def _head_shape(name):
    cfg = segvit.published_config(name)["model"]
    head, backbone = cfg["decode_head"], cfg["backbone"]
    grid = head["img_size"] // backbone["patch_size"]
    return dict(classes=head["num_classes"], heads=head["num_heads"], dim=head["embed_dims"], img=head["img_size"],
                grid=grid, channels=backbone["embed_dims"], backbone_heads=backbone["num_heads"])


def _short(name):
    return name.replace("segvit_", "")


def _batch(settings, group):
    if settings.device == "cuda":
        return 8
    # CPU: issue 4's shapes, batch 2 for the attention and the losses, 1 elsewhere (a ViT-L training step alone
    # takes tens of seconds, and the default run must fit in 10 minutes on 2 cores)
    return 2 if group in ("atm_attention", "mask_losses") else 1


def _grads_call(outputs_fn, inputs, grad_outputs):
    """Forward then the gradients of the inputs (torch.autograd.grad: nothing accumulates between calls)."""
    return torch.autograd.grad(outputs_fn(), inputs, grad_outputs)


def _backend_variant(name, call):
    """A segvit.ops backend: ``call(state)`` runs the op (forward or forward+backward) under backend ``name``."""

    def make(state, check=True):
        def fn():
            with use_backend(name):
                return call(state)

        if not check:
            return fn
        try:
            fn()
        except RuntimeError as exc:
            if "cannot run these inputs" in str(exc):
                raise NotAvailable(str(exc).split("cannot run these inputs: ", 1)[-1]) from None
            raise
        return fn

    return Variant(name, make)


def _plain_variant(name, call):
    def make(state, check=True):
        return lambda: call(state)

    return Variant(name, make)


def backend_status():
    """``segvit.ops.available_backends()``; a broken build (the extension fails to load) makes every backend but
    eager n/a with the error, rather than ending the run."""
    try:
        return segvit.ops.available_backends()
    except Exception as exc:
        reason = f"available_backends() failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return {b: ("available" if b == "eager" else reason) for b in segvit.ops.BACKENDS}


def _fused_variants(settings, call):
    status = backend_status()
    variants = []
    for backend in FUSED_BACKENDS[settings.device]:
        if status.get(backend) != "available":
            reason = status.get(backend)

            def make(state, check=True, reason=reason):
                raise NotAvailable(reason)

            variants.append(Variant(backend, make))
        else:
            variants.append(_backend_variant(backend, call))
    return variants


# ---------------------------------------------------------------- atm_attention

ATM_TRAIN_DROPOUT = 0.1  # the decoder's attention dropout in every published config

def atm_torch(q, k, v, scale, dropout_p=0.0):
    """The careful plain-PyTorch composition: SDPA for the output (never the (B, H, Nq, Nk) probabilities in the
    fused SDPA kernels) and one full-channel product for the head-mean similarity (sum_h q_h k_h^T is the product
    of the (Nq, H*D) and (Nk, H*D) matrices)."""
    heads = q.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                         dropout_p=dropout_p)
    sim = (q.flatten(2) @ k.flatten(2).transpose(1, 2)) * (scale / heads)
    return out.transpose(1, 2), sim


def atm_xformers(q, k, v, scale, dropout_p=0.0):
    import xformers.ops as xops

    heads = q.shape[2]
    out = xops.memory_efficient_attention(q, k, v, p=dropout_p, scale=scale)  # takes (B, N, H, D) as it is
    sim = (q.flatten(2) @ k.flatten(2).transpose(1, 2)) * (scale / heads)
    return out, sim


def _atm_cases(settings, dtype, configs):
    cases = []
    batch = _batch(settings, "atm_attention")
    elem = _dtype(dtype).itemsize
    for name in configs:
        s = _head_shape(name)
        queries, keys, heads, head_dim = s["classes"], s["grid"] ** 2, s["heads"], s["dim"] // s["heads"]
        scale = head_dim ** -0.5
        # What training runs is forward+backward with the published attention dropout (0.1): the fused kernels
        # regenerate the keep mask in both backward passes, eager stores the dropped probabilities.
        for backward, p in ((False, 0.0), (True, 0.0), (True, ATM_TRAIN_DROPOUT)):
            def setup(backward=backward, queries=queries, keys=keys, heads=heads, head_dim=head_dim, seed=len(cases)):
                dev, dt = settings.device, _dtype(dtype)
                q = _randn((batch, queries, heads, head_dim), dt, dev, seed, backward)
                k = _randn((batch, keys, heads, head_dim), dt, dev, seed + 1, backward)
                v = _randn((batch, keys, heads, head_dim), dt, dev, seed + 2, backward)
                grads = (_randn((batch, queries, heads, head_dim), dt, dev, seed + 3),
                         _randn((batch, queries, keys), dt, dev, seed + 4))
                return dict(q=q, k=k, v=v, grads=grads)

            def wrap(forward, backward=backward):
                if not backward:
                    return lambda st: forward(st["q"], st["k"], st["v"])
                return lambda st: _grads_call(lambda: forward(st["q"], st["k"], st["v"]),
                                              (st["q"], st["k"], st["v"]), st["grads"])

            op_call = wrap(lambda q, k, v, scale=scale, p=p: segvit.ops.atm_attention(q, k, v, scale=scale,
                                                                                       dropout_p=p))
            variants = [_backend_variant("eager", op_call),
                        _plain_variant("torch (sdpa+matmul)",
                                       wrap(lambda q, k, v, scale=scale, p=p: atm_torch(q, k, v, scale, p)))]
            if settings.device == "cuda":
                variants.append(_xformers_variant(wrap(lambda q, k, v, scale=scale, p=p: atm_xformers(q, k, v, scale,
                                                                                                      p))))
            variants += _fused_variants(settings, op_call)
            flops, moved = counts.atm_attention(batch, queries, keys, heads, head_dim, backward=backward, elem=elem)
            mode = ("fwd+bwd" if backward else "fwd") + (f"-dropout{p:g}" if p else "")
            cases.append(Case(f"atm_attention/{_short(name)}/{mode}/{dtype}", "atm_attention",
                              f"{_short(name)}: B{batch} Nq{queries} Nk{keys} H{heads} D{head_dim}", mode, dtype,
                              batch, setup, variants, flops, moved))
    return cases


def _xformers_variant(call):
    def make(state, check=True):
        try:
            import xformers.ops  # noqa: F401
        except ImportError as exc:
            raise NotAvailable(f"xformers not installed ({exc})") from None
        fn = lambda: call(state)  # noqa: E731
        try:
            fn()
        except Exception as exc:  # xformers raises NotImplementedError or ValueError listing its reasons
            raise NotAvailable(f"xformers: {str(exc).splitlines()[0]}") from None
        return fn

    return Variant("xformers", make)


# ---------------------------------------------------------------- mask_classify

def mask_classify_torch(class_logits, mask_logits, out_size):
    """The careful plain-PyTorch composition, one expression (the einsum is one batched product)."""
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1],
                        F.interpolate(mask_logits, size=out_size, mode="bilinear", align_corners=False).sigmoid())


_compiled = {}


def _compile_variant():
    def make(state, check=True):
        try:
            # dynamic=True: one compilation serves every shape (and the memory subprocesses find it in inductor's
            # cache), as for a user with several input sizes; a static compilation per shape costs ~30 s each here
            fn = _compiled.setdefault("mask_classify", torch.compile(mask_classify_torch, dynamic=True))
            run = lambda: fn(state["class_logits"], state["mask_logits"], state["out_size"])  # noqa: E731
            run()  # compiles now, not inside the timing
        except Exception as exc:  # inductor needs a C++ compiler / triton: say what failed
            raise NotAvailable(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") \
                from None
        return run

    return Variant("torch.compile", make)


def _mask_classify_cases(settings, dtype, configs):
    cases = []
    batch = _batch(settings, "mask_classify")
    for name in configs:
        s = _head_shape(name)
        classes, grid, img = s["classes"], s["grid"], s["img"]

        def setup(classes=classes, grid=grid, img=img, seed=100 + len(cases)):
            dev, dt = settings.device, _dtype(dtype)
            return dict(class_logits=_randn((batch, classes, classes + 1), dt, dev, seed, scale=3.0),
                        mask_logits=_randn((batch, classes, grid, grid), dt, dev, seed + 1, scale=3.0),
                        out_size=(img, img))

        op_call = lambda st: segvit.ops.mask_classify(st["class_logits"], st["mask_logits"], st["out_size"])  # noqa
        torch_call = lambda st: mask_classify_torch(st["class_logits"], st["mask_logits"], st["out_size"])  # noqa
        variants = [_backend_variant("eager", op_call), _plain_variant("torch (interp+sigmoid+einsum)", torch_call),
                    _compile_variant()] + _fused_variants(settings, op_call)
        flops, moved = counts.mask_classify(batch, classes, classes, (grid, grid), (img, img),
                                            elem=_dtype(dtype).itemsize)
        cases.append(Case(f"mask_classify/{_short(name)}/fwd/{dtype}", "mask_classify",
                          f"{_short(name)}: B{batch} Q{classes} {grid}x{grid}->{img}x{img}", "fwd", dtype, batch,
                          setup, variants, flops, moved))
    return cases


# ---------------------------------------------------------------- query_pool_attention

def query_pool_torch(x, grid, in_proj_weight, in_proj_bias, num_heads, stride=2):
    """The careful plain-PyTorch composition: q projected for the sampled rows only, k and v in one product over
    all tokens, SDPA."""
    batch, length, channels = x.shape
    sampled = x.unflatten(1, tuple(grid))[:, ::stride, ::stride].flatten(1, 2)
    q = F.linear(sampled, in_proj_weight[:channels], in_proj_bias[:channels])
    kv = F.linear(x, in_proj_weight[channels:], in_proj_bias[channels:])
    k, v = kv.chunk(2, dim=-1)
    heads = lambda t: t.unflatten(-1, (num_heads, channels // num_heads)).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)


def _qpa_cases(settings, dtype, configs):
    cases = []
    batch = _batch(settings, "query_pool_attention")
    for name in configs:
        s = _head_shape(name)
        grid, channels, num_heads = (s["grid"], s["grid"]), s["channels"], s["backbone_heads"]
        tokens, pooled = grid[0] * grid[1], math.prod(pooled_grid(grid))
        for backward in (False, True):
            # every loop value a closure reads is bound as a default: a free variable would see the last config's
            def setup(backward=backward, tokens=tokens, pooled=pooled, channels=channels, seed=200 + len(cases)):
                dev, dt = settings.device, _dtype(dtype)
                x = _randn((batch, tokens, channels), dt, dev, seed, backward)
                w = _randn((3 * channels, channels), dt, dev, seed + 1, backward, scale=channels ** -0.5)
                b = _randn((3 * channels,), dt, dev, seed + 2, backward, scale=0.1)
                return dict(x=x, w=w, b=b, grads=(_randn((batch, pooled, channels), dt, dev, seed + 3),))

            def wrap(forward, backward=backward):
                if not backward:
                    return lambda st: forward(st["x"], st["w"], st["b"])
                return lambda st: _grads_call(lambda: (forward(st["x"], st["w"], st["b"]),),
                                              (st["x"], st["w"], st["b"]), st["grads"])

            op_call = wrap(lambda x, w, b, grid=grid, heads=num_heads: segvit.ops.query_pool_attention(x, grid, w, b,
                                                                                                       heads))
            variants = [_backend_variant("eager", op_call),
                        _plain_variant("torch (linear+sdpa)",
                                       wrap(lambda x, w, b, grid=grid, heads=num_heads: query_pool_torch(x, grid, w, b,
                                                                                                     heads)))]
            variants += _fused_variants(settings, op_call)
            flops, moved = counts.query_pool_attention(batch, tokens, pooled, channels, backward=backward,
                                                       elem=_dtype(dtype).itemsize)
            mode = "fwd+bwd" if backward else "fwd"
            cases.append(Case(f"query_pool_attention/{_short(name)}/{mode}/{dtype}", "query_pool_attention",
                              f"{_short(name)}: B{batch} L{tokens}->{pooled} C{channels} H{num_heads}", mode, dtype,
                              batch, setup, variants, flops, moved))
    return cases


# ---------------------------------------------------------------- mask_losses

def mask_losses_torch(mask_logits, labels, ignore_index=255, alpha=0.25, gamma=2.0):
    """The careful plain-PyTorch composition: upsample the present masks only, boolean targets, the focal and
    dice terms with ``where`` instead of one-hot float products (fewer full-size temporaries than the original)."""
    images, classes = present_pairs(labels, ignore_index)
    count = max(len(classes), 1)
    logits = F.interpolate(mask_logits[images, classes][:, None].float(), size=labels.shape[-2:], mode="bilinear",
                           align_corners=False).flatten(1)
    target = (labels[images] == classes[:, None, None]).flatten(1)
    prob = logits.sigmoid()
    one_minus_pt = torch.where(target, 1 - prob, prob)
    bce = F.softplus(torch.where(target, -logits, logits))
    focal = (torch.where(target, alpha, 1 - alpha) * bce * one_minus_pt ** gamma).mean(-1).sum() / count
    inter = torch.where(target, prob, 0.0).sum(-1)
    dice = (1 - (2 * inter + 1) / (prob.sum(-1) + target.sum(-1) + 1)).sum() / count
    return focal, dice, torch.tensor(count)


def _mask_losses_cases(settings, dtype, configs):
    cases = []
    batch = _batch(settings, "mask_losses")
    for name in configs:
        s = _head_shape(name)
        classes, grid, img = s["classes"], s["grid"], s["img"]
        labels_cpu = blob_labels(batch, img, classes, seed=300 + len(cases))
        pairs = len(present_pairs(labels_cpu, 255)[1])
        for backward in (False, True):
            def setup(backward=backward, classes=classes, grid=grid, labels_cpu=labels_cpu, seed=300 + len(cases)):
                dev, dt = settings.device, _dtype(dtype)
                logits = _randn((batch, classes, grid, grid), dt, dev, seed, backward, scale=3.0)
                return dict(mask_logits=logits, labels=labels_cpu.to(dev))

            def wrap(forward, backward=backward):
                if not backward:
                    return lambda st: forward(st["mask_logits"], st["labels"])

                def call(st):
                    focal, dice, _ = forward(st["mask_logits"], st["labels"])
                    return torch.autograd.grad(focal + dice, st["mask_logits"])

                return call

            op_call = wrap(lambda m, lab: segvit.ops.mask_losses(m, lab))
            variants = [_backend_variant("eager", op_call),
                        _plain_variant("torch (present+where)", wrap(mask_losses_torch))]
            variants += _fused_variants(settings, op_call)
            flops, moved = counts.mask_losses(batch, classes, (grid, grid), (img, img), pairs, backward=backward,
                                              elem=_dtype(dtype).itemsize)
            mode = "fwd+bwd" if backward else "fwd"
            cases.append(Case(f"mask_losses/{_short(name)}/{mode}/{dtype}", "mask_losses",
                              f"{_short(name)}: B{batch} K{classes} {grid}x{grid} labels {img}x{img}, {pairs} masks",
                              mode, dtype, batch, setup, variants, flops, moved))
    return cases


# ---------------------------------------------------------------- models

def _model_cases(settings, precision):
    cases = []
    # GPU: the published configs' 2 images per GPU (ViT-L at 8 x 640 x 640 needs more memory than most GPUs have)
    batch = 1 if settings.device == "cpu" else 2
    autocast = precision == "bf16-autocast"
    models = settings.models or (MODELS[:1] if settings.quick and settings.device == "cpu" else MODELS)
    for spec in models:
        name, cfg = (spec, spec) if isinstance(spec, str) else (spec["name"], spec["model"])
        img = _head_shape(name)["img"] if isinstance(spec, str) else cfg["decode_head"]["img_size"]
        for mode in ("predict", "train"):
            def setup(cfg=cfg, mode=mode, img=img):
                torch.manual_seed(0)
                model = segvit.build_model(cfg).to(settings.device)
                model.train(mode == "train")
                images = _randn((batch, 3, img, img), torch.float32, settings.device, 400)
                labels = blob_labels(batch, img, model.num_classes, seed=401).to(settings.device)
                return dict(model=model, images=images, labels=labels,
                            criterion=segvit.SegViTLoss.for_model(model).to(settings.device))

            def call(st, mode=mode):
                with torch.autocast(settings.device, dtype=torch.bfloat16, enabled=autocast):
                    if mode == "predict":
                        return st["model"].predict(st["images"], mode="whole")
                    st["model"].zero_grad(set_to_none=True)
                    losses = st["criterion"](st["model"](st["images"]), st["labels"])
                    loss = sum(losses.values())
                loss.backward()
                return [p.grad for p in st["model"].parameters() if p.grad is not None]

            def fused_make(state, check=True, call=call):
                segvit.apply_fused_kernels(state["model"])  # the drop-in: backend auto, per call below
                return _backend_variant("auto", call).make(state, check)

            variants = [_backend_variant("eager", call), Variant("fused (auto)", fused_make)]
            what = "predict(whole)" if mode == "predict" else "train step (fwd+loss+bwd)"
            cases.append(Case(f"models/{_short(name)}/{mode}/{precision}", "models", f"{_short(name)}: B{batch} "
                              f"{img}x{img} {what}", mode, precision, batch, setup, variants, heavy=True))
    return cases


def build_cases(settings: Settings) -> list[Case]:
    """Every case of a run, in run order."""
    shapes = QUICK_SHAPE_CONFIGS if settings.quick else SHAPE_CONFIGS
    qpa = QUICK_QPA_CONFIGS if settings.quick else QPA_CONFIGS
    cases = []
    for dtype in settings.dtypes:
        if "atm_attention" in settings.groups:
            cases += _atm_cases(settings, dtype, shapes)
        if "mask_classify" in settings.groups:
            cases += _mask_classify_cases(settings, dtype, shapes)
        if "query_pool_attention" in settings.groups:
            cases += _qpa_cases(settings, dtype, qpa)
        if "mask_losses" in settings.groups:
            cases += _mask_losses_cases(settings, dtype, shapes)
    if "models" in settings.groups:
        precisions = ("float32", "bf16-autocast") if settings.device == "cuda" else ("float32",)
        for precision in precisions:
            cases += _model_cases(settings, precision)
    return cases


def find_case(settings: Settings, case_id: str) -> Case:
    for case in build_cases(settings):
        if case.id == case_id:
            return case
    raise KeyError(case_id)
