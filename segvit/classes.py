"""Class names and palettes of the datasets of the published SegViT models.

Names are in the label order the datasets' converted annotations use (mmsegmentation's dataset classes):

| key | classes | order |
|---|---|---|
| ``ade20k`` | 150 | ADE20K SceneParsing ``objectInfo150`` ('wall', 'building', 'sky', ...) |
| ``cocostuff10k`` | 171 | COCO's 80 things, then its 91 stuff classes ('person', 'bicycle', ..., 'wood') |
| ``pascal_context`` | 60 | 'background', then the 59 classes alphabetically ('aeroplane', 'bag', 'bed', ...) |

Palettes are segvit's own, the same for every dataset: class ``i`` gets colour ``i + 1`` of the PASCAL VOC
bit-interleaving colormap (the bits of the index spread over the high bits of R, G and B), so every class colour is
distinct and pure black is left for ignored (255) and unknown pixels. ``colormap(n)`` gives the palette of any
class count (a model trained on another dataset).
"""
from __future__ import annotations

import numpy as np

# ADE20K (objectInfo150). mmseg writes 'bed ' with a trailing space; the name is 'bed'.
ADE20K = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# COCO-Stuff: the 80 thing classes, then the 91 stuff classes (train ids 0 ... 170).
COCO_STUFF = (
    # things
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
    # stuff
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt",
    "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other",
    "wood",
)

# PASCAL-Context 60: background (label 0), then the 59 classes in alphabetical order (labels 1 ... 59).
PASCAL_CONTEXT = (
    "background",
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table",
    "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)

DATASETS = {"ade20k": ADE20K, "cocostuff10k": COCO_STUFF, "pascal_context": PASCAL_CONTEXT}

# data.test.type of an original config -> dataset key.
_CONFIG_TYPES = {"ADE20KDataset": "ade20k", "COCOStuffDataset": "cocostuff10k",
                 "PascalContextDataset": "pascal_context"}

# The class left out of the published mean IoU (PASCAL-Context: the mean over the 59 classes without background).
_BACKGROUND = {"pascal_context": 0}

# Bit-interleaving spreads 3 bits of the index per round over 8 rounds: 24 bits, so 2**24 distinct colours.
_MAX_COLORS = 2 ** 24 - 1


def _check(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {', '.join(map(repr, DATASETS))}, got {dataset!r}")
    return dataset


def class_names(dataset: str) -> tuple[str, ...]:
    """The dataset's class names in label order (index i is label value i after the dataset's own mapping)."""
    return DATASETS[_check(dataset)]


def colormap(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8: class i gets entry i + 1 of the PASCAL VOC bit-interleaving colormap (bit 3j + c of
    i + 1 becomes bit 7 - j of channel c). Distinct colours, none black."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or not (
            0 <= num_classes <= _MAX_COLORS):
        raise ValueError(f"num_classes: expected an int in [0, {_MAX_COLORS}], got {num_classes!r}")
    index = np.arange(1, num_classes + 1, dtype=np.int64)
    colors = np.zeros((num_classes, 3), np.int64)
    for j in range(8):
        for c in range(3):
            colors[:, c] |= ((index >> (3 * j + c)) & 1) << (7 - j)
    return colors.astype(np.uint8)


def palette(dataset: str) -> np.ndarray:
    """(N, 3) uint8 colours of the dataset's N classes (``colormap(N)``; a fresh array each call)."""
    return colormap(len(class_names(dataset)))


def dataset_of(cfg: dict) -> str | None:
    """The dataset key of a whole original config (from ``data.test.type``), or None when the config has none or
    names a dataset not listed here."""
    try:
        kind = cfg["data"]["test"]["type"]
    except (KeyError, TypeError):
        return None
    return _CONFIG_TYPES.get(kind) if isinstance(kind, str) else None


def background_index(dataset: str) -> int | None:
    """The class the dataset's published mean IoU leaves out (0 for PASCAL-Context: its published figure is the mean
    over the 59 classes without background), or None."""
    return _BACKGROUND.get(_check(dataset))


def for_model(cfg: dict, num_classes: int) -> tuple[str | None, tuple[str, ...] | None, np.ndarray, int | None]:
    """(dataset, class names, palette, background class) for a model of ``num_classes`` outputs built from the whole
    config ``cfg``: the names and the background only when the config's dataset has that many classes (a config
    may reuse a dataset type with other classes), else None; the palette is ``colormap(num_classes)`` either way."""
    dataset = dataset_of(cfg)
    if dataset is not None and len(class_names(dataset)) == num_classes:
        return dataset, class_names(dataset), colormap(num_classes), background_index(dataset)
    return dataset, None, colormap(num_classes), None


__all__ = ["DATASETS", "background_index", "class_names", "colormap", "dataset_of", "for_model", "palette"]
