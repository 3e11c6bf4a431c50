"""Segment image files and write pictures of the result.

    python -m segvit.predict --model NAME_OR_JSON (--checkpoint PATH | --pretrained) INPUTS... --out-dir DIR
        [--device DEV] [--amp bf16|fp16] [--mode whole|slide] [--opacity 0.5] [--no-progress]

INPUTS are image files, folders (the images directly inside, sorted by name) or glob patterns (``**`` recursive);
folders and globs take the files ending in .jpg, .jpeg, .png, .bmp, .tif, .tiff or .webp (any case), a file named
explicitly is taken whatever its name. Per image, ``DIR/<stem>.png`` is the label map as a palette PNG (pixel value
= class index) and ``DIR/<stem>_overlay.png`` the image with the classes drawn over it and a legend of the classes
present. Images with the same stem (``a/x.jpg``, ``b/x.png``) get ``x``, ``x_1``, ... in input order. A file that
cannot be read (truncated, not an image) is skipped with a message naming it; the others are written, and the
command then exits with status 1 listing every skipped file.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from segvit.eval import add_weights_arguments

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def collect_inputs(inputs: list[str]) -> list[str]:
    """The image files named by ``inputs`` (files, folders, globs), in order, each once. A name that is neither an
    existing file or folder nor a glob pattern raises FileNotFoundError; no image at all raises ValueError."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(p for p in (os.path.join(item, n) for n in os.listdir(item)) if _is_image(p))
        elif os.path.isfile(item):
            found.append(item)
        elif glob.has_magic(item):
            found += sorted(p for p in glob.glob(item, recursive=True) if _is_image(p))
        else:
            raise FileNotFoundError(f"input {item!r}: no such file or folder (nor a glob pattern)")
    seen, files = set(), []
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)
    if not files:
        raise ValueError(f"no image found in {' '.join(map(repr, inputs))} (folders and globs take files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    return files


def output_stems(paths: list[str]) -> list[str]:
    """One output stem per path: the file's stem, or ``stem_1``, ``stem_2``, ... when an earlier path took it. No
    two stems give the same file names, counting ``<stem>_overlay`` and case-insensitive file systems."""
    taken, stems = set(), []
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0] or "image"
        stem, n = base, 0
        while stem.casefold() in taken or f"{stem}_overlay".casefold() in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.update((stem.casefold(), f"{stem}_overlay".casefold()))
        stems.append(stem)
    return stems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segvit.predict", description=__doc__.split("\n\n")[0],
                                     epilog="Folders and globs take: " + " ".join(IMAGE_EXTENSIONS))
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="published model name or JSON config file (a whole config)")
    add_weights_arguments(parser, "--model")
    parser.add_argument("--out-dir", required=True, help="where to write <stem>.png and <stem>_overlay.png")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype")
    parser.add_argument("--mode", choices=("whole", "slide"), default=None, help="default: the config's test_cfg")
    parser.add_argument("--opacity", type=float, default=0.5, help="label colours' weight in the overlay (0..1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _build(args, parser):
    from segvit.eval import load_config, model_from_arguments

    try:
        cfg = load_config(args.model)
    except ValueError as e:
        parser.error(str(e).replace("--config", "--model"))
    model = model_from_arguments(parser, args, args.model, cfg, "--model")
    if getattr(model, "data_config", None) is None:
        parser.error(f"--model {args.model!r}: the config has no test pipeline or img_norm_cfg to preprocess images "
                     f"with (give a whole config: model, data, img_norm_cfg)")
    return model


def main(argv=None) -> list[str]:
    """Runs the command line ``argv`` (default: sys.argv[1:]); returns the paths written, two per image (label PNG,
    overlay PNG), in input order."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.opacity <= 1.0:
        parser.error(f"--opacity: expected a number in [0, 1], got {args.opacity}")
    try:
        files = collect_inputs(args.inputs)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    import torch
    from tqdm import tqdm

    import segvit
    from segvit.classes import colormap
    from segvit.inference import inference, load_image
    from segvit.visualize import save_label_png, save_overlay

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _build(args, parser)
    segvit.apply_fused_kernels(model).to(device)
    palette = model.palette if getattr(model, "palette", None) is not None else colormap(model.num_classes)
    # Without names the legend names classes by index.
    names = model.class_names if getattr(model, "class_names", None) is not None else ()
    os.makedirs(args.out_dir, exist_ok=True)
    written, unreadable = [], []
    for path, stem in tqdm(list(zip(files, output_stems(files))), desc="predict", disable=args.no_progress):
        try:
            img = load_image(path, "input")
        except (OSError, ValueError, TypeError, RuntimeError) as exc:  # a corrupt file: the others still run
            unreadable.append(f"{path}: {exc}")
            tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        labels = inference(model, img, mode=args.mode, amp=args.amp)
        label_path = os.path.join(args.out_dir, f"{stem}.png")
        overlay_path = os.path.join(args.out_dir, f"{stem}_overlay.png")
        save_label_png(label_path, labels, palette)
        save_overlay(overlay_path, img, labels, palette, class_names=names, opacity=args.opacity)
        written += [label_path, overlay_path]
    print(f"wrote {len(written) // 2} label map(s) and overlay(s) to {args.out_dir}")
    if unreadable:  # after every readable image is written: exit status 1, naming each file that was not
        print(f"{len(unreadable)} input(s) could not be read:\n  " + "\n  ".join(unreadable), file=sys.stderr)
        raise SystemExit(1)
    return written


def cli() -> None:
    """Console script ``segvit-predict`` (main's return value would otherwise become the exit status)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
