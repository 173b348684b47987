"""ImageSet: the in-memory form every bmssl dataset loads into.

    images        uint8 [n, C, H, W]; 0 is background, 255 is full ink / full intensity
    labels        int64 [n], class index into class_names
    class_names   list[str], one per class ("Greek/U+0391", "Greek/character01", "n01532829")
    class_groups  list[str], the alphabet / superclass of each class ("Greek")
    source        str, where the images came from ("glyphs/dejavu-matplotlib", ...)

Grayscale sets (glyphs, Omniglot) use bright strokes on a dark background: ink is 255.
Training uses `images` alone as an unlabelled pool; evaluation draws N-way K-shot episodes from
held-out classes with `labels`. Splits are by group (alphabet), deterministic from a seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images with class labels and class groups (see the module docstring for the fields).
    Immutable: selections and splits return new ImageSets that share no label state."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list
    class_groups: list
    source: str = ""
    _class_index: dict = field(default=None, init=False, repr=False)

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("ImageSet.images must be a uint8 tensor [n, C, H, W], got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError("ImageSet.labels must be an int64 tensor [n], got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"ImageSet has {images.shape[0]} images but {labels.shape[0]} labels")
        object.__setattr__(self, "class_names", [str(name) for name in self.class_names])
        object.__setattr__(self, "class_groups", [str(group) for group in self.class_groups])
        if len(self.class_names) != len(self.class_groups):
            raise ValueError(f"ImageSet has {len(self.class_names)} class names but "
                             f"{len(self.class_groups)} class groups")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("ImageSet class names must be unique")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
            raise ValueError(f"ImageSet labels must lie in [0, {len(self.class_names)}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        object.__setattr__(self, "_class_index", {n: i for i, n in enumerate(self.class_names)})

    # ---- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple:
        """(H, W)."""
        return tuple(self.images.shape[2:])

    @property
    def groups(self) -> list:
        """Distinct group names, sorted."""
        return sorted(set(self.class_groups))

    def class_counts(self) -> torch.Tensor:
        """int64 [num_classes]: images per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def class_indices(self) -> list:
        """One int64 tensor per class: the positions of its images in `images`, ascending."""
        order = torch.argsort(self.labels, stable=True)
        return list(torch.split(order, self.class_counts().tolist()))

    def summary(self) -> str:
        counts = self.class_counts()
        per_class = (f"{int(counts.min())}-{int(counts.max())}" if counts.numel() else "0")
        return (f"{self.source or 'ImageSet'}: {len(self.groups)} groups, "
                f"{self.num_classes} classes, {len(self)} images ({per_class} per class) of "
                f"{self.channels}x"
                f"{self.image_size[0]}x{self.image_size[1]} uint8")

    def __repr__(self) -> str:
        return f"ImageSet({self.summary()})"

    # ---- conversion -------------------------------------------------------------------------
    def float(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The images as `dtype` [n, C, H, W] in [0, 1] (255 -> 1.0), on `device`."""
        return self.images.to(device=device).to(dtype).div_(255.0)

    # ---- selection --------------------------------------------------------------------------
    def select_classes(self, classes: Sequence) -> "ImageSet":
        """A new ImageSet with only `classes` (indices or names), relabelled 0..k-1 in the order
        given; the images keep their original order."""
        indices = [self._class_position(c) for c in classes]
        if len(set(indices)) != len(indices):
            raise ValueError("select_classes got the same class twice")
        new_label = torch.full((self.num_classes,), -1, dtype=torch.int64)
        new_label[torch.tensor(indices, dtype=torch.int64)] = torch.arange(len(indices))
        mapped = new_label[self.labels]
        keep = torch.nonzero(mapped >= 0).flatten()
        return ImageSet(self.images[keep], mapped[keep].clone(),
                        [self.class_names[i] for i in indices],
                        [self.class_groups[i] for i in indices], self.source)

    def select_groups(self, groups: Sequence[str]) -> "ImageSet":
        """A new ImageSet with the classes of `groups`, in their original order."""
        if isinstance(groups, str):
            groups = [groups]
        unknown = sorted(set(groups) - set(self.class_groups))
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; this set has {self.groups}")
        wanted = set(groups)
        return self.select_classes([i for i, g in enumerate(self.class_groups) if g in wanted])

    def _class_position(self, cls) -> int:
        if isinstance(cls, str):
            if cls not in self._class_index:
                raise ValueError(f"unknown class name {cls!r}")
            return self._class_index[cls]
        index = int(cls)
        if not 0 <= index < self.num_classes:
            raise ValueError(f"class index {index} is out of range [0, {self.num_classes})")
        return index

    # ---- splits -----------------------------------------------------------------------------
    def split_by_group(self, split, seed: int = 0):
        """Disjoint sets of whole groups (alphabets). `split` is one of:

        - fractions of the groups, a sequence (0.7, 0.1, 0.2) or a mapping {"train": 0.7, ...}
          summing to 1: the sorted group names are shuffled with `seed` and cut in that order;
          counts are rounded by largest remainder and each positive fraction gets >= 1 group;
        - explicit group lists, a sequence [["Greek", "Latin"], ["Hebrew"]] or a mapping.
        Returns a list of ImageSets (sequence input) or a dict name -> ImageSet (mapping input).
        """
        names, parts = _split_parts(split)
        if all(_is_fraction(p) for p in parts):
            group_lists = _cut(self.groups, [float(p) for p in parts], seed, "group")
        else:
            group_lists = [[p] if isinstance(p, str) else list(p) for p in parts]
            seen = [g for groups in group_lists for g in groups]
            if len(set(seen)) != len(seen):
                raise ValueError("split_by_group: the explicit group lists overlap")
        sets = [self.select_groups(groups) for groups in group_lists]
        return dict(zip(names, sets)) if names is not None else sets

    def split_by_class(self, split, seed: int = 0):
        """Disjoint sets of whole classes, ignoring groups (miniImageNet-style 64/16/20 splits).
        `split`: fractions (sequence or mapping) as in split_by_group, or explicit lists of class
        names / indices. Returns a list of ImageSets or a dict name -> ImageSet."""
        names, parts = _split_parts(split)
        if all(_is_fraction(p) for p in parts):
            class_lists = _cut(list(range(self.num_classes)), [float(p) for p in parts], seed,
                               "class")
            class_lists = [sorted(c) for c in class_lists]
        else:
            class_lists = [[p] if isinstance(p, str) else list(p) for p in parts]
            seen = [self._class_position(c) for classes in class_lists for c in classes]
            if len(set(seen)) != len(seen):
                raise ValueError("split_by_class: the explicit class lists overlap")
        sets = [self.select_classes(classes) for classes in class_lists]
        return dict(zip(names, sets)) if names is not None else sets


def _is_fraction(part) -> bool:
    return isinstance(part, (int, float, np.floating, np.integer)) and not isinstance(part, bool)


def _split_parts(split):
    """(part names or None, parts), where parts are all fractions or all lists."""
    if isinstance(split, Mapping):
        names, parts = list(split.keys()), list(split.values())
    elif isinstance(split, (str, bytes)) or not isinstance(split, Sequence):
        names, parts = None, []
    else:
        names, parts = None, list(split)
    fractions = [_is_fraction(p) for p in parts]
    if not parts or (any(fractions) and not all(fractions)):
        raise ValueError("a split is a non-empty sequence or mapping of fractions, or of lists "
                         f"of names, not a mix; got {split!r}")
    return names, parts


def _cut(items: list, fractions: list, seed: int, what: str) -> list:
    """Shuffle `items` with `seed`, then cut them into len(fractions) consecutive lists."""
    if not all(np.isfinite(f) and f >= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be finite, >= 0 and sum to 1, got {fractions}")
    positive = sum(f > 0 for f in fractions)
    if positive > len(items):
        raise ValueError(f"cannot split {len(items)} {what}(s) into {positive} non-empty parts")
    exact = np.array(fractions) * len(items)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(items) - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((counts == 0) & (np.array(fractions) > 0)):
        donor = int(np.argmax(counts))  # a positive fraction that rounded to 0 takes one item
        counts[donor] -= 1
        counts[i] += 1
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [shuffled[bounds[i]:bounds[i + 1]] for i in range(len(fractions))]


# ---- decoding -------------------------------------------------------------------------------
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # how Pillow opens 16-bit PNGs


def open_image(read, mode: str, what):
    """The image Pillow decodes from `read()` (bytes) or a path, converted to `mode` ("L" or
    "RGB") at 8 bits. 16-bit grayscale (a PNG's only deeper mode) is rescaled, v8 = round(v16 / 257),
    where Pillow's own convert would clip everything above 255 to white. An image with transparency
    (RGBA, LA, PA, or a palette / single colour marked transparent) is composited onto white first:
    a plain convert keeps whatever colour hides under transparent pixels (an Omniglot-style glyph
    on transparent black became all ink). Raises ValueError naming `what` for a file Pillow cannot
    read, a decompression bomb, or a float / 32-bit image."""
    import io

    from PIL import Image

    try:
        source = io.BytesIO(read()) if callable(read) else read
        with Image.open(source) as image:
            if image.mode in SIXTEEN_BIT_MODES:
                values = np.asarray(image, dtype=np.int64)
                if values.min() < 0 or values.max() > 65535:
                    raise ValueError(f"{image.mode} pixel values span [{values.min()}, {values.max()}], "
                                     "outside 16 bits")
                eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
                return Image.fromarray(eight_bit).convert(mode)
            if image.mode == "F":
                raise ValueError("floating-point images are not supported; save it as 8- or 16-bit")
            if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert(mode)
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {what}: {error}") from error


def image_size_hw(size) -> tuple:
    """(H, W) from an int or a pair of ints; ValueError unless both are integers >= 1."""
    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

    pair = (size, size) if integer(size) else size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(integer(v) for v in pair)):
        raise ValueError(f"image_size must be an int or an (H, W) pair of ints, got {size!r}")
    height, width = pair
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be >= 1, got {size!r}")
    return int(height), int(width)


def resize_pil(image, size_hw: tuple, fit: str = "stretch"):
    """`image` (a PIL image) resized to size_hw = (H, W), antialiased: box filter (area average)
    when shrinking, bicubic when enlarging. fit="stretch" ignores the aspect ratio;
    fit="center_crop" scales the shorter side to fit, then crops the centre."""
    from PIL import Image

    height, width = size_hw
    if fit == "center_crop":
        scale = max(width / image.width, height / image.height)
        crop_w, crop_h = width / scale, height / scale
        left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
    elif fit == "stretch":
        box = None
        scale = max(width / image.width, height / image.height)
    else:
        raise ValueError(f"fit must be 'stretch' or 'center_crop', got {fit!r}")
    if (image.width, image.height) == (width, height) and box is None:
        return image
    filter_ = Image.Resampling.BOX if scale <= 1 else Image.Resampling.BICUBIC
    return image.resize((width, height), filter_, box=box)
