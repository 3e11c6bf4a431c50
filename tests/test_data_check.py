"""Bad data are found early and by name (issue 11): errors while loading a sample name its image and label
(also through DataLoader workers), labels are read exactly (16-bit, palette) and range-checked at load time, and
``python -m segvit.data check ROOT`` lists every bad file. Tiny files in tmp_path; a few seconds in all."""
import gc
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segvit.data import (ADE20KDataset, DataError, PascalContextDataset, check_dataset, read_label,
                         reduce_zero_label, write_synthetic_ade20k)
from segvit.data.check import main as check_main

SIZE = (16, 20)  # H, W
TINY_CONFIG = os.path.join(os.path.dirname(__file__), "data", "tiny_train_config.json")


def _ade(tmp_path, num_train=3, num_val=1):
    return write_synthetic_ade20k(str(tmp_path / "ADE"), num_train=num_train, num_val=num_val, num_classes=4,
                                  size=SIZE, seed=0)


def _paths(root, split, i):
    name = f"synthetic_{split}_{i:05d}"
    split_dir = {"training": "training", "validation": "validation"}[split]
    return (os.path.join(root, "images", split_dir, name + ".jpg"),
            os.path.join(root, "annotations", split_dir, name + ".png"))


def _truncate(path, drop=0.5):
    """Cut off the end of a file: a fraction, or (int) that many bytes (a header stays whole)."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) - (drop if isinstance(drop, int) else int(len(data) * drop))])


def _train(root, **kwargs):
    return ADE20KDataset(root, "images/training", "annotations/training", **kwargs)


def _label16(path, values):
    Image.fromarray(np.asarray(values, np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # a real 16-bit PNG


@pytest.mark.parametrize("which", ["image", "label"])
def test_truncated_file_error_names_image_and_label(tmp_path, which):
    root = _ade(tmp_path)
    img_path, seg_path = _paths(root, "training", 1)
    _truncate(img_path if which == "image" else seg_path)
    ds = _train(root)
    ds[0], ds[2]  # the others load
    with pytest.raises(DataError) as info:
        ds[1]
    message = str(info.value)
    assert img_path in message and seg_path in message and "truncated" in message.lower()
    assert info.value.paths == (img_path, seg_path) and info.value.sample == 1
    cause = info.value.__cause__
    while isinstance(cause, DataError):  # read_image / read_label name the file, their cause is PIL's OSError
        cause = cause.__cause__
    assert isinstance(cause, OSError)


def test_error_names_paths_through_dataloader_workers(tmp_path, monkeypatch):
    # torch's DataLoader waits MP_STATUS_CHECK_INTERVAL (5 s) for a worker after it raised: shortened here, and
    # the iterator shut down inside the test.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    root = _ade(tmp_path)
    img_path, seg_path = _paths(root, "training", 2)
    _truncate(img_path)
    batches = iter(torch.utils.data.DataLoader(_train(root), batch_size=None, num_workers=1))
    with pytest.raises(DataError) as info:
        list(batches)
    message = str(info.value)
    del info, batches
    gc.collect()
    assert img_path in message and seg_path in message and "truncated" in message.lower()


def test_any_sample_error_is_wrapped_with_paths(tmp_path):
    root = _ade(tmp_path)

    def broken_pipeline(img, label, rng):
        raise ZeroDivisionError("pipeline step failed")

    ds = _train(root, pipeline=broken_pipeline)
    with pytest.raises(DataError, match="pipeline step failed") as info:
        ds[(3, 0)]  # the training sampler's (epoch, index) form
    assert _paths(root, "training", 0)[0] in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(IndexError):  # not a sample: stays an IndexError (ends iteration)
        _train(root)[3]


def test_label_out_of_range_found_at_load_with_file_and_values(tmp_path):
    root = _ade(tmp_path)
    _, seg_path = _paths(root, "training", 0)
    stored = np.full(SIZE, 2, np.uint8)
    stored[0, :3] = [200, 7, 0]  # ADE20K: stored 200 -> class 199, 7 -> 6 (4 classes), 0 -> ignored
    Image.fromarray(stored).save(seg_path)
    ds = _train(root, num_classes=4)
    with pytest.raises(DataError) as info:
        ds[0]
    message = str(info.value)
    assert seg_path in message and "[6, 199]" in message and "[7, 200]" in message and "< 4" in message
    ds[1]
    ds_ok = _train(root, num_classes=200)  # 199 < 200: fine, 0 stays ignored
    _, label, _ = ds_ok[0]
    assert label.dtype == np.uint8 and list(label[0, :3]) == [199, 6, 255]


def test_size_mismatch_names_both_files(tmp_path):
    root = _ade(tmp_path)
    img_path, seg_path = _paths(root, "training", 0)
    Image.fromarray(np.ones((SIZE[0], SIZE[1] + 1), np.uint8)).save(seg_path)
    with pytest.raises(DataError, match="differs") as info:
        _train(root)[0]
    assert img_path in str(info.value) and seg_path in str(info.value)


def test_16bit_label_read_exactly_never_wrapped(tmp_path):
    root = _ade(tmp_path)
    _, seg_path = _paths(root, "training", 0)
    values = np.full(SIZE, 3, np.uint16)
    values[1, 1], values[2, 2] = 258, 65535
    _label16(seg_path, values)
    raw = read_label(seg_path)
    assert raw.dtype == np.uint16 and raw[1, 1] == 258 and raw[2, 2] == 65535 and raw[0, 0] == 3
    assert reduce_zero_label(raw)[1, 1] == 257  # not 257 % 256
    with pytest.raises(DataError) as info:
        _train(root, num_classes=4)[0]
    assert seg_path in str(info.value) and "[257, 65534]" in str(info.value)
    # Without reduce_zero_label (PASCAL-Context's encoding) the stored 258 is the value reported.
    pc = PascalContextDataset(root, "images/training", "annotations/training", num_classes=60)
    with pytest.raises(DataError, match=r"\[258, 65535\]"):
        pc[0]
    # A 16-bit label with values in range loads as the same values.
    _label16(seg_path, np.arange(SIZE[0] * SIZE[1]).reshape(SIZE) % 5)
    _, label, _ = _train(root, num_classes=4)[0]
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, reduce_zero_label(np.arange(SIZE[0] * SIZE[1]).reshape(SIZE) % 5))


def test_32bit_and_palette_labels_give_indices(tmp_path):
    path = str(tmp_path / "i32.png")  # a 32-bit TIFF (PNG has no 32-bit grey); PIL opens by content
    Image.fromarray(np.array([[1, -3], [70000, 2]], np.int32)).save(path, format="TIFF")
    assert read_label(path).tolist() == [[1, -3], [70000, 2]]
    indices = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    pal = Image.fromarray(indices, mode="L").convert("P")
    pal.putpalette([9, 9, 9, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 12))
    pal.save(str(tmp_path / "p.png"))
    np.testing.assert_array_equal(read_label(str(tmp_path / "p.png")), indices)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(str(tmp_path / "rgb.png"))
    with pytest.raises(DataError, match=r"rgb\.png.*mode RGB"):
        read_label(str(tmp_path / "rgb.png"))


def _broken_dataset(tmp_path):
    """One file of each problem; returns root and {path: expected reason fragment}."""
    root = _ade(tmp_path, num_train=7, num_val=2)
    tr = [_paths(root, "training", i) for i in range(7)]
    va = [_paths(root, "validation", i) for i in range(2)]
    _truncate(tr[0][0], 20)  # truncated JPEG, its header whole (found by decoding only)
    _truncate(tr[1][1], 20)  # truncated PNG, likewise
    _label16(tr[2][1], np.full(SIZE, 258))  # 16-bit, out of range
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tr[3][1])  # size mismatch
    os.remove(tr[4][1])  # image without label
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(os.path.join(root, "annotations/training/orphan.png"))
    Image.fromarray(np.full(SIZE, 200, np.uint8)).save(va[1][1])  # 8-bit, out of range
    expected = {tr[0][0]: "truncated", tr[1][1]: "truncated", tr[2][1]: "[257]", tr[3][1]: "differs",
                tr[4][1]: "missing label", os.path.join(root, "annotations/training/orphan.png"): "without an image",
                va[1][1]: "[199]"}
    return root, expected


def test_check_cli_lists_every_bad_file_and_exits_nonzero(tmp_path, capsys):
    root, expected = _broken_dataset(tmp_path)
    assert check_main([root, "--no-progress"]) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == len(expected), out
    for path, reason in expected.items():
        line = next(line for line in lines if line.startswith(path + ": "))
        assert reason in line, line
    assert "7 bad file(s)" in err and "ADE20KDataset" in err
    # --quick: headers only (truncation and label values unchecked), the rest still found.
    assert check_main([root, "--quick", "--no-progress", "--split", "train"]) == 1
    quick = capsys.readouterr().out
    assert "differs" in quick and "missing label" in quick and "orphan" in quick and "truncated" not in quick
    # A clean dataset: exit status 0, nothing listed; through ``python -m segvit.data check``.
    clean = _ade(tmp_path / "clean")
    argv = sys.argv
    try:
        sys.argv = ["segvit.data", "check", clean, "--no-progress", "--config", TINY_CONFIG]
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module("segvit.data", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert out == "" and "no problems" in err and "4 classes" in err


def test_check_dataset_function(tmp_path):
    root, expected = _broken_dataset(tmp_path)
    ds = _train(root, num_classes=4)
    problems = check_dataset(ds, progress=False)
    assert {p.path for p in problems} == {p for p in expected if "/training/" in p}
    assert [str(p) for p in check_dataset(ds, progress=False, workers=2)] == [str(p) for p in problems]
    with pytest.raises(DataError, match="6 bad file") as info:
        check_dataset({"train": ds}, raise_errors=True, progress=False)
    assert all(p in str(info.value) for p in expected if "/training/" in p)
    assert check_dataset(_train(_ade(tmp_path / "clean")), progress=False, raise_errors=True) == []
    assert len(check_dataset(root, progress=False)) == len(expected)  # a root: the layout's published config


def test_eval_check_data_stops_before_the_model(tmp_path):
    from segvit.eval import main as eval_main

    root, expected = _broken_dataset(tmp_path)
    bad = next(p for p, reason in expected.items() if reason == "[199]")
    with pytest.raises(DataError, match="1 bad file") as info:
        eval_main(["--config", TINY_CONFIG, "--checkpoint", str(tmp_path / "none.pth"),
                   "--data", root, "--split", "val", "--check-data", "--device", "cpu"])
    assert bad in str(info.value)
