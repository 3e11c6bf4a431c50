"""segvit.train talks (issue 13): a start banner, a line per log interval on stdout without a progress bar, and
optional TensorBoard scalars that follow log.jsonl (and a resume)."""
import json
import os
import re

import pytest

from segvit.data import write_synthetic_ade20k

from conftest import DATA

TINY = os.path.join(DATA, "tiny_train_config.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("talk") / "ADEChallengeData2016"
    return write_synthetic_ade20k(str(root), num_train=6, num_val=2, num_classes=4, size=(48, 64), seed=5)


def _records(work):
    with open(os.path.join(work, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _args(data, work, *extra):
    return ["--config", TINY, "--data", data, "--work-dir", str(work), "--iters", "4", "--batch-size", "2",
            "--log-interval", "2", "--checkpoint-interval", "2", "--eval-interval", "4", "--workers", "0", *extra]


def test_banner_and_a_line_per_log_interval_without_progress_bar(tmp_path, data, capsys):
    from segvit import train

    import segvit

    train.main(_args(data, tmp_path / "w", "--no-progress", "--accumulate", "2"))
    out = capsys.readouterr().out
    model = segvit.build_model(json.load(open(TINY))["model"])
    params = sum(p.numel() for p in model.parameters())
    banner = out[:out.index("train iter")]
    assert f"segvit.train: {TINY}" in banner
    assert f"{params / 1e6:.1f} M parameters" in banner
    assert "cpu x 1 process" in banner and "float32" in banner
    assert f"{data}: train 6 images, val 2 images" in banner
    # 2 per process x 2 micro-batches x 1 process
    assert "2 per process x 2 micro-batches x 1 process = 4 images per optimizer step" in banner
    assert "4 optimizer steps" in banner and "log every 2" in banner and "eval every 4" in banner
    assert str(tmp_path / "w") in banner
    # one line per logged record, with the record's values
    lines = [line for line in out.splitlines() if line.startswith(("train iter", "eval  iter"))]
    records = _records(tmp_path / "w")
    assert len(lines) == len(records) == 3
    for line, record in zip(lines, records):
        assert f"iter {record['iter']}/4" in line
        if "mIoU" in record:
            assert f"mIoU {record['mIoU']:.2f}" in line
        else:
            assert f"loss {record['loss']:.4f}" in line and f"lr {record['lr']:.3e}" in line
            assert re.search(r"eta \d+:\d\d:\d\d", line)


def test_log_line_formats_a_long_eta():
    from segvit.train import log_line

    record = {"iter": 10, "loss": 1.5, "loss_ce": 0.5, "lr": 2e-5, "grad_norm": 3.0, "time": 0.9}
    assert "eta 1d 16:00:00" in log_line(record, 160010)
    assert log_line({"iter": 8, "mode": "val", "mIoU": 12.345, "aAcc": 50.0, "mAcc": 20.0}, 8).startswith(
        "eval  iter 8/8  mIoU 12.35")


def test_tensorboard_scalars_follow_the_log_and_a_resume(tmp_path, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from segvit import train

    work = tmp_path / "w"
    train.main(_args(data, work, "--no-progress", "--tensorboard", "--iters", "4"))
    # resumed at iteration 2: the events past it are dropped and written again, as the log is cut back
    train.main(_args(data, work, "--no-progress", "--tensorboard", "--resume", str(work / "iter_2.pth")))
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    records = _records(work)
    losses = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == losses
    assert {"train/lr", "train/grad_norm", "train/loss_ce", "val/mIoU"} <= set(events.Tags()["scalars"])
    assert [(e.step, pytest.approx(e.value, abs=1e-4)) for e in events.Scalars("val/mIoU")] == \
        [(r["iter"], r["mIoU"]) for r in records if "mIoU" in r]


def test_tensorboard_missing_says_how_to_install(tmp_path, data, monkeypatch):
    import sys

    from segvit import train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install segvit\[tensorboard\]"):
        train.main(_args(data, tmp_path / "w", "--no-progress", "--tensorboard"))
