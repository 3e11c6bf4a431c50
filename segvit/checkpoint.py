"""Loading the original SegViT checkpoints (mmcv format, mmseg parameter names) and segvit's own.

All knowledge of the original names lives in ``_RULES``: one ordered table of (original prefix, segvit prefix)
templates, read in one direction to load and in the other to export. ``{i}`` is an index kept as is, ``{s}`` a
1-based stage number of the original that is 0-based here.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Callable, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


def _decoder_rules(original: str, ours: str) -> list[tuple[str, str]]:
    renamed = [("multihead_attn", "cross_attn"), ("linear1", "fc1"), ("linear2", "fc2")]
    return ([(f"{original}.layers.{{i}}.{a}.", f"{ours}.layers.{{i}}.{b}.") for a, b in renamed]
            + [(f"{original}.layers.{{i}}.", f"{ours}.layers.{{i}}.")])


_BACKBONE_RULES = [
    ("backbone.patch_embed.projection.", "backbone.patch_embed.proj."),
    ("backbone.layers.{i}.ln1.", "backbone.blocks.{i}.norm1."),
    ("backbone.layers.{i}.ln2.", "backbone.blocks.{i}.norm2."),
    ("backbone.layers.{i}.attn.attn.", "backbone.blocks.{i}.attn."),
    ("backbone.layers.{i}.ffn.layers.0.0.", "backbone.blocks.{i}.mlp.fc1."),
    ("backbone.layers.{i}.ffn.layers.1.", "backbone.blocks.{i}.mlp.fc2."),
    ("backbone.ln1.", "backbone.norm."),
    ("backbone.", "backbone."),
]
_RULES = {
    "ATMHead": _BACKBONE_RULES + [
        ("decode_head.input_proj_{s}.", "head.stages.{s}.input_proj."),
        ("decode_head.proj_norm_{s}.", "head.stages.{s}.proj_norm."),
        *_decoder_rules("decode_head.decoder_{s}", "head.stages.{s}"),
        ("decode_head.q.", "head.class_queries."),
        ("decode_head.class_embed.", "head.class_embed."),
    ],
    "TPNATMHead": _BACKBONE_RULES + [
        ("decode_head.input_proj_{s}.", "head.qu_stages.{s}.input_proj."),
        ("decode_head.proj_norm_{s}.", "head.qu_stages.{s}.proj_norm."),
        *_decoder_rules("decode_head.decoder_{s}", "head.qu_stages.{s}"),
        ("decode_head.q.", "head.grid_queries."),
        *_decoder_rules("decode_head.atm.decoder_1", "head.atm.stage"),
        ("decode_head.atm.q.", "head.atm.class_queries."),
        ("decode_head.atm.class_embed.", "head.atm.class_embed."),
    ],
}
# The loss's class-weight buffer is saved with the original models; segvit keeps it in SegViTLoss.
_LOSS_BUFFERS = {"ATMHead": ["decode_head.loss_decode.criterion.empty_weight"],
                 "TPNATMHead": ["decode_head.atm.loss_decode.criterion.empty_weight",
                                "decode_head.loss_decode.criterion.empty_weight"]}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{s\}", r"(?P<s>\d+)"))


def _rename(key: str, rules: list[tuple[str, str]], to_ours: bool) -> str | None:
    shift = -1 if to_ours else 1
    for original, ours in rules:
        source, target = (original, ours) if to_ours else (ours, original)
        match = _pattern(source).match(key)
        if match:
            values = match.groupdict()
            if "s" in values:
                values["s"] = int(values["s"]) + shift
            return target.format(**values) + key[match.end():]
    return None


def _head_type(model: nn.Module) -> str:
    from segvit.models.shrunk import ShrunkHead

    return "TPNATMHead" if isinstance(model.head, ShrunkHead) else "ATMHead"


def is_original_format(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("decode_head.", "backbone.layers.", "backbone.patch_embed.projection.")) for k in state_dict)


def from_original(state_dict: Mapping[str, torch.Tensor], head_type: str) -> "OrderedDict[str, torch.Tensor]":
    """Original (mmseg) names -> segvit names; the loss buffers are dropped, unknown names kept as they are."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if key in _LOSS_BUFFERS[head_type]:
            continue
        out[_rename(key, _RULES[head_type], to_ours=True) or key] = value
    return out


def to_original(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict under the original (mmseg) names, loss buffers included: loadable by the
    original code."""
    head_type = _head_type(model)
    out = OrderedDict()
    for key, value in model.state_dict().items():
        name = _rename(key, _RULES[head_type], to_ours=False)
        if name is None:
            raise KeyError(f"no original name for {key!r}")
        out[name] = value
    for key in _LOSS_BUFFERS[head_type]:
        empty_weight = torch.ones(model.num_classes + 1)
        empty_weight[-1] = 0.1
        out[key] = empty_weight
    return out


class CheckpointError(RuntimeError):
    """A file that is not a complete, loadable checkpoint (empty, truncated, not a checkpoint at all, or holding
    objects that safe loading refuses); the message names the file and says which."""


class RefusedObjectsError(CheckpointError):
    """A complete checkpoint holding objects that safe loading (``weights_only=True``) refuses."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"      # the legacy format: a pickle (protocol >= 2)


def read_checkpoint_file(path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what is wrong with the
    file: a missing file is a ``FileNotFoundError``; an empty, truncated or non-checkpoint file, and one holding
    objects that safe loading refuses (only then with the ``weights_only=False`` advice), a ``CheckpointError``."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", name)
    if os.path.isdir(name):
        raise IsADirectoryError(errno.EISDIR, "checkpoint path is a directory, expected a file", name)
    size = os.path.getsize(name)
    if size == 0:
        raise CheckpointError(f"checkpoint {name!r} is empty (0 bytes): an interrupted write or download?")
    with open(name, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(name):
            raise CheckpointError(f"checkpoint {name!r} is truncated or corrupt ({size} bytes, the end of its zip "
                                  "archive is missing): an interrupted write or download?")
    elif not head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{name!r} is not a torch checkpoint (it starts with {head!r}; torch.save files "
                              f"start with {_ZIP_MAGIC!r})")
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        numpy_only = _numpy_globals(name) if "Weights only load failed" in str(exc) else None
        if numpy_only:
            # mmcv's ``meta`` keeps numpy scalars and arrays (e.g. hook_msgs' best_score): data, not code, and
            # rebuilt by the same restricted unpickler; everything else in the file stays refused.
            with torch.serialization.safe_globals(numpy_only):
                return torch.load(name, map_location="cpu", weights_only=True)
        if "Weights only load failed" in str(exc) and _names_real_global(str(exc)):
            # A valid checkpoint with objects safe loading does not allow (e.g. an mmcv ``meta`` of classes).
            raise RefusedObjectsError(
                f"checkpoint {name!r} holds objects that safe loading (weights_only=True) refuses: {exc}\nIf you "
                "trust the file, pass torch.load(path, map_location='cpu', weights_only=False) to load_checkpoint "
                "instead.") from exc
        raise CheckpointError(f"checkpoint {name!r} could not be read ({size} bytes): {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {name!r} is truncated or corrupt ({size} bytes): {exc}") from exc


def _numpy_globals(name: str) -> list | None:
    """The globals a zip checkpoint needs beyond safe loading's, as (object, name) pairs, when every one is numpy's
    array or scalar machinery (``numpy.*``: ``_reconstruct``, ``ndarray``, ``dtype``, its dtype classes, ``scalar``);
    else None."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(name)
    except Exception:  # a legacy-format file, or a torch without it
        return None
    pairs = []
    for full in names:
        module, _, attr = full.rpartition(".")
        if not module.split(".")[0] == "numpy":
            return None
        try:
            with warnings.catch_warnings():  # numpy 2 warns on numpy 1's module names (numpy.core.*)
                warnings.simplefilter("ignore")
                pairs.append((getattr(importlib.import_module(module), attr), full))
        except (ImportError, AttributeError):
            return None
    if not pairs:
        return None
    # A dtype is rebuilt as numpy.dtype(...) and then set up as its own class (Float64DType, ...): those classes
    # are no GLOBAL of the file, but safe loading checks them too.
    import numpy

    return pairs + [c for c in vars(getattr(numpy, "dtypes", numpy)).values()
                    if isinstance(c, type) and issubclass(c, numpy.dtype)]


def _names_real_global(message: str) -> bool:
    """Whether safe loading refused a global that exists (a real object in a valid file), rather than a name cut
    short by a truncated legacy-format pickle (e.g. ``torch._utils._rebuild_tens``)."""
    match = re.search(r"Unsupported global: GLOBAL (\S+) was not", message)
    if match is None:
        return True
    module, _, attr = match.group(1).rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except Exception:  # a module that does not import here may still exist where the file was written
        return True


def _read(path_or_state_dict) -> tuple[Mapping[str, torch.Tensor], bool]:
    """The state dict and whether its tensors are ours to keep (read from a file here, not the caller's)."""
    owned = isinstance(path_or_state_dict, (str, os.PathLike))
    obj = read_checkpoint_file(path_or_state_dict) if owned else path_or_state_dict
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint: expected a state dict or a dict with 'state_dict', got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in obj.items()), owned


def _matched(model: nn.Module, path_or_state_dict, strict: bool):
    """The checkpoint under segvit's names, whether its tensors are ours, and the model's keys it lacks; raises
    the one error listing every problem (mis-shaped entries always, missing and unexpected ones with
    ``strict``)."""
    state_dict, owned = _read(path_or_state_dict)
    if is_original_format(state_dict):
        state_dict = from_original(state_dict, _head_type(model))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    shown = 12  # a checkpoint of another model size mismatches hundreds of keys: the first few say enough
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:shown])}"
                + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "") for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)) if keys]
    if mis_shaped or (strict and problems):
        hint = ("\n  (most of the model's entries differ: a checkpoint of another configuration? check --config / "
                "the model name)" if len(mis_shaped) + len(missing) > len(expected) // 2 else "")
        raise RuntimeError("load_checkpoint: the checkpoint does not match the model:\n  " + "\n  ".join(problems)
                           + hint)
    return state_dict, owned, missing


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> nn.Module:
    """Load an original SegViT checkpoint (mmcv: ``{"state_dict": ..., "meta": ...}`` or a bare state dict
    with the names of ``checkpoint-keys/``) or a segvit one into ``model``. With ``strict``, missing, unexpected
    and mis-shaped entries raise one error listing them all. Returns the model.

    A model built under ``skip_init()`` (parameters on the ``meta`` device, no values) is filled by assignment:
    its parameters become the checkpoint's tensors (in the parameter's dtype, on the default device, as a copy
    would make them). Such a model needs every entry: missing keys are an error even with ``strict=False``, since
    there is no initialisation to keep (``build_model(..., checkpoint=..., strict=False)`` runs the full one)."""
    return load_or_rebuild(model, path_or_state_dict, strict)


# ---- Loading without the random initialisation it replaces ----
#
# build_model(..., checkpoint=...) builds the modules under skip_init(): every parameter is created on the meta
# device (a shape and dtype, no memory) and the init functions are not run, then the checkpoint's tensors are
# assigned to the parameters. For ViT-L that skips ~1.4 GB of random draws (seconds on a CPU) and never holds the
# weights twice. The values are the ones a build-then-copy gives, bit for bit: the same dtype conversion of the
# same tensors.

_INIT_FUNCTIONS = frozenset(getattr(nn.init, name) for name in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_"))
_FILL_METHODS = frozenset((torch.Tensor.normal_, torch.Tensor.uniform_))


class _SkipMetaFills(TorchFunctionMode):
    """Init functions (``torch.nn.init.*``, ``Tensor.normal_`` / ``uniform_``) on meta tensors return at once.
    On the meta device they draw nothing anyway, but ``normal_`` has no meta kernel and goes through a Python
    decomposition that imports torch._dynamo (~2 s) the first time. A torch function mode is thread-local:
    another thread building a model meanwhile is not affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_FUNCTIONS or func in _FILL_METHODS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def skip_init():
    """Modules built inside have their parameters and buffers on the ``meta`` device, uninitialised: a
    skeleton for ``load_checkpoint`` to fill (which then needs every entry)."""
    with torch.device("meta"), _SkipMetaFills():
        yield


def _is_skeleton(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _unfillable(model: nn.Module, missing: list[str]) -> list[str]:
    """What assignment from the checkpoint would leave without a value (or get wrong): its missing entries,
    buffers outside the state dict (non-persistent, computed in ``__init__``), parameters shared by two
    modules (assignment would untie them)."""
    state_keys = set(model.state_dict())
    out = list(missing)
    out += [name for name, b in model.named_buffers(remove_duplicate=False) if b.is_meta and name not in state_keys]
    names_by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    out += [" = ".join(names) + " (tied)" for names in names_by_param.values() if len(names) > 1]
    return out


def _assign(model: nn.Module, state_dict: Mapping[str, torch.Tensor], owned: bool) -> None:
    """Fill a skeleton: each entry becomes a contiguous tensor of the parameter's dtype on the default device,
    the checkpoint's own tensor where it already is one and is not shared (tensors read from a file here), a
    fresh copy otherwise (a caller's tensors are never aliased). ``requires_grad`` stays as built."""
    device = torch.get_default_device()
    expected = model.state_dict()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    seen_storages: set[int] = set()
    values = OrderedDict()
    for key, target in expected.items():
        value = state_dict[key].detach()
        reusable = (owned and value.device == device and value.dtype == target.dtype and value.numel() > 0
                    and value.is_contiguous() and value.storage_offset() == 0
                    and value.untyped_storage().nbytes() == value.numel() * value.element_size()
                    and value.untyped_storage().data_ptr() not in seen_storages)
        if reusable:
            seen_storages.add(value.untyped_storage().data_ptr())
        else:  # exactly what load_state_dict's copy_ into the built parameter does
            value = torch.empty(target.shape, dtype=target.dtype, device=device).copy_(value)
        values[key] = value
    model.load_state_dict(values, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    untracked = [name for name, p in model.named_parameters() if p.requires_grad != requires_grad[name]]
    if left or untracked:  # an internal error: _unfillable missed a case
        raise RuntimeError(f"load_checkpoint: assignment left {left} on the meta device and changed requires_grad "
                           f"of {untracked}")


def load_or_rebuild(model: nn.Module, path_or_state_dict, strict: bool = True,
                    rebuild: Callable[[], nn.Module] | None = None) -> nn.Module:
    """``load_checkpoint``, returning the loaded model, which for a skeleton (built under ``skip_init()``) may
    be another one: when assignment cannot fill every entry (``strict=False`` with missing keys, or a module
    whose values do not all come from the state dict), ``rebuild()`` builds the model with its full random
    initialisation (the same draws as a build without a checkpoint) and the checkpoint is copied into it, as
    before the skip existed. Without ``rebuild`` that case is an error."""
    state_dict, owned, missing = _matched(model, path_or_state_dict, strict)
    if not _is_skeleton(model):  # a model with values takes a copy, as always
        model.load_state_dict(state_dict, strict=False)
        return model
    if any(v.is_meta for v in state_dict.values() if isinstance(v, torch.Tensor)):
        # Meta tensors hold nothing to fill with: into a skeleton, a check of the names and shapes; build_model
        # does what it did before (a real model, into which they cannot be copied).
        model = model if rebuild is None else rebuild()
        model.load_state_dict(state_dict, strict=False)
        return model
    unfillable = _unfillable(model, missing)
    if unfillable and rebuild is None:
        raise RuntimeError(f"load_checkpoint: the model was built without values (on the meta device) and the "
                           f"checkpoint has none for {', '.join(unfillable)}; build it on a real device (or use "
                           f"build_model(..., checkpoint=..., strict=False), which initialises them)")
    if unfillable:
        model = rebuild()
        model.load_state_dict(state_dict, strict=False)
        return model
    _assign(model, state_dict, owned)
    return model
