"""The fused ops of SegViT and their backend dispatch.

Every op has an ``eager`` backend (the original's math in plain ATen ops) and, where built, fused backends
(``cpp``: CPU kernels of the extension; ``triton`` and ``cuda`` on GPUs). ``auto`` (the default) picks the
fastest backend that takes the inputs; see ``available_backends()`` and ``python -m segvit.info``.
"""
from segvit.ops._dispatch import BACKENDS, available_backends, get_backend, use_backend
from segvit.ops.atm_attention import atm_attention
from segvit.ops.mask_classify import mask_classify
from segvit.ops.mask_losses import mask_losses
from segvit.ops.query_pool_attention import query_pool_attention

# The extension (cpp/cuda backends) loads now, once the op modules whose autograd formulas it registers exist: a
# first load inside a torch.compile/torch.export trace cannot work (segvit/_extension.py). Without a build this
# only records why (segvit.ops.available_backends()).
from segvit import _extension as _ext  # noqa: E402
from segvit.ops import _flops  # noqa: E402

_ext.load()
# FLOP formulas of the custom ops, so FlopCounterMode counts the fused backends as it counts eager.
_flops.register()
del _ext

__all__ = ["BACKENDS", "available_backends", "get_backend", "use_backend", "atm_attention", "mask_classify",
           "mask_losses", "query_pool_attention"]
