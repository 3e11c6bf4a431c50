"""Training and evaluation entry points: optimizer rules, schedule, drop-in switch, resume, distributed, CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

import segvit
from segvit.data import write_synthetic_ade20k
from segvit.metrics import mean_iou
from segvit.optim import PolyWarmupSchedule, build_optimizer, param_groups, sorted_custom_keys

from conftest import DATA, tiny_config

TINY = os.path.join(DATA, "tiny_train_config.json")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def _log(work_dir):
    with open(os.path.join(work_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# -- optimizer rules and schedule -------------------------------------------------------------------------

def test_custom_keys_order_is_mmcv_s():
    assert sorted_custom_keys({"norm": {}, "ln": {}, "head": {}}) == ["head", "norm", "ln"]
    assert sorted_custom_keys({"b": {}, "ba": {}, "ab": {}}) == ["ab", "ba", "b"]


@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_param_groups_follow_the_first_matching_key(head):
    model = segvit.build_model(tiny_config(head=head))
    opt_cfg = segvit.published_config("segvit_vit-l16_ade20k_640")["optimizer"]
    optimizer = build_optimizer(model, opt_cfg)
    seen = 0
    for group in optimizer.param_groups:
        for name in group["names"]:
            seen += 1
            if name.startswith("decode_head."):  # "head" wins over "norm": lr x10 WITH decay, norms included
                expected = (2e-4, 0.01)
            elif ".ln1." in name or ".ln2." in name:
                expected = (2e-5, 0.0)
            else:  # pos_embed, cls_token, biases, patch embedding: base lr with decay
                expected = (2e-5, 0.01)
            assert (group["lr"], group["weight_decay"]) == pytest.approx(expected), name
    assert seen == sum(1 for _ in model.parameters())
    names = {n for g in optimizer.param_groups for n in g["names"]}
    assert "decode_head.decoder_1.layers.0.norm1.weight" in names or head == "TPNATMHead"
    assert "backbone.layers.0.ln1.weight" in names and "backbone.pos_embed" in names
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_param_groups_decay_rule_on_a_norm_outside_the_head():
    # A key matches the ORIGINAL name: "norm" never matches backbone ln1 (only "ln" does).
    model = segvit.build_model(tiny_config())
    groups = param_groups(model, 1.0, 0.5, {"norm": {"decay_mult": 0.0}, "head": {"lr_mult": 3.0}})
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["backbone.layers.1.ln1.weight"] == (1.0, 0.5)
    assert by_name["decode_head.proj_norm_1.weight"] == (3.0, 0.5)


def test_poly_schedule_with_linear_warmup_by_hand():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}])
    sched = PolyWarmupSchedule.from_config(opt, {"policy": "poly", "warmup": "linear", "warmup_iters": 10,
                                                 "warmup_ratio": 1e-6, "power": 1.0, "min_lr": 0.0,
                                                 "by_epoch": False}, max_iters=100)
    expected = {0: 1.0 * 1e-6, 5: 0.95 * (1 - 0.5 * (1 - 1e-6)), 10: 0.9, 99: 0.01}
    for it, lr in expected.items():
        sched.set_iter(it)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    sched2 = PolyWarmupSchedule(opt, 100, power=2.0, min_lr=0.1, warmup=None)
    sched2.set_iter(50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.9 * 0.25 + 0.1)


# -- the drop-in switch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["ATMHead", "TPNATMHead"])
def test_apply_fused_kernels_keeps_outputs_and_gradients(head, monkeypatch):
    from segvit.ops import _dispatch

    used = set()  # (op, backend) of every non-eager kernel that ran, so the comparison is not eager vs eager
    for name, op in _dispatch.OPS.items():
        for backend, kernel in op.kernels.items():
            if backend != "eager":
                def recording(*args, _fn=kernel.fn, _key=(name, backend), **kwargs):
                    used.add(_key)
                    return _fn(*args, **kwargs)
                monkeypatch.setattr(kernel, "fn", recording)
    model = segvit.build_model(tiny_config(head=head, img_size=48, num_classes=5)).eval()
    images = torch.randn(2, 3, 48, 80)  # non-square: a 3 x 5 token grid
    labels = torch.randint(0, 5, (2, 48, 80))
    labels[:, :3] = 255
    criterion = segvit.SegViTLoss.for_model(model)

    def run():
        model.zero_grad()
        out = model(images)
        loss = sum(criterion(out, labels).values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, loss.detach(), grads, model.predict(images)

    try:
        with segvit.ops.use_backend("eager"):
            ref = run()
        assert not used
        assert segvit.apply_fused_kernels(model) is model
        assert segvit.ops.get_backend() == "auto"
        fused = run()
    finally:
        segvit.ops.use_backend("auto")
    if segvit.ops.available_backends()["cpp"] == "available":
        assert ("mask_classify", "cpp") in used  # at least inference runs a fused kernel on this machine
    torch.testing.assert_close(fused[0]["pred_masks"], ref[0]["pred_masks"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[0]["pred_logits"], ref[0]["pred_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-5)
    # Every parameter but the CLS token (only its position embedding matters, and that is dropped) gets a gradient.
    assert fused[2].keys() == ref[2].keys()
    assert {n for n, _ in model.named_parameters()} - ref[2].keys() == {"backbone.cls_token"}
    for name in ref[2]:
        torch.testing.assert_close(fused[2][name], ref[2][name], rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(fused[3], ref[3], rtol=1e-4, atol=1e-5)


# -- the training loop ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "ADEChallengeData2016"
    return write_synthetic_ade20k(str(root), num_train=24, num_val=3, num_classes=4, size=(64, 80), seed=0)


def test_resume_continues_exactly(tmp_path, synthetic):
    from segvit import train

    common = ["--config", TINY, "--data", synthetic, "--log-interval", "1", "--eval-interval", "0",
              "--no-progress", "--iters", "4", "--batch-size", "2"]
    train.main(common + ["--work-dir", str(tmp_path / "a"), "--checkpoint-interval", "2"])
    state = torch.load(tmp_path / "a" / "iter_2.pth", weights_only=True)
    assert state["iteration"] == 2 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)
    train.main(common + ["--work-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "iter_2.pth")])
    a = {r["iter"]: r for r in _log(tmp_path / "a") if "loss" in r}
    b = {r["iter"]: r for r in _log(tmp_path / "b") if "loss" in r}
    assert sorted(b) == [3, 4]
    for it in (3, 4):  # dropout is on (config default): the RNG state is part of the checkpoint
        assert b[it]["loss"] == pytest.approx(a[it]["loss"], rel=1e-6)
        assert b[it]["lr"] == pytest.approx(a[it]["lr"], rel=1e-12)
    assert a[4]["loss"] != a[3]["loss"]


def test_two_gloo_processes_match_one_process(tmp_path):
    """Same global batch (4 = 2 x 2), same sample order (one DistributedSampler permutation), same
    augmentation (seeded per sample), dropout off. Every synthetic image holds every class and the crop keeps
    the whole image, so each process's class-loss weights sum alike and the mean over processes of the local
    losses equals the one-process loss; the mask losses are exact through the all-reduced mask count. Any
    mistake in the sharding, the gradient averaging or the count reduction shows up from iteration 1 or 2."""
    root = write_synthetic_ade20k(str(tmp_path / "ADE"), num_train=8, num_val=1, num_classes=4, size=(64, 64),
                                  seed=5, every_class=True)
    with open(TINY) as f:
        cfg = json.load(f)
    for step in cfg["data"]["train"]["pipeline"]:
        if step["type"] == "Resize":
            step["ratio_range"] = [1.0, 1.0]
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(cfg))
    common = ["--config", str(config), "--data", root, "--log-interval", "1", "--eval-interval", "1000",
              "--checkpoint-interval", "1000", "--iters", "3", "--disable-dropout", "--no-progress"]
    from segvit import train

    train.main(common + ["--work-dir", str(tmp_path / "one"), "--batch-size", "4", "--eval-interval", "0"])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "segvit.train"] + common + ["--work-dir", str(tmp_path / "two"), "--batch-size", "2"],
                   check=True, env=_env(), cwd=REPO, timeout=300)
    one = [r for r in _log(tmp_path / "one") if "loss" in r]
    two = [r for r in _log(tmp_path / "two") if "loss" in r]
    assert [r["iter"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice"):
            assert b[key] == pytest.approx(a[key], rel=2e-4), (a["iter"], key)
    assert one[0]["loss"] != one[2]["loss"]
    val = [r for r in _log(tmp_path / "two") if "mIoU" in r]
    assert len(val) == 1 and 0.0 <= val[0]["mIoU"] <= 100.0


def test_cli_train_loss_falls_then_eval_reports_miou(tmp_path, synthetic):
    work = tmp_path / "work"
    subprocess.run([sys.executable, "-m", "segvit.train", "--config", TINY, "--data", synthetic, "--work-dir",
                    str(work), "--log-interval", "1"], check=True, env=_env(), cwd=REPO, timeout=300)
    log = _log(work)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 30
    for r in log:
        if "loss" in r:  # the summed loss is the sum of its terms
            assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")), rel=1e-5)
    assert sum(losses[:5]) / 5 > sum(losses[-5:]) / 5
    assert sorted(p.name for p in work.glob("*.pth")) == ["best_mIoU_iter_30.pth", "iter_15.pth", "iter_30.pth",
                                                          "latest.pth"]  # one evaluation: the best so far
    assert os.path.samefile(work / "latest.pth", work / "iter_30.pth")  # a link, not a copy
    assert [r["iter"] for r in log if "mIoU" in r] == [30]
    out = subprocess.run([sys.executable, "-m", "segvit.eval", "--config", TINY, "--checkpoint",
                          str(work / "latest.pth"), "--data", synthetic, "--out", str(tmp_path / "r.json")],
                         check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert "mIoU" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["mIoU"] == pytest.approx(next(r["mIoU"] for r in log if "mIoU" in r), abs=0.01)


def test_evaluate_slide_whole_and_aug_test_with_crops_smaller_than_the_window(synthetic):
    from segvit.data import build_dataset, eval_pipeline
    from segvit.eval import evaluate, inference, load_config

    cfg = load_config(TINY)
    model = segvit.build_model(cfg["model"]).eval()
    dataset = build_dataset(cfg, "test", synthetic)
    pipeline = eval_pipeline(cfg)
    img, label, _ = dataset[0]
    whole = inference(model, img, pipeline, mode="whole")
    single = [inference(model, img, pipeline, mode="slide", ratios=(r,)) for r in (0.5, 1.0)]
    slide = single[1]
    # At ratio 0.5 the image is 32 x 40, below the 64 x 64 window: it runs at its own size.
    aug = inference(model, img, pipeline, mode="slide", ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    for probs in (whole, single[0], slide, aug):
        assert probs.shape == (4, 64, 80) and torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(0), torch.ones(64, 80))
    assert not torch.allclose(whole, slide) and not torch.allclose(aug, slide)
    torch.testing.assert_close(inference(model, img, pipeline, mode="slide", ratios=(0.5, 1.0)),
                               (single[0] + single[1]) / 2, rtol=1e-5, atol=1e-6)
    # A flipped view is flipped back: the same as running the mirrored image and mirroring its probabilities
    # (up to the uint8 rounding of the resized image).
    mirrored = inference(model, img[:, ::-1].copy(), pipeline, mode="slide").flip(-1)
    flipped = inference(model, img, pipeline, mode="slide", flip=True)
    torch.testing.assert_close(flipped, (slide + mirrored) / 2, rtol=0, atol=2e-3)
    results = evaluate(model, torch.utils.data.Subset(dataset, [0]), pipeline, mode="whole", progress=False)
    expected = mean_iou([whole.argmax(0)], [torch.from_numpy(label)], num_classes=4)
    assert results["mIoU"] == pytest.approx(expected["mIoU"], nan_ok=True)
    torch.testing.assert_close(results["IoU"], expected["IoU"], equal_nan=True)


def test_bf16_run_with_a_timm_pretrained_backbone(tmp_path, synthetic):
    from segvit import train
    from test_pretrained import timm_state_dict

    timm = timm_state_dict(grid=24, dim=64, depth=4)  # a 384-px grid, resized to the tiny model's 4 x 4
    timm = {k: v * 0.02 if v.dim() > 1 else v for k, v in timm.items()}
    torch.save(timm, tmp_path / "vit_timm.pth")
    train.main(["--config", TINY, "--data", synthetic, "--work-dir", str(tmp_path / "w"), "--iters", "2",
                "--batch-size", "2", "--amp", "bf16", "--log-interval", "1", "--eval-interval", "0",
                "--no-progress", "--pretrained", str(tmp_path / "vit_timm.pth")])
    losses = [r["loss"] for r in _log(tmp_path / "w")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    state = torch.load(tmp_path / "w" / "latest.pth", weights_only=True)["model"]
    # Warm-up keeps the first two steps tiny (lr 2e-10, then 4e-5): the loaded weights are still there.
    torch.testing.assert_close(state["backbone.blocks.3.attn.in_proj_weight"], timm["blocks.3.attn.qkv.weight"],
                               rtol=0, atol=2e-3)


def test_a_pretrained_url_is_never_downloaded():
    from segvit.train import _pretrained

    cfg = segvit.published_config("segvit_vit-l16_ade20k_640")
    with pytest.warns(UserWarning, match="downloads nothing"):
        assert _pretrained(cfg, None) is None
    with pytest.raises(FileNotFoundError, match="--pretrained"):
        _pretrained(cfg, "/nonexistent/vit.pth")


def test_bf16_run_of_a_shrunk_model(tmp_path, synthetic):
    """`segvit.train --amp bf16` of a Shrunk model (query pooling in the backbone, TPN-ATM head) trains and evaluates:
    inside autocast the pooling block hands the op float32 LayerNorm output and float32 weights (issue 9)."""
    import json

    from conftest import tiny_config
    from segvit import train

    with open(TINY) as f:
        cfg = json.load(f)
    model = tiny_config(head="TPNATMHead", img_size=64, num_classes=4, embed_dims=64, num_layers=4, heads=4)
    model["backbone"]["drop_path_rate"] = 0.1
    cfg["model"] = model
    path = tmp_path / "tiny_shrunk.json"
    path.write_text(json.dumps(cfg))
    train.main(["--config", str(path), "--data", synthetic, "--work-dir", str(tmp_path / "w"), "--iters", "2",
                "--batch-size", "2", "--amp", "bf16", "--log-interval", "1", "--eval-interval", "2", "--no-progress"])
    records = _log(tmp_path / "w")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("mIoU" in r for r in records)


def _final_weights(work_dir, iters):
    return torch.load(os.path.join(work_dir, f"iter_{iters}.pth"), weights_only=True)["model"]


def _assert_same_run(a_dir, b_dir, iters, rel=1e-6, atol=1e-6):
    a = [r for r in _log(a_dir) if "loss" in r]
    b = [r for r in _log(b_dir) if "loss" in r]
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(1, iters + 1))
    for x, y in zip(a, b):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=rel), (x["iter"], key)
    wa, wb = _final_weights(a_dir, iters), _final_weights(b_dir, iters)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    assert a[0]["loss"] != a[-1]["loss"]


@pytest.mark.parametrize("procs,accumulate,vs", [(1, 2, (2, 1)), (2, 2, (1, 4))],
                         ids=["1x2-vs-2-processes", "2-processes-x2-vs-1x4"])
def test_accumulate_equals_data_parallel(tmp_path, synthetic, procs, accumulate, vs):
    """N micro-batches per step are N data-parallel ranks: the same samples (rank r * N + i of the shared
    permutation), the same mask-count normalisation (the mean over all micro-batches), the gradient the mean over
    them, clipping, schedule and log per optimizer step. Dropout off (each rank draws its own masks)."""
    iters = 3
    common = ["--config", TINY, "--data", synthetic, "--log-interval", "1", "--eval-interval", "0",
              "--checkpoint-interval", str(iters), "--iters", str(iters), "--disable-dropout", "--no-progress",
              "--batch-size", "1", "--workers", "0"]

    def run(work_dir, processes, n):
        args = common + ["--work-dir", str(work_dir), "--accumulate", str(n)]
        if processes == 1:
            cmd = [sys.executable, "-m", "segvit.train"] + args
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", "segvit.train"] + args
        subprocess.run(cmd, check=True, env=_env(), cwd=REPO, timeout=300)

    run(tmp_path / "a", procs, accumulate)
    run(tmp_path / "b", *vs)
    # Weights to 1e-5: a key bias of attention has an exactly zero gradient, which rounding makes +-1e-9 noise
    # that AdamW turns into steps of its own (seen: 1.7e-6); one real step of the head is lr 2e-3.
    _assert_same_run(tmp_path / "a", tmp_path / "b", iters, atol=1e-5)


def test_accumulate_one_is_the_plain_step(tmp_path, synthetic):
    from segvit import train

    common = ["--config", TINY, "--data", synthetic, "--log-interval", "1", "--eval-interval", "0",
              "--checkpoint-interval", "2", "--iters", "2", "--no-progress", "--batch-size", "2"]
    train.main(common + ["--work-dir", str(tmp_path / "a")])
    train.main(common + ["--work-dir", str(tmp_path / "b"), "--accumulate", "1"])
    _assert_same_run(tmp_path / "a", tmp_path / "b", 2, rel=0, atol=0)
    with pytest.raises(SystemExit):
        train.main(common + ["--work-dir", str(tmp_path / "c"), "--accumulate", "0"])


def test_grad_checkpointing_flag_gives_the_plain_run(tmp_path, synthetic):
    from segvit import train

    common = ["--config", TINY, "--data", synthetic, "--log-interval", "1", "--eval-interval", "0",
              "--checkpoint-interval", "2", "--iters", "2", "--no-progress", "--batch-size", "2"]
    train.main(common + ["--work-dir", str(tmp_path / "a")])  # dropout on: the recompute replays the masks
    train.main(common + ["--work-dir", str(tmp_path / "b"), "--grad-checkpointing"])
    _assert_same_run(tmp_path / "a", tmp_path / "b", 2, rel=1e-5, atol=1e-6)


def test_check_data_stops_before_training_naming_the_file(tmp_path):
    from segvit import train
    from segvit.data import DataError

    root = write_synthetic_ade20k(str(tmp_path / "ADE"), num_train=4, num_val=1, num_classes=4, seed=2)
    bad = sorted((tmp_path / "ADE" / "images" / "training").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    args = ["--config", TINY, "--data", root, "--work-dir", str(tmp_path / "w"), "--iters", "1", "--no-progress",
            "--eval-interval", "0", "--check-data"]
    with pytest.raises(DataError, match=bad.name):
        train.main(args)
    assert not any(p.suffix == ".pth" for p in (tmp_path / "w").iterdir())  # nothing trained
