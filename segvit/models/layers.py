"""Small building blocks shared by the backbone and the heads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at +-2 (absolute bounds, as timm and mmcv use them)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


class GradCheckpointing:
    """Mixin of the modules with a loop of blocks (the backbone, each decoder stage): with
    ``set_grad_checkpointing(True, every=k)``, every k-th block (0, k, 2k, ...) of the loop runs under
    ``torch.utils.checkpoint`` (non-reentrant) when gradients are recorded: its activations are freed after the
    forward and recomputed in the backward. The checkpoint stashes and restores the RNG states (CPU and the inputs'
    devices) and the autocast state, so the recompute draws the same dropout and drop-path masks, and the fused ops'
    dropout seeds (drawn from torch's CPU generator), as the forward did: gradients equal the plain step's."""

    grad_checkpointing_every: int = 0

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int (checkpoint every k-th block), got {every!r}")
        self.grad_checkpointing_every = every if enable else 0

    def run_block(self, index: int, fn, *args):
        """``fn(*args)``, checkpointed when block ``index`` is one of the checkpointed blocks."""
        every = self.grad_checkpointing_every
        if every and index % every == 0 and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``p`` in training and
    rescales the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConfigCheck:
    """Build-time validation of a module's configuration: every error names the config key (``where.key``, e.g.
    ``model.backbone.num_heads``) and the values, before any parameter is made (a bad config would otherwise build
    and fail in its first forward with a raw reshape or kernel error)."""

    def __init__(self, where: str):
        self.where = where

    def _fail(self, key: str, expected: str, value, exc=ValueError):
        raise exc(f"{self.where}.{key}: expected {expected}, got {value!r}")

    def integer(self, key: str, value, minimum: int = 1) -> int:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(key, expected, value, TypeError)
        if value < minimum:
            self._fail(key, expected, value)
        return value

    def pair(self, key: str, value) -> tuple[int, int]:
        """Two positive ints (or one, for both)."""
        expected = "a positive int or two positive ints (H, W)"
        items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
        try:
            h, w = items
        except (TypeError, ValueError):
            self._fail(key, expected, value, TypeError)
        for v in (h, w):
            if isinstance(v, bool) or not isinstance(v, int):
                self._fail(key, expected, value, TypeError)
            if v <= 0:
                self._fail(key, expected, value)
        return h, w

    def number(self, key: str, value, low: float, high: float, *, low_open=False, high_open=False) -> float:
        import math

        expected = (f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                    .replace("inf]", "inf)"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(key, expected, value, TypeError)
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        if not ok:
            self._fail(key, expected, value)
        return float(value)

    def heads(self, key: str, num_heads, dims_key: str, dims: int, max_head_dim: int | None = None) -> int:
        """``num_heads`` a positive int dividing ``dims`` (and, if given, dims / num_heads <= max_head_dim)."""
        num_heads = self.integer(key, num_heads)
        if dims % num_heads:
            raise ValueError(f"{self.where}.{key}: expected a positive int dividing {dims_key}={dims}, got {num_heads}")
        if max_head_dim is not None and dims // num_heads > max_head_dim:
            raise ValueError(f"{self.where}.{key}: head dim {dims_key} / {key} = {dims} / {num_heads} = "
                             f"{dims // num_heads} exceeds {max_head_dim}, the most the ATM attention supports")
        return num_heads
