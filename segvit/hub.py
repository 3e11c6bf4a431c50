"""The official SegViT checkpoints on the Hugging Face Hub, by segvit model name.

    path = segvit.hub.official_checkpoint("segvit_vit-l16_ade20k_640")   # downloaded once, then from the cache
    model = segvit.build_model("segvit_vit-l16_ade20k_640", pretrained=True)   # the same, loaded

The files are the original releases (mmcv format) in the model repository ``Akide/SegViTv1``, fetched with
``huggingface_hub`` (``pip install segvit[hub]``) into its cache, so ``HF_HOME`` / ``HF_HUB_CACHE`` choose where
and ``HF_HUB_OFFLINE=1`` uses the cache only. Their sizes and hashes are not recorded here (none are known yet).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

REPO_ID = "Akide/SegViTv1"
REVISION = "main"


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One published checkpoint: the segvit model it loads into, its file in ``REPO_ID`` and the mIoU (%)
    the SegViT authors report for it, single-scale and multi-scale (PASCAL-Context: over 59 classes)."""

    model: str
    filename: str
    miou_single_scale: float
    miou_multi_scale: float

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{REPO_ID}/resolve/{REVISION}/{self.filename}"


# From the original README (shared/design/checkpoints.md).
OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {c.model: c for c in (
    OfficialCheckpoint("segvit_vit-b16_ade20k_512", "ade_51.3.pth", 51.3, 53.0),
    OfficialCheckpoint("segvit_vit-l16_shrunk_ade20k_640", "ade_shrunk_53.9.pth", 53.9, 55.1),
    OfficialCheckpoint("segvit_vit-l16_ade20k_640", "ade_54.6.pth", 54.6, 55.2),
    OfficialCheckpoint("segvit_vit-l16_shrunk_cocostuff10k_512", "COCOstuff10k_shrunk_49.1.pth", 49.1, 49.4),
    OfficialCheckpoint("segvit_vit-l16_cocostuff10k_512", "COCOstuff_49.9.pth", 49.9, 50.3),
    OfficialCheckpoint("segvit_vit-l16_shrunk_pc60_480", "PC59cls_62.3.pth", 62.3, 63.7),
    OfficialCheckpoint("segvit_vit-l16_pc60_480", "PC59cls_64.1.pth", 64.1, 65.3),
)}


class OfficialCheckpointError(OSError):
    """An official checkpoint that could not be fetched (offline and not in the cache, no network, the Hub
    refusing); the message names the model, the repository, the file and its URL, and says how to get it."""


def official_models() -> list[str]:
    """Names of the models with official weights (``build_model(name, pretrained=True)``)."""
    return sorted(OFFICIAL_CHECKPOINTS)


def checkpoint_info(name: str) -> OfficialCheckpoint:
    """The table entry of a model; an unknown name is a ValueError listing the ones with official weights."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {type(name).__name__}")
    if name not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"name: no official checkpoint for {name!r}; the models with official weights are: "
                         f"{', '.join(official_models())}")
    return OFFICIAL_CHECKPOINTS[name]


def no_official_weights(name: str, flag: str, option: str) -> str | None:
    """The command-line error for ``flag`` (asking for the official weights) with ``option`` (``--model`` /
    ``--config``) ``name`` that has none, or None when ``name`` has official weights."""
    if name in OFFICIAL_CHECKPOINTS:
        return None
    return (f"{flag}: the official weights exist for the published models only ({', '.join(official_models())}), "
            f"got {option} {name!r}; give a checkpoint file instead")


def _env_true(name: str) -> bool:
    # huggingface_hub's reading of a boolean variable
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _offline(constants) -> bool:
    """HF_HUB_OFFLINE as set now or when huggingface_hub was imported (it reads the variable once, then)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _cache_dir(cache_dir, constants) -> str:
    """The hub cache to use: ``cache_dir``, else HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub
    reads them at its import, so a variable set later in the process would otherwise be ignored), else
    huggingface_hub's default."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the legacy name
        if os.environ.get(variable):
            return os.path.expanduser(os.path.expandvars(os.environ[variable]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    return constants.HF_HUB_CACHE


def _how_to_get(info: OfficialCheckpoint) -> str:
    return (f"To get it: download {info.url} by hand and pass it as build_model({info.model!r}, "
            f"checkpoint=PATH); or, for the automatic download, unset HF_HUB_OFFLINE and let this machine reach "
            f"huggingface.co; or, if the file is in a Hugging Face cache elsewhere, point HF_HOME or HF_HUB_CACHE "
            f"(or cache_dir=) at that cache.")


def official_checkpoint(name: str, *, cache_dir: str | os.PathLike | None = None,
                        force_download: bool = False) -> str:
    """The local path of the official checkpoint of model ``name``, downloaded from ``REPO_ID`` (revision
    ``REVISION``) into the Hugging Face cache on first use with ``huggingface_hub.hf_hub_download``; later
    calls find it there. ``cache_dir`` overrides the cache (default: HF_HUB_CACHE, else HF_HOME/hub, else
    ``~/.cache/huggingface/hub``); with HF_HUB_OFFLINE=1 only the cache is looked at; ``force_download`` fetches
    the file again (e.g. after a corrupted copy). Failing to get the file raises ``OfficialCheckpointError``
    naming the file, its URL and how to get it by hand."""
    info = checkpoint_info(name)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected None or a path, got {type(cache_dir).__name__}")
    if not isinstance(force_download, bool):
        raise TypeError(f"force_download: expected a bool, got {force_download!r}")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as exc:
        raise ImportError(f"fetching the official checkpoint of {name!r} needs huggingface_hub: pip install "
                          f"segvit[hub] (or pip install huggingface_hub). Without it, download {info.url} by hand "
                          f"and pass build_model({name!r}, checkpoint=PATH).") from exc
    offline = _offline(constants)
    cache = _cache_dir(cache_dir, constants)
    if offline and force_download:
        raise ValueError("force_download=True needs the network, but HF_HUB_OFFLINE is set")
    try:
        return huggingface_hub.hf_hub_download(REPO_ID, info.filename, revision=REVISION, cache_dir=cache,
                                               force_download=force_download, local_files_only=offline)
    except Exception as exc:  # every failure to fetch gets the same advice; the cause stays chained
        if offline and isinstance(exc, FileNotFoundError):  # huggingface_hub's LocalEntryNotFoundError
            where = f"HF_HUB_OFFLINE is set and the file is not in the cache {cache}"
        else:
            where = f"not from the cache {cache} nor from the Hub ({type(exc).__name__}: {exc})"
        raise OfficialCheckpointError(
            f"could not get the official checkpoint of {name!r}: file {info.filename!r} of the Hugging Face Hub "
            f"repository {REPO_ID} (revision {REVISION}), {info.url}: {where}.\n{_how_to_get(info)}") from exc
