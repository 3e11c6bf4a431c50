"""Check a dataset before using it: ``python -m segvit.data check ROOT [--config NAME_OR_JSON] [--split ...]``.

For every sample of every split: the image and its label exist (and, without a split file, every label has an
image), both open, have the same size, and (unless ``--quick``) decode completely (a truncated file is found
only by decoding it) and the label's values, after the dataset's own mapping (ADE20K's reduce_zero_label),
are all < num_classes or the ignore index. Every bad file is listed with the reason; the exit status is 1 when
any is bad. ``check_dataset`` is the same as a function (``segvit.eval --check-data`` calls it).

``--quick`` reads headers only (existence, format, mode, size): seconds for ADE20K, but truncation and label
values go unchecked. The default full check decodes every file (about the cost of one epoch's loading without
augmentation), in ``--workers`` processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence

from PIL import Image

from segvit.data.datasets import LABEL_MODES, DataError, SegDataset, build_dataset, read_label

# Layout detection for ``check ROOT`` without --config: the first whose folder exists under ROOT, checked with the
# settings (classes, label mapping, splits) of the named published config.
LAYOUTS = (
    ("ADE20KDataset", ("images/training", "images/validation"), "segvit_vit-l16_ade20k_640"),
    ("COCOStuffDataset", ("images/train2014", "images/test2014"), "segvit_vit-l16_cocostuff10k_512"),
    ("PascalContextDataset", ("JPEGImages",), "segvit_vit-l16_pc60_480"),
)
MAX_LISTED = 50  # problems in a raised DataError's message (the CLI lists all)


@dataclasses.dataclass(frozen=True)
class DataProblem:
    """One bad file: ``path`` and why."""
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _image_size(path: str, full: bool, problems: list, what: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None with a problem recorded. ``full``: verify (PNG chunk CRCs) and
    decode the whole file."""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if what == "label" and mode not in LABEL_MODES:
                problems.append(DataProblem(path, f"label image of mode {mode}: expected a single-channel or "
                                                  f"palette image (mode L, P, I;16 or I)"))
                return None
            if full:
                im.verify()
        if full and what == "image":
            with Image.open(path) as im:
                im.load()
        return size
    except Exception as e:  # noqa: BLE001 - every reason a file cannot be read is a finding
        kind = "truncated" if "truncated" in str(e).lower() else "unreadable"
        problems.append(DataProblem(path, f"{kind} {what} ({_error(e)})"))
        return None


def check_sample(dataset: SegDataset, index: int, full: bool = True) -> list[DataProblem]:
    """The problems of sample ``index``: missing image or label, unreadable (``full``: not fully decodable)
    files, image and label sizes differing, label values out of range (``full``)."""
    img_path, seg_path = dataset.paths(index)
    img_ok, seg_ok = os.path.isfile(img_path), os.path.isfile(seg_path)
    if not (img_ok or seg_ok):
        where = f" (listed in {os.path.join(dataset.root, dataset.split)})" if dataset.split else ""
        return [DataProblem(img_path, f"missing image, and its label {seg_path} is missing too{where}")]
    if not img_ok:
        return [DataProblem(img_path, f"missing image for the label {seg_path}")]
    if not seg_ok:
        return [DataProblem(seg_path, f"missing label for the image {img_path}")]
    problems: list[DataProblem] = []
    img_size = _image_size(img_path, full, problems, "image")
    seg_size = _image_size(seg_path, full, problems, "label")
    if img_size and seg_size and img_size != seg_size:
        problems.append(DataProblem(seg_path, f"label size {seg_size[0]}x{seg_size[1]} differs from the image's "
                                              f"{img_size[0]}x{img_size[1]} ({img_path}) (width x height)"))
    if full and seg_size:
        try:
            stored = read_label(seg_path)
            problem = dataset.label_problem(dataset.map_label(stored), stored)
            if problem:
                problems.append(DataProblem(seg_path, problem))
        except DataError as e:
            problems.append(DataProblem(seg_path, str(e).removeprefix(f"{seg_path}: ")))
        except Exception as e:  # noqa: BLE001
            problems.append(DataProblem(seg_path, f"unreadable label ({_error(e)})"))
    return problems


def orphan_labels(dataset: SegDataset) -> list[DataProblem]:
    """Labels under the label folder with no image, for datasets listing every image found (with a split file,
    the folder holds the other splits' labels too, so nothing is reported)."""
    if dataset.split is not None or not os.path.isdir(dataset.ann_dir):
        return []
    names, suffix = set(dataset.names), dataset.seg_suffix
    problems = []
    for d, _, files in os.walk(dataset.ann_dir):
        for f in sorted(files):
            if f.endswith(suffix):
                name = os.path.relpath(os.path.join(d, f), dataset.ann_dir)[:-len(suffix)]
                if name not in names:
                    problems.append(DataProblem(os.path.join(d, f), "label without an image (expected "
                                                f"{os.path.join(dataset.img_dir, name + dataset.img_suffix)})"))
    return sorted(problems, key=lambda p: p.path)


class _PlainBar:
    """Progress on stderr without tqdm: a line every 10 %."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.shown = total, desc, 0, -1

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth = self.n * 10 // max(self.total, 1)
        if tenth != self.shown:
            self.shown = tenth
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _NoBar(_PlainBar):
    def update(self, n: int = 1) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar(total, desc)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total, desc)
    return tqdm(total=total, desc=desc, unit="sample", leave=False)


_WORKER_STATE: tuple = ()


def _init_worker(datasets, full):
    global _WORKER_STATE
    _WORKER_STATE = (datasets, full)


def _check_task(task):
    datasets, full = _WORKER_STATE
    which, index = task
    return check_sample(datasets[which], index, full)


def _as_datasets(data) -> dict[str, SegDataset]:
    if isinstance(data, SegDataset):
        return {type(data).__name__: data}
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, Sequence):
        return {f"{type(d).__name__} #{i}": d for i, d in enumerate(data)}
    raise TypeError(f"check_dataset: expected a dataset root, a SegDataset or several, got {type(data).__name__}")


def datasets_for_check(root: str, config: dict | str | None = None, splits: Sequence[str] | None = None,
                       num_classes: int | None = None) -> tuple[dict[str, SegDataset], list[DataProblem]]:
    """The datasets of ``config``'s ``splits`` (default: all of train, val, test, each folder and split file
    once) under ``root``; ``config`` None: the published config of the layout found under root. Splits that
    cannot be opened (missing folder or split file, no images) are returned as problems."""
    if config is None:
        for kind, folders, name in LAYOUTS:
            if any(os.path.isdir(os.path.join(root, f)) for f in folders):
                config = name
                break
        else:
            raise DataError(f"{root}: no known dataset layout found (looked for "
                            f"{', '.join(f for _, folders, _ in LAYOUTS for f in folders)}); give --config", root)
    if isinstance(config, str):
        from segvit.eval import load_config

        config = load_config(config)
    available = [s for s in ("train", "val", "test") if s in config["data"]]
    for s in splits or ():
        if s not in available:
            raise ValueError(f"split {s!r} is not in the config (it has {', '.join(available)})")
    datasets, problems, seen = {}, [], set()
    for split in splits or available:
        data = config["data"][split]
        key = (data["type"], data["img_dir"], data["ann_dir"], data.get("split"))
        if key in seen:
            continue
        seen.add(key)
        try:
            datasets[split] = build_dataset(config, split, root, train_pipeline=False, num_classes=num_classes)
        except (FileNotFoundError, NotADirectoryError) as e:
            path = getattr(e, "filename", None) or os.path.join(root, data["img_dir"])
            problems.append(DataProblem(path, f"split {split!r} cannot be read: {e.strerror or e}"))
    return datasets, problems


def format_problems(problems: Sequence[DataProblem], limit: int | None = None) -> str:
    lines = [str(p) for p in problems[:limit]]
    if limit is not None and len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more (python -m segvit.data check lists them all)")
    return "\n".join(lines)


def check_dataset(data, *, config: dict | str | None = None, splits: Sequence[str] | None = None,
                  num_classes: int | None = None, full: bool = True, workers: int | None = None,
                  progress: bool = True, raise_errors: bool = False) -> list[DataProblem]:
    """Every problem of a dataset (see the module docstring), in order, as ``DataProblem(path, reason)``.

    ``data``: a ``SegDataset`` (as ``build_dataset`` returns it: its classes, ignore index and label mapping are
    the ones checked), several (a list, or a dict name -> dataset), or a dataset root (with ``config``,
    ``splits``, ``num_classes`` as in ``datasets_for_check``). ``full`` False: headers only. ``workers``:
    processes (None: up to 8 for more than 200 samples, else 0 = this process). ``raise_errors``: raise a
    ``DataError`` listing the problems (the first 50) instead of returning them when there are any."""
    if isinstance(data, (str, os.PathLike)):
        datasets, problems = datasets_for_check(os.fspath(data), config, splits, num_classes)
    else:
        datasets, problems = _as_datasets(data), []
    names = list(datasets)
    for name in names:
        problems += orphan_labels(datasets[name])
    tasks = [(which, i) for which, name in enumerate(names) for i in range(len(datasets[name]))]
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(tasks) > 200 else 0
    bar = _bar(len(tasks), "check data" if full else "check data (headers)", progress)
    try:
        if workers > 0 and len(tasks) > 1:
            import multiprocessing

            with multiprocessing.Pool(workers, _init_worker, ([datasets[n] for n in names], full)) as pool:
                for found in pool.imap(_check_task, tasks, chunksize=16):
                    problems += found
                    bar.update()
        else:
            for which, i in tasks:
                problems += check_sample(datasets[names[which]], i, full)
                bar.update()
    finally:
        bar.close()
    if raise_errors and problems:
        files = len({p.path for p in problems})
        raise DataError(f"{files} bad file(s) in {', '.join(names) or 'the dataset'} ({len(tasks)} samples "
                        f"checked):\n{format_problems(problems, MAX_LISTED)}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segvit.data check",
        description="Check a dataset: every image and label exists, opens, decodes completely, image and label "
                    "sizes agree, and label values (after the dataset's mapping) are < num_classes or the ignore "
                    "index. Lists every bad file; exit status 1 when any is bad.")
    parser.add_argument("root", help="dataset root (for ADE20K: the ADEChallengeData2016 folder)")
    parser.add_argument("--config", default=None,
                        help="published model name or JSON config file (default: the published config of the "
                             "layout found under ROOT: " + ", ".join(f"{k} {n}" for k, _, n in LAYOUTS) + ")")
    parser.add_argument("--split", nargs="+", default=None, choices=("train", "val", "test"),
                        help="default: all of the config's (each folder once)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the config's model's")
    parser.add_argument("--quick", action="store_true",
                        help="headers only (existence, format, mode, size): no truncation or label value check")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 8)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        datasets, problems = datasets_for_check(args.root, args.config, args.split, args.num_classes)
    except (DataError, ValueError) as e:
        parser.error(str(e))
    for split, ds in datasets.items():
        mapping = ", reduce_zero_label" if ds.reduce_zero_label else ""
        print(f"{split}: {type(ds).__name__}, {len(ds)} samples in {ds.img_dir} and {ds.ann_dir}, "
              f"{ds.num_classes} classes, ignore index {ds.ignore_index}{mapping}", file=sys.stderr)
    problems += check_dataset(datasets, full=not args.quick, workers=args.workers, progress=not args.no_progress)
    total = sum(len(ds) for ds in datasets.values())
    if problems:
        print(format_problems(problems))
    files = len({p.path for p in problems})
    print(f"{total} samples checked{' (headers only)' if args.quick else ''}: "
          + (f"{files} bad file(s)" if problems else "no problems"), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
