"""The original optimizer recipe: AdamW with mmcv 1.4.4's ``paramwise_cfg.custom_keys`` rules, and mmcv's poly
learning-rate schedule with linear warm-up, by iteration.

custom_keys (mmcv ``DefaultOptimizerConstructor``): the keys are sorted alphabetically, then by length, longest
first (stable), and only the FIRST key that is a substring of a parameter's original (mmseg) name applies:
lr = base_lr * lr_mult, weight_decay = base_wd * decay_mult. With SegViT's {head: lr x10, norm: decay 0, ln:
decay 0}, every ``decode_head.*`` parameter gets lr x10 WITH weight decay (its norms included, since ``head``
comes first), the backbone's ``ln1``/``ln2`` get no weight decay, everything else the base lr and decay.

Schedule at iteration i (0-based, set before the step; mmcv ``PolyLrUpdaterHook``, by_epoch False), per group
with its initial lr ``base``:
    regular(i) = (base - min_lr) * (1 - i / max_iters) ** power + min_lr
    lr(i) = regular(i) * (1 - k),  k = (1 - i / warmup_iters) * (1 - warmup_ratio)   for i < warmup_iters (linear)
    lr(i) = regular(i)                                                                  otherwise
"""
from __future__ import annotations

import torch
import torch.nn as nn


def original_parameter_names(model: nn.Module) -> dict[str, str]:
    """Our parameter name -> the original mmseg name (the name mmcv's constructor matched keys against)."""
    from segvit.checkpoint import _RULES, _head_type, _rename

    try:
        rules = _RULES[_head_type(model)]
    except AttributeError:  # not a SegViT: match the keys against its own names
        return {name: name for name, _ in model.named_parameters()}
    return {name: _rename(name, rules, to_ours=False) or name for name, _ in model.named_parameters()}


def sorted_custom_keys(custom_keys: dict) -> list[str]:
    return sorted(sorted(custom_keys), key=len, reverse=True)


def param_groups(model: nn.Module, lr: float, weight_decay: float, custom_keys: dict | None = None) -> list[dict]:
    """Parameter groups (one per distinct (lr, weight_decay), in first-seen order) with ``names`` (original
    names) for inspection. Frozen parameters are left out."""
    custom_keys = custom_keys or {}
    keys = sorted_custom_keys(custom_keys)
    names = original_parameter_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        original = names[name]
        group_lr, group_wd = lr, weight_decay
        for key in keys:
            if key in original:
                group_lr = lr * custom_keys[key].get("lr_mult", 1.0)
                group_wd = weight_decay * custom_keys[key].get("decay_mult", 1.0)
                break
        group = groups.setdefault((group_lr, group_wd), {"params": [], "names": [], "lr": group_lr,
                                                         "weight_decay": group_wd})
        group["params"].append(param)
        group["names"].append(original)
    return list(groups.values())


def build_optimizer(model: nn.Module, optimizer_cfg: dict) -> torch.optim.Optimizer:
    """AdamW from the config's ``optimizer`` dict (type, lr, betas, weight_decay, eps, paramwise_cfg)."""
    cfg = dict(optimizer_cfg)
    kind = cfg.pop("type", "AdamW")
    if kind != "AdamW":
        raise NotImplementedError(f"optimizer.type {kind!r} is not supported (the SegViT configs use AdamW)")
    paramwise = cfg.pop("paramwise_cfg", {}) or {}
    unknown = set(paramwise) - {"custom_keys"}
    if unknown:
        raise NotImplementedError(f"optimizer.paramwise_cfg: {sorted(unknown)} not supported (only custom_keys)")
    lr, weight_decay = cfg.pop("lr"), cfg.pop("weight_decay", 0.0)
    groups = param_groups(model, lr, weight_decay, paramwise.get("custom_keys"))
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(cfg.pop("betas", (0.9, 0.999))),
                             eps=cfg.pop("eps", 1e-8), amsgrad=cfg.pop("amsgrad", False))


class PolyWarmupSchedule:
    """``set_iter(i)`` before iteration i sets every group's lr per the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 1.0, min_lr: float = 0.0,
                 warmup: str | None = "linear", warmup_iters: int = 0, warmup_ratio: float = 0.1):
        if warmup not in (None, "linear"):
            raise NotImplementedError(f"lr_config.warmup {warmup!r} is not supported (only 'linear' or None)")
        self.optimizer = optimizer
        self.max_iters, self.power, self.min_lr = max_iters, power, min_lr
        self.warmup, self.warmup_iters, self.warmup_ratio = warmup, warmup_iters, warmup_ratio
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_iter = -1

    @classmethod
    def from_config(cls, optimizer, lr_config: dict, max_iters: int) -> "PolyWarmupSchedule":
        cfg = dict(lr_config)
        if cfg.pop("policy", "poly") != "poly":
            raise NotImplementedError(f"lr_config.policy {lr_config.get('policy')!r} is not supported (only poly)")
        if cfg.pop("by_epoch", False):
            raise NotImplementedError("lr_config.by_epoch=True is not supported (the SegViT schedules are by iteration)")
        return cls(optimizer, max_iters, power=cfg.pop("power", 1.0), min_lr=cfg.pop("min_lr", 0.0),
                   warmup=cfg.pop("warmup", None), warmup_iters=cfg.pop("warmup_iters", 0),
                   warmup_ratio=cfg.pop("warmup_ratio", 0.1))

    def lr_at(self, base: float, iteration: int) -> float:
        regular = (base - self.min_lr) * (1 - iteration / self.max_iters) ** self.power + self.min_lr
        if self.warmup == "linear" and iteration < self.warmup_iters:
            k = (1 - iteration / self.warmup_iters) * (1 - self.warmup_ratio)
            return regular * (1 - k)
        return regular

    def set_iter(self, iteration: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(group["initial_lr"], iteration)
        self.last_iter = iteration

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
