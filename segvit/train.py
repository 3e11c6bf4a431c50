"""Train SegViT with the original recipe, on one device or many (``torchrun``).

    python -m segvit.train --config NAME_OR_JSON --data DIR --work-dir DIR [--iters N] [--batch-size N]
                           [--amp bf16|fp16] [--resume PATH]
    torchrun --nproc_per_node 8 -m segvit.train ...          # multi-GPU; add --nnodes/--node_rank for multi-node

The recipe (``segvit.optim``): AdamW with the original's per-parameter rules, poly schedule with linear warm-up
set every iteration, gradient clipping at L2 norm 35, the config's training pipeline (``segvit.data``). With
several processes: DDP (find_unused_parameters as the original), a DistributedSampler (the batch size is per
process, as ``samples_per_gpu``), the loss's mask count all-reduced inside ``SegViTLoss``. Every sample's
augmentation is seeded by (seed, epoch, index), so a run's data do not depend on the number of processes or workers.

Work dir: ``log.jsonl`` (one JSON object per logged iteration: ``iter``, ``loss`` = the summed training loss, each
loss term, ``lr`` (base group), ``grad_norm``, ``time``; per evaluation: ``iter``, ``mIoU``, ``aAcc``, ``mAcc``),
``iter_N.pth`` and ``latest.pth`` (model, optimizer, scheduler, grad scaler, iteration, RNG state, config).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from segvit.eval import load_config


class _EpochBatches:
    """Yields (epoch, index) lists of one process's batches from a DistributedSampler, epoch after epoch,
    starting at global iteration ``start`` (resume skips batches without loading them)."""

    def __init__(self, sampler, batch_size: int, start: int = 0):
        self.sampler, self.batch_size = sampler, batch_size
        self.per_epoch = len(sampler) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"the dataset gives {len(sampler)} samples per process, fewer than the batch size "
                             f"{batch_size}")
        self.start = start

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for b in range(skip, self.per_epoch):
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m segvit.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="published model name or JSON config file")
    parser.add_argument("--data", required=True, help="dataset root (for ADE20K: the ADEChallengeData2016 folder)")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--iters", type=int, default=None,
                        help="default: the config's runner.max_iters; the poly schedule ends here")
    parser.add_argument("--batch-size", type=int, default=None, help="per process; default samples_per_gpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (default fp32)")
    parser.add_argument("--resume", default=None, help="a checkpoint of this script (.pth) to continue from")
    parser.add_argument("--pretrained", default=None, help="local ViT weights (timm or mmseg format)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="default: the config's evaluation.interval, else 4000; 0: no evaluation")
    parser.add_argument("--checkpoint-interval", type=int, default=None)
    parser.add_argument("--log-interval", type=int, default=None, help="default: 50 (mmseg's)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers; default workers_per_gpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--disable-dropout", action="store_true", help="all dropout off (reproducibility checks)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import segvit
    from segvit.data import build_dataset, eval_pipeline
    from segvit.eval import evaluate, summary
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
    model = segvit.build_model(cfg["model"])
    pretrained = None if args.resume else _pretrained(cfg, args.pretrained)
    if pretrained:
        ignored = load_pretrained_backbone(model, pretrained)
        if main_process:
            print(f"loaded pretrained backbone {pretrained} ({len(ignored)} checkpoint keys unused)")
    if args.disable_dropout:
        disable_dropout(model)
    segvit.apply_fused_kernels(model).to(device)
    criterion = segvit.SegViTLoss.for_model(model).to(device)
    optimizer = build_optimizer(model, cfg["optimizer"])
    max_iters = args.iters or cfg["runner"]["max_iters"]
    schedule = PolyWarmupSchedule.from_config(optimizer, cfg["lr_config"], max_iters)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype == torch.float16)
    clip = (cfg.get("optimizer_config") or {}).get("grad_clip") or {"max_norm": 35, "norm_type": 2}
    start = 0
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = state["iteration"]
        if main_process:
            print(f"resumed from {args.resume} at iteration {start}")
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
            find_unused_parameters=True)

    dataset = build_dataset(cfg, "train", args.data, seed=args.seed)
    batch_size = args.batch_size or cfg["data"]["samples_per_gpu"]
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    workers = cfg["data"].get("workers_per_gpu", 2) if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_EpochBatches(sampler, batch_size, start),
                                         num_workers=workers, collate_fn=_collate,
                                         pin_memory=device.startswith("cuda"))
    val_split = "val" if "val" in cfg["data"] else "test"
    val_dataset = build_dataset(cfg, val_split, args.data)
    val_pipeline = eval_pipeline(cfg, val_split)
    eval_interval, ckpt_interval = _intervals(cfg, args, max_iters)
    log_interval = args.log_interval or cfg.get("log_config", {}).get("interval", 50)
    log_path = os.path.join(args.work_dir, "log.jsonl")

    def log(record: dict) -> None:
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(iteration: int) -> None:
        if not main_process:
            return
        path = os.path.join(args.work_dir, f"iter_{iteration}.pth")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                    "rng": torch.get_rng_state(), "config": cfg}, path)
        shutil.copyfile(path, os.path.join(args.work_dir, "latest.pth"))

    def run_eval(iteration: int) -> dict:
        results = evaluate(model, val_dataset, val_pipeline, device=device, dtype=amp_dtype,
                           progress=not args.no_progress)
        record = {"iter": iteration, "mode": "val", **summary(results)}
        log(record)
        if main_process:
            tqdm.write(json.dumps(record))
        return record

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    sums: dict[str, float] = {}
    count, tick, last_eval = 0, time.perf_counter(), None
    bar = tqdm(total=max_iters, initial=start, desc="train", disable=args.no_progress or not main_process)
    batches = iter(loader)  # draws a worker seed from torch's RNG: before the state is restored
    if args.resume and "rng" in state:  # dropout and drop-path masks continue as in an uninterrupted run
        torch.set_rng_state(state["rng"])
    for iteration in range(start, max_iters):
        schedule.set_iter(iteration)
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net(images)
        losses = criterion(out, labels)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip["max_norm"], norm_type=clip.get("norm_type", 2))
        scaler.step(optimizer)
        scaler.update()

        terms = torch.stack([loss.detach()] + [v.detach() for v in losses.values()]).float()
        if distributed:  # logged as the mean over processes, as mmcv's log_vars
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
            sums, count, tick = {}, 0, now
        if done % ckpt_interval == 0 or done == max_iters:
            save(done)
        if eval_interval and (done % eval_interval == 0 or done == max_iters):
            last_eval = run_eval(done)
    bar.close()
    if distributed:
        # DDP's reducer holds the gloo/nccl process group: if it outlives destroy_process_group, the group's worker
        # threads are torn down during interpreter finalisation, which aborts ("terminate called without an active
        # exception") in about one run in ten. Release it (and the loader's workers) while every rank is alive.
        dist.barrier()
        del net, batches
        gc.collect()
        dist.destroy_process_group()
    return {"iterations": max_iters, "eval": last_eval, "work_dir": args.work_dir}


def cli() -> None:
    """Console script ``segvit-train``: main() returns its results for callers; a console script's return value would
    become its exit status."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
