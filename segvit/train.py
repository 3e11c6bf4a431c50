"""Train SegViT with the original recipe, on one device or many (``torchrun``).

    python -m segvit.train --config NAME_OR_JSON --data DIR --work-dir DIR [--iters N] [--batch-size N]
                           [--amp bf16|fp16] [--resume PATH|auto] [--max-keep-ckpts N] [--accumulate N]
                           [--grad-checkpointing] [--check-data]
    torchrun --nproc_per_node 8 -m segvit.train ...          # multi-GPU; add --nnodes/--node_rank for multi-node

The recipe (``segvit.optim``): AdamW with the original's per-parameter rules, poly schedule with linear warm-up
set every iteration, gradient clipping at L2 norm 35, the config's training pipeline (``segvit.data``). With
several processes: DDP (find_unused_parameters as the original), a DistributedSampler (the batch size is per
process, as ``samples_per_gpu``), the loss's mask count all-reduced inside ``SegViTLoss``. Every sample's
augmentation is seeded by (seed, epoch, index) and computed with one intra-op thread, so a run's data do not
depend on the number of processes or workers (bitwise). ``--accumulate N``: each optimizer step takes N
micro-batches, computed as N times as many processes would compute them (their samples, their mask-count
normalisation, the mean of their gradients); every count (iterations, intervals, schedule) is in optimizer steps.

Work dir: ``log.jsonl`` (one JSON object per logged iteration: ``iter``, ``loss`` = the summed training loss, each
loss term, ``lr`` (base group), ``grad_norm``, ``time``; per evaluation: ``iter``, ``mIoU``, ``aAcc``, ``mAcc``),
``iter_N.pth`` (model, optimizer, scheduler, grad scaler, iteration, every RNG state of every process, data
position, config), ``latest.pth`` (the newest ``iter_N.pth``: a hard link to it, replaced atomically) and, when
evaluating, ``best_mIoU_iter_N.pth`` (the checkpoint with the highest mIoU so far, a full training state too).

Nothing is lost and nothing is silent when the process dies anywhere (``segvit._atomic``): every checkpoint is
written to a temporary file, fsynced and renamed into place; ``--resume auto`` continues from the newest
checkpoint that loads (warning about each one it skips, and why); on resume at iteration N ``log.jsonl`` is cut
back to the records of iterations <= N (rewritten atomically), so it holds each iteration once however many times
the run was resumed, and the checkpoints past N (an abandoned continuation) are removed. A resumed run computes
what the uninterrupted run would have, bitwise: RNG states (CPU, every CUDA device, ``random``, numpy), the
position in the data order and the running log averages are part of the checkpoint; evaluation never draws from
the training RNG. The final evaluation always runs, also when resuming a checkpoint at the last iteration.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from segvit import _atomic
from segvit.eval import load_config

_ITER_RE = re.compile(r"^iter_(\d+)\.pth$")
_BEST_RE = re.compile(r"^best_mIoU_iter_(\d+)\.pth$")
_REQUIRED = ("model", "optimizer", "scheduler", "scaler", "iteration")


class _EpochBatches:
    """Yields (epoch, index) lists of one process's batches, epoch after epoch, starting at global iteration
    ``start`` (resume skips batches without loading them). ``samplers``: one DistributedSampler, or one per
    accumulation step (``--accumulate N``: the samplers of N consecutive data-parallel ranks); each iteration
    yields one batch of each, in order, so N micro-batches are the batches N ranks would take."""

    def __init__(self, samplers, batch_size: int, start: int = 0):
        self.samplers = list(samplers) if isinstance(samplers, (list, tuple)) else [samplers]
        self.batch_size = batch_size
        self.per_epoch = len(self.samplers[0]) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"the dataset gives {len(self.samplers[0])} samples per process and accumulation "
                             f"step, fewer than the batch size {batch_size}")
        self.start = start

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        while True:
            orders = []
            for sampler in self.samplers:
                sampler.set_epoch(epoch)
                orders.append(list(sampler))
            for b in range(skip, self.per_epoch):
                for indices in orders:
                    yield [(epoch, i) for i in indices[b * self.batch_size:(b + 1) * self.batch_size]]
            epoch, skip = epoch + 1, 0


def disable_dropout(model: nn.Module) -> None:
    """Every dropout, attention dropout and drop-path probability set to 0 (for reproducibility checks,
    e.g. comparing a multi-process run with a single-process one)."""
    from segvit.models.layers import DropPath

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
        elif isinstance(module, DropPath):
            module.p = 0.0
        if isinstance(getattr(module, "attn_drop", None), float):
            module.attn_drop = 0.0


def _pretrained(cfg: dict, override: str | None) -> str | None:
    path = override or cfg["model"].get("pretrained") or cfg["model"]["backbone"].get("pretrained")
    if not path:
        return None
    if os.path.isfile(path):
        return path
    local = os.path.join("pretrained", os.path.basename(path))
    if os.path.isfile(local):
        return local
    if override:
        raise FileNotFoundError(f"--pretrained {override!r} does not exist")
    warnings.warn(f"the config's pretrained backbone {path!r} is not a local file and segvit downloads nothing: "
                  f"training starts from random initialisation. Download it and pass --pretrained PATH (or put it "
                  f"at {local!r}).", stacklevel=2)
    return None


def _intervals(cfg: dict, args, max_iters: int) -> tuple[int, int]:
    # mmseg's schedules: checkpoints every max_iters / 10; SegViT evaluates every 4000 iterations.
    eval_interval = cfg.get("evaluation", {}).get("interval", 4000) if args.eval_interval is None else args.eval_interval
    ckpt_interval = args.checkpoint_interval or cfg.get("checkpoint_config", {}).get("interval", max(max_iters // 10, 1))
    return eval_interval, ckpt_interval


def _collate(items):
    images, labels, _ = zip(*items)
    return torch.stack(images), torch.stack(labels)


class _OneThread(torch.utils.data.Dataset):
    """Computes each sample with one intra-op thread in the main process (``--workers 0``), as in a DataLoader
    worker (torch runs its workers with one thread): ATen's bilinear resize rounds differently with 1 and with N
    threads, so the images otherwise depended on the number of workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        threads = torch.get_num_threads()
        if threads == 1:
            return self.dataset[index]
        torch.set_num_threads(1)
        try:
            return self.dataset[index]
        finally:
            torch.set_num_threads(threads)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # torch's default in workers; explicit, since the data's bits depend on it


# -- checkpoints --------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    """Every random state this process draws from: torch CPU, each CUDA device (where CUDA is in use), Python's
    ``random`` and numpy's global generator (as tensors and plain values: loadable with ``weights_only``)."""
    numpy = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"bit_generator": numpy["bit_generator"], "key": key, "pos": int(numpy["state"]["pos"]),
                       "has_gauss": int(numpy["has_gauss"]), "gauss": float(numpy["gauss"])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(saved, rank: int, world: int, path: str) -> None:
    if isinstance(saved, torch.Tensor):  # checkpoints before every state was saved: the CPU generator only
        warnings.warn(f"{path} holds only the CPU random state: CUDA dropout, Python's and numpy's random "
                      "numbers do not continue as in an uninterrupted run", stacklevel=3)
        torch.set_rng_state(saved)
        return
    if len(saved) != world:
        warnings.warn(f"{path} was saved by {len(saved)} processes, this run has {world}: process {rank} takes "
                      f"the random state of process {rank % len(saved)}", stacklevel=3)
    state = saved[rank % len(saved)]
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"{path} holds the random states of {len(state['cuda'])} CUDA devices, this process "
                          f"sees {torch.cuda.device_count()}: CUDA random numbers start afresh", stacklevel=3)
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": numpy["bit_generator"], "has_gauss": numpy["has_gauss"],
                         "gauss": numpy["gauss"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]}})


def _is_weights(obj: dict) -> bool:
    inner = obj.get("state_dict", obj.get("model", obj))
    return isinstance(inner, dict) and bool(inner) and all(isinstance(v, torch.Tensor) for v in inner.values())


def load_training_state(path: str) -> dict:
    """The training state of a ``segvit.train`` checkpoint (for ``--resume``), or an error naming the file and
    saying what it is instead."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise RuntimeError(f"--resume {path}: the file is empty (0 bytes), what an interrupted write leaves; "
                           "resume from an earlier checkpoint, or pass --resume auto to take the newest that loads")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"--resume {path}: not a complete checkpoint ({size} bytes; {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}): truncated or damaged, e.g. by an "
                           "interrupted write; resume from an earlier checkpoint, or pass --resume auto to take "
                           "the newest that loads") from exc
    if not isinstance(state, dict):
        raise TypeError(f"--resume {path}: expected a segvit.train checkpoint (a dict), got {type(state).__name__}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        if _is_weights(state):
            raise ValueError(
                f"--resume {path}: these are a model's weights (a state dict), not a segvit.train checkpoint: "
                f"resuming needs the optimizer, schedule and iteration as well (missing: {', '.join(missing)}). To "
                f"train from these weights, pass a ViT backbone as --pretrained {path}; to load a whole model, "
                f"use segvit.load_checkpoint(model, {path!r}) or segvit.build_model(cfg, checkpoint={path!r}).")
        raise ValueError(f"--resume {path}: not a segvit.train checkpoint: it lacks {', '.join(missing)} "
                         f"(its keys: {', '.join(sorted(map(str, state))[:10])})")
    return state


def _numbered(work_dir: str) -> list[tuple[int, str, str]]:
    """(iteration, kind "iter"|"best", path) of the work dir's checkpoints, the newest first."""
    out = []
    for name in os.listdir(work_dir):
        for kind, pattern in (("iter", _ITER_RE), ("best", _BEST_RE)):
            match = pattern.match(name)
            if match:
                out.append((int(match.group(1)), kind, os.path.join(work_dir, name)))
    return sorted(out, key=lambda t: (-t[0], t[1] != "iter"))


def find_resume_checkpoint(work_dir: str) -> tuple[str | None, dict | None]:
    """``--resume auto``: the newest checkpoint of the work dir that loads (``iter_N.pth``, ``best_mIoU_iter_N.pth``,
    then ``latest.pth``) and its state; each one skipped gets a warning naming it and why. (None, None) if none."""
    if not os.path.isdir(work_dir):
        return None, None
    candidates = [path for _, _, path in _numbered(work_dir)] + [os.path.join(work_dir, "latest.pth")]
    failed = set()
    for path in candidates:
        if not os.path.exists(path):
            continue
        inode = os.stat(path).st_ino
        if inode in failed:  # latest.pth: a link to a file already skipped
            continue
        try:
            return path, load_training_state(path)
        except Exception as exc:
            failed.add(inode)
            warnings.warn(f"--resume auto: skipping {path}: {exc}", stacklevel=2)
    return None, None


def _iteration_of(path: str, numbered: list[tuple[int, str, str]]) -> int | None:
    """The iteration of a checkpoint file (the one it is a link of, else read lazily); None if it does not load."""
    for iteration, _, other in numbered:
        try:
            if os.path.samefile(path, other):
                return iteration
        except OSError:
            pass
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"])
    except Exception:
        return None


def _prepare_work_dir(work_dir: str, start: int, resumed: str | None, auto: bool, log_path: str) -> list[dict]:
    """Make the work dir that of a run at iteration ``start``: stray temporaries removed, checkpoints past ``start``
    (a continuation being replaced, or unreadable) removed, ``log.jsonl`` cut back to ``start`` (atomically).
    Returns the log's records kept."""
    stale = _atomic.remove_stale_temporaries(work_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) of interrupted writes from {work_dir}: {', '.join(stale)}")
    numbered = _numbered(work_dir)
    latest = os.path.join(work_dir, "latest.pth")
    if resumed is None and not auto and (numbered or os.path.exists(latest)):
        names = ", ".join(os.path.basename(p) for _, _, p in numbered[:5]) or "latest.pth"
        raise FileExistsError(f"{work_dir} already holds the checkpoints of a run ({names}): pass --resume auto to "
                              "continue it, or choose an empty --work-dir to start another")
    past = [(p, "past that iteration") for it, _, p in numbered if it > start]
    if os.path.exists(latest) and (resumed is None or not os.path.samefile(latest, resumed)):
        at = _iteration_of(latest, numbered)
        if at is None or at > start:
            past.append((latest, "past that iteration" if at is not None else "it does not load"))
    for path, why in past:
        warnings.warn(f"starting at iteration {start}: removed {path}, {why} (a continuation this run replaces)",
                      stacklevel=3)
        _atomic.remove(path)
    records = _atomic.read_jsonl(log_path)
    kept = [r for r in records if r.get("iter", 0) <= start]
    if kept != records or (os.path.exists(log_path) and not records):
        _atomic.atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept), "log")
    return kept


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def banner(*, config: str, model: nn.Module, device: str, world: int, backend: str, amp: str | None,
           grad_checkpointing: bool, data_root: str, splits: dict, batch_size: int, accumulate: int, start: int,
           max_iters: int, intervals: dict, work_dir: str, tensorboard: str | None) -> str:
    """The lines ``segvit.train`` prints before its first iteration: what runs, where, on what, and where it writes."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = model.backbone
    effective = batch_size * accumulate * world
    lines = [
        f"segvit.train: {config}",
        f"  model       {type(model).__name__} ({type(backbone).__name__}: {len(backbone.blocks)} blocks, width "
        f"{backbone.embed_dims}; {type(model.head).__name__}, {model.num_classes} classes); "
        f"{_millions(params)} parameters ({_millions(trainable)} trainable)",
        f"  device      {device} x {world} process{'es' if world > 1 else ''}, segvit.ops backend {backend}, "
        f"{ {None: 'float32', 'bf16': 'bfloat16 autocast', 'fp16': 'float16 autocast'}[amp]}"
        f"{', activation checkpointing' if grad_checkpointing else ''}",
        f"  data        {data_root}: " + ", ".join(f"{split} {n} images" for split, n in splits.items()),
        f"  batch       {batch_size} per process x {accumulate} micro-batch{'es' if accumulate > 1 else ''} x "
        f"{world} process{'es' if world > 1 else ''} = {effective} images per optimizer step",
        f"  iterations  {max_iters} optimizer steps" + (f", resuming at {start}" if start else "") + "; "
        + ", ".join(f"{what} every {n}" if n else f"no {what}" for what, n in intervals.items()),
        f"  writes      {work_dir} (log.jsonl, iter_N.pth, latest.pth"
        + (", best_mIoU_iter_N.pth" if intervals.get("eval") else "") + ")"
        + (f"; TensorBoard: {tensorboard}" if tensorboard else ""),
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    text = f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{days}d {text}" if days else text


def log_line(record: dict, max_iters: int) -> str:
    """One human line of a ``log.jsonl`` record (a training window or an evaluation)."""
    if "mIoU" in record:
        return (f"eval  iter {record['iter']}/{max_iters}  mIoU {record['mIoU']:.2f}  mAcc {record['mAcc']:.2f}  "
                f"aAcc {record['aAcc']:.2f}")
    terms = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
    eta = record["time"] * (max_iters - record["iter"])
    return (f"train iter {record['iter']}/{max_iters}  {terms}  lr {record['lr']:.3e}  grad_norm "
            f"{record['grad_norm']:.3f}  {record['time']:.3f} s/it  eta {_duration(eta)}")


def _tensorboard_writer(log_dir: str, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("--tensorboard needs the tensorboard package: pip install segvit[tensorboard] "
                          "(or pip install tensorboard)") from exc
    # purge_step: on resume, the events past the checkpoint (an abandoned continuation) are dropped, as log.jsonl's
    return SummaryWriter(log_dir, purge_step=start + 1 if start else None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m segvit.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="published model name or JSON config file")
    parser.add_argument("--data", required=True, help="dataset root (for ADE20K: the ADEChallengeData2016 folder)")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--iters", type=int, default=None,
                        help="default: the config's runner.max_iters; the poly schedule ends here")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per process and micro-batch; default samples_per_gpu")
    parser.add_argument("--accumulate", type=int, default=1, metavar="N",
                        help="N micro-batches per optimizer step: the same step as N times more data-parallel "
                             "processes (e.g. the original 8 x 2 recipe on one GPU: --batch-size 2 --accumulate 8)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute backbone blocks and decoder layers in the backward "
                             "(model.set_grad_checkpointing): less activation memory, the same gradients")
    parser.add_argument("--check-data", action="store_true",
                        help="first check every image and label of the train and val splits (as python -m "
                             "segvit.data check); stop, listing the bad files, if any is bad")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (default fp32)")
    parser.add_argument("--resume", default=None,
                        help="a checkpoint of this script (.pth) to continue from, or 'auto': the newest checkpoint "
                             "of --work-dir that loads (none: start from the beginning)")
    parser.add_argument("--max-keep-ckpts", type=int, default=None,
                        help="keep only the newest N iter_N.pth (latest.pth and the best checkpoint always stay); "
                             "default: all")
    parser.add_argument("--pretrained", default=None, help="local ViT weights (timm or mmseg format)")
    parser.add_argument("--load-from", default=None, metavar="PATH|official",
                        help="start from these whole-model weights (fine-tuning: iteration 0, a fresh optimizer): a "
                             "checkpoint file (original mmcv or segvit), or 'official': the published weights of "
                             "--config from the Hugging Face Hub (pip install segvit[hub])")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="default: the config's evaluation.interval, else 4000; 0: no evaluation")
    parser.add_argument("--checkpoint-interval", type=int, default=None)
    parser.add_argument("--log-interval", type=int, default=None, help="default: 50 (mmseg's)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers; default workers_per_gpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--disable-dropout", action="store_true", help="all dropout off (reproducibility checks)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: a log line on stdout every --log-interval iterations instead (also "
                             "printed when stdout is not a terminal)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write the loss terms, lr, grad norm and the evaluations as TensorBoard scalars "
                             "to WORK_DIR/tensorboard (needs the tensorboard package: pip install segvit[tensorboard])")
    args = parser.parse_args(argv)
    if args.max_keep_ckpts is not None and args.max_keep_ckpts < 1:
        parser.error("--max-keep-ckpts must be at least 1")
    if args.accumulate < 1:
        parser.error(f"--accumulate must be at least 1, got {args.accumulate}")
    if args.load_from and args.pretrained:
        parser.error("--load-from and --pretrained: give one (--load-from loads the whole model, --pretrained the "
                     "backbone only)")

    import segvit
    from segvit.data import build_dataset, eval_pipeline
    from segvit.eval import dataset_classes, evaluate, headline, summary
    from segvit.optim import PolyWarmupSchedule, build_optimizer
    from segvit.pretrained import load_pretrained_backbone
    from tqdm import tqdm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank = 0
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
    main_process = rank == 0
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as the original configs (the patch-embedding conv)
    torch.manual_seed(args.seed)  # the same initial weights on every process (DDP also broadcasts them)

    cfg = load_config(args.config)
    os.makedirs(args.work_dir, exist_ok=True)
    auto = args.resume == "auto"
    resume_path, state = None, None
    if auto:  # one process looks, the others load what it found
        if main_process:
            resume_path, state = find_resume_checkpoint(args.work_dir)
        if distributed:
            resume_path = _broadcast(resume_path)
        if resume_path is None and main_process:
            print(f"--resume auto: no checkpoint in {args.work_dir} loads: starting from the beginning")
    elif args.resume:
        resume_path = args.resume
    if resume_path is not None and state is None:
        state = load_training_state(resume_path)

    if args.load_from and state is None:
        if args.load_from == "official":
            if error := segvit.hub.no_official_weights(args.config, "--load-from official", "--config"):
                parser.error(error)
            model = segvit.build_model(args.config, pretrained=True)
        else:
            model = segvit.build_model(cfg["model"], checkpoint=args.load_from)
        model.train()
        if main_process:
            print(f"loaded the model's weights from {args.load_from}")
    else:
        if args.load_from and main_process:
            print(f"--load-from {args.load_from}: not used, the run resumes from {resume_path}")
        model = segvit.build_model(cfg["model"])
    pretrained = None if state is not None or args.load_from else _pretrained(cfg, args.pretrained)
    if pretrained:
        ignored = load_pretrained_backbone(model, pretrained)
        if main_process:
            print(f"loaded pretrained backbone {pretrained} ({len(ignored)} checkpoint keys unused)")
    if args.disable_dropout:
        disable_dropout(model)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    segvit.apply_fused_kernels(model).to(device)
    criterion = segvit.SegViTLoss.for_model(model).to(device)
    optimizer = build_optimizer(model, cfg["optimizer"])
    max_iters = args.iters or cfg["runner"]["max_iters"]
    schedule = PolyWarmupSchedule.from_config(optimizer, cfg["lr_config"], max_iters)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype == torch.float16)
    clip = (cfg.get("optimizer_config") or {}).get("grad_clip") or {"max_norm": 35, "norm_type": 2}
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except Exception as exc:
            raise RuntimeError(f"--resume {resume_path}: the checkpoint does not fit this run's model, optimizer or "
                               f"schedule (another --config?): {exc}") from exc
        start = int(state["iteration"])
        if start > max_iters:
            raise ValueError(f"--resume {resume_path}: the checkpoint is at iteration {start}, past --iters "
                             f"{max_iters}")
        if main_process:
            print(f"resumed from {resume_path} at iteration {start}")
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
            find_unused_parameters=True)

    dataset = build_dataset(cfg, "train", args.data, seed=args.seed)
    batch_size = args.batch_size or cfg["data"]["samples_per_gpu"]
    # Process r's micro-batch i is data-parallel rank r * N + i of world * N (N = --accumulate): one permutation
    # shared by all, as DistributedSampler splits it.
    accumulate = args.accumulate
    samplers = [torch.utils.data.DistributedSampler(dataset, num_replicas=world * accumulate,
                                                    rank=rank * accumulate + i, shuffle=True, seed=args.seed,
                                                    drop_last=True) for i in range(accumulate)]
    workers = cfg["data"].get("workers_per_gpu", 2) if args.workers is None else args.workers
    batch_sampler = _EpochBatches(samplers, batch_size, start)
    data_order = {"seed": args.seed, "world": world, "batch_size": batch_size, "samples": len(dataset),
                  "batches_per_epoch": batch_sampler.per_epoch}
    if accumulate > 1:  # (kept out of the dict otherwise: checkpoints of earlier runs compare equal)
        data_order["accumulate"] = accumulate
    if state is not None and state.get("data", {}).get("order", data_order) != data_order:
        warnings.warn(f"--resume {resume_path}: the data order differs from the interrupted run's "
                      f"({state['data']['order']} then, {data_order} now): the batches after iteration {start} are "
                      "not those an uninterrupted run would have seen", stacklevel=2)
    loader = torch.utils.data.DataLoader(_OneThread(dataset) if workers == 0 else dataset,
                                         batch_sampler=batch_sampler, num_workers=workers, collate_fn=_collate,
                                         worker_init_fn=_worker_init, pin_memory=device.startswith("cuda"))
    val_split = "val" if "val" in cfg["data"] else "test"
    val_dataset = build_dataset(cfg, val_split, args.data)
    if args.check_data:  # every process checks all of it, so all stop together
        from segvit.data import check_dataset

        check_dataset({"train": dataset, val_split: val_dataset}, raise_errors=True, progress=main_process)
    val_pipeline = eval_pipeline(cfg, val_split)
    background = dataset_classes(cfg, model.num_classes)[2]
    eval_interval, ckpt_interval = _intervals(cfg, args, max_iters)
    log_interval = args.log_interval or cfg.get("log_config", {}).get("interval", 50)
    log_path = os.path.join(args.work_dir, "log.jsonl")
    latest_path = os.path.join(args.work_dir, "latest.pth")

    kept = _prepare_work_dir(args.work_dir, start, resume_path, auto, log_path) if main_process else []
    if main_process and resume_path is not None and not os.path.exists(latest_path) and \
            os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), args.work_dir):
        _atomic.atomic_link(resume_path, latest_path, "latest")  # latest.pth: the newest checkpoint, again
    logged_evals = {r["iter"]: r for r in kept if "mIoU" in r}
    best = max(((r["mIoU"], r["iter"]) for r in logged_evals.values() if math.isfinite(r["mIoU"])),
               default=(-math.inf, None))
    # The iteration whose state the work dir's iter_N.pth holds (the best checkpoint links it rather than saving anew).
    resumed_in_place = os.path.join(args.work_dir, f"iter_{start}.pth")
    saved_at = start if main_process and resume_path is not None and os.path.exists(resumed_in_place) and \
        os.path.samefile(resume_path, resumed_in_place) else None

    def log(record: dict) -> None:
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def training_state(iteration: int, sums: dict, count: int) -> dict | None:
        """The checkpoint at ``iteration``: on the main process (None elsewhere); every process takes part."""
        rng = [_rng_state()]
        if distributed:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state())
        if not main_process:
            return None
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "rng": rng, "data": {"order": data_order, "epoch": iteration // batch_sampler.per_epoch,
                                     "batch": iteration % batch_sampler.per_epoch},
                "log_window": {"sums": dict(sums), "count": count}, "config": cfg}

    def save(iteration: int, checkpoint: dict) -> None:
        if os.path.exists(log_path):  # the log up to the checkpoint is on disk before the checkpoint is
            with open(log_path, "rb+") as f:
                os.fsync(f.fileno())
        path = os.path.join(args.work_dir, f"iter_{iteration}.pth")
        _atomic.atomic_save(checkpoint, path, "ckpt")
        _atomic.atomic_link(path, latest_path, "latest")
        if args.max_keep_ckpts:
            older = [p for it, kind, p in _numbered(args.work_dir) if kind == "iter" and it <= iteration]
            for p in older[args.max_keep_ckpts:]:
                if not os.path.samefile(p, latest_path):
                    _atomic.remove(p)

    def run_eval(iteration: int, sums: dict, count: int) -> dict:
        nonlocal best
        # Evaluation never draws from the training generators: a run resumed after it continues bitwise.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        cuda = [torch.device(device)] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            results = evaluate(model, val_dataset, val_pipeline, device=device, dtype=amp_dtype,
                               progress=not args.no_progress)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        # (PASCAL-Context: the published 59-class means, which also choose the best checkpoint)
        record = {"iter": iteration, "mode": "val", **summary(headline(results, background))}
        # (is it the best so far, is there no iter_N.pth of this state to link): decided once, for every process
        decision = (main_process and math.isfinite(record["mIoU"]) and record["mIoU"] > best[0], saved_at != iteration)
        if distributed:
            decision = _broadcast(decision)
        if decision[0]:  # the best checkpoint is replaced before the record is logged: a logged best is saved
            checkpoint = training_state(iteration, sums, count) if decision[1] else None
            if main_process:
                path = os.path.join(args.work_dir, f"best_mIoU_iter_{iteration}.pth")
                if checkpoint is None:
                    _atomic.atomic_link(os.path.join(args.work_dir, f"iter_{iteration}.pth"), path, "best")
                else:
                    _atomic.atomic_save(checkpoint, path, "best")
                for _, kind, other in _numbered(args.work_dir):
                    if kind == "best" and other != path:
                        _atomic.remove(other)
            best = (record["mIoU"], iteration)
        log(record)
        if main_process:
            tqdm.write(log_line(record, max_iters))
            if writer is not None:
                for key in ("mIoU", "mAcc", "aAcc"):
                    writer.add_scalar(f"val/{key}", record[key], iteration)
                writer.flush()
        return record

    tensorboard_dir = os.path.join(args.work_dir, "tensorboard") if args.tensorboard else None
    writer = _tensorboard_writer(tensorboard_dir, start) if tensorboard_dir and main_process else None
    # A line per log interval on stdout when no progress bar shows it (off, or stdout is a file or a pipe).
    talk = main_process and (args.no_progress or not sys.stdout.isatty())
    if main_process:
        print(banner(config=args.config, model=model, device=device, world=world, backend=segvit.ops.get_backend(),
                     amp=args.amp, grad_checkpointing=args.grad_checkpointing, data_root=args.data,
                     splits={"train": len(dataset), val_split: len(val_dataset)}, batch_size=batch_size,
                     accumulate=accumulate, start=start, max_iters=max_iters,
                     intervals={"log": log_interval, "checkpoint": ckpt_interval, "eval": eval_interval},
                     work_dir=args.work_dir, tensorboard=tensorboard_dir), flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    window = (state or {}).get("log_window", {"sums": {}, "count": 0})
    sums: dict[str, float] = dict(window["sums"])
    count, tick = int(window["count"]), time.perf_counter()
    bar = tqdm(total=max_iters, initial=start, desc="train", disable=args.no_progress or not main_process)
    batches = iter(loader)  # draws a worker seed from torch's RNG: before the state is restored
    if state is not None and "rng" in state:  # dropout and drop-path masks continue as in an uninterrupted run
        _set_rng_state(state["rng"], rank, world, resume_path)
    del state
    is_eval = lambda it: bool(eval_interval) and (it % eval_interval == 0 or it == max_iters)  # noqa: E731
    evaluated = set(_broadcast(sorted(logged_evals)) if distributed else logged_evals)
    last_eval = logged_evals.get(max_iters)
    if start > 0 and is_eval(start) and start not in evaluated:  # killed during (or before) that evaluation
        last_eval = run_eval(start, sums, count)
    for iteration in range(start, max_iters):
        schedule.set_iter(iteration)
        micro = [next(batches) for _ in range(accumulate)]
        micro = [(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                 for images, labels in micro]
        mean_masks = None
        if accumulate > 1:  # each micro-batch's mask losses normalised as its data-parallel rank's would be
            mean_masks = torch.stack([criterion.count_masks(labels) for _, labels in micro]).sum().float()
            if distributed:
                dist.all_reduce(mean_masks)
            mean_masks = mean_masks / (world * accumulate)
        optimizer.zero_grad(set_to_none=True)
        terms = 0.0
        for step, (images, labels) in enumerate(micro):
            # Gradients are all-reduced (DDP) at the last micro-batch only; each micro-batch adds loss / N, so
            # the step's gradient is the mean over world * N micro-batches, as DDP's over as many ranks.
            last = step == accumulate - 1
            with (net.no_sync() if distributed and not last else contextlib.nullcontext()):
                with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype,
                                    enabled=amp_dtype is not None):
                    out = net(images)
                losses = criterion(out, labels, mean_masks=mean_masks)
                loss = sum(losses.values())
                scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
            terms = terms + torch.stack([loss.detach()] + [v.detach() for v in losses.values()]).float()
            del out
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip["max_norm"], norm_type=clip.get("norm_type", 2))
        scaler.step(optimizer)
        scaler.update()

        if accumulate > 1:
            terms = terms / accumulate
        if distributed:  # logged as the mean over processes (and micro-batches), as mmcv's log_vars
            dist.all_reduce(terms)
            terms /= world
        values = dict(zip(["loss"] + list(losses), terms.tolist()))
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
        done = iteration + 1
        bar.update(1)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"iteration {done}: the loss is {values['loss']}")
        if done % log_interval == 0 or done == max_iters:
            now = time.perf_counter()
            record = {"iter": done, **{k: v / count for k, v in sums.items()},
                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                      "time": (now - tick) / count}
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if talk:
                tqdm.write(log_line(record, max_iters), file=sys.stdout)
                sys.stdout.flush()
            if writer is not None:
                for key, value in record.items():
                    if key != "iter":
                        writer.add_scalar(f"train/{key}", value, done)
            sums, count, tick = {}, 0, now
        if done % ckpt_interval == 0 or done == max_iters:
            checkpoint = training_state(done, sums, count)
            if main_process:
                save(done, checkpoint)
            saved_at = done
            del checkpoint
        if is_eval(done):
            last_eval = run_eval(done, sums, count)
        _atomic.count("step")
        _atomic.fault_point("step", "end")  # test-only (segvit._atomic): a kill between iterations
    bar.close()
    if writer is not None:
        writer.close()
    if distributed:
        # DDP's reducer holds the gloo/nccl process group: if it outlives destroy_process_group, the group's worker
        # threads are torn down during interpreter finalisation, which aborts ("terminate called without an active
        # exception") in about one run in ten. Release it (and the loader's workers) while every rank is alive.
        dist.barrier()
        del net, batches
        gc.collect()
        dist.destroy_process_group()
    return {"iterations": max_iters, "eval": last_eval, "work_dir": args.work_dir, "resumed_from": resume_path,
            "start": start}


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box)
    return box[0]


def cli() -> None:
    """Console script ``segvit-train``: main() returns its results for callers; a console script's return value would
    become its exit status."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
