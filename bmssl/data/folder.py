"""Class-folder datasets (miniImageNet, CIFAR-FS, CUB, ... once unpacked to image files).

Layouts:
  flat    root/<class>/*.{png,jpg,jpeg}           group of a class = the class itself
  nested  root/<group>/<class>/*.{png,jpg,jpeg}   group = the parent folder, class "<group>/<class>"
layout="auto" picks the one the folder has and refuses a mix. Hidden files and folders (".*")
and files with other extensions are ignored. Images are decoded with Pillow, converted to RGB
(or "L"; 16-bit grayscale is rescaled to 8 bits), resized to image_size (antialiased) and stacked
as uint8 [n, C, H, W].
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from bmssl.data.common import ImageSet, image_size_hw, open_image, resize_pil
from bmssl.progress import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUTS = ("auto", "flat", "nested")
MODES = {"RGB": 3, "L": 1}


def _visible_dirs(folder: Path) -> list:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _images_in(folder: Path, extensions) -> list:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in extensions), key=lambda p: p.name)


def scan_image_folder(root, layout: str = "auto", extensions=IMAGE_EXTENSIONS) -> list:
    """The classes under `root`: [(class name, group, [image paths sorted])], classes sorted.
    Raises FileNotFoundError for a missing root, ValueError for an empty, mixed or
    unrecognised layout or a class folder without images."""
    root = Path(root).expanduser()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected root/<class>/*.png|jpg")
    if isinstance(extensions, str):
        extensions = (extensions,)  # ".png" was iterated as ".", "p", "n", "g"
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    children = _visible_dirs(root)
    if not children:
        raise ValueError(f"{root} has no class folders; expected root/<class>/<image> or "
                         f"root/<group>/<class>/<image> with images {'/'.join(extensions)}")
    if _images_in(root, extensions):
        warnings.warn(f"{root} holds images directly; they belong to no class and are ignored",
                      stacklevel=3)
    direct = {child: _images_in(child, extensions) for child in children}
    if layout == "auto":
        with_images = [c.name for c in children if direct[c]]
        if len(with_images) == len(children):
            layout = "flat"
        elif not with_images:
            layout = "nested"
        else:
            without = [c.name for c in children if not direct[c]]
            raise ValueError(f"{root} mixes class folders with images ({with_images[:3]}...) and "
                             f"folders without ({without[:3]}...); pass layout='flat' or 'nested'")
    classes, empty = [], []
    if layout == "flat":
        for child in children:
            (classes if direct[child] else empty).append((child.name, child.name, direct[child]))
    else:
        for group in children:
            if _images_in(group, extensions):
                warnings.warn(f"{group} holds images directly; in the nested layout they belong to no class "
                              "and are ignored", stacklevel=3)
            if not _visible_dirs(group):
                empty.append((f"{group.name}/", group.name, []))
            for child in _visible_dirs(group):
                images = _images_in(child, extensions)
                entry = (f"{group.name}/{child.name}", group.name, images)
                (classes if images else empty).append(entry)
    if empty:
        raise ValueError(f"class folder(s) without {'/'.join(extensions)} images in {root} "
                         f"({layout} layout): {[name for name, _, _ in empty][:5]}")
    if not classes:
        raise ValueError(f"{root} has no class folders with images ({layout} layout)")
    return classes


def load_image_folder(root, *, image_size=84, layout: str = "auto", mode: str = "RGB",
                      fit: str = "center_crop", extensions=IMAGE_EXTENSIONS,
                      show_progress: bool = True) -> ImageSet:
    """A class-folder dataset as an ImageSet: images uint8 [n, C, H, W] (C = 3 for mode "RGB",
    1 for "L"), labels int64 [n], class names from the folders, groups as the module says.

    image_size: int or (H, W). fit: "center_crop" (scale the shorter side, crop the centre) or
    "stretch". Raises FileNotFoundError / ValueError for a missing or malformed folder, and
    ValueError naming the file for an image Pillow cannot read.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    size_hw = image_size_hw(image_size)
    classes = scan_image_folder(root, layout, extensions)
    files = [(label, path) for label, (_, _, paths) in enumerate(classes) for path in paths]
    images = np.empty((len(files), MODES[mode], *size_hw), dtype=np.uint8)
    labels = np.array([label for label, _ in files], dtype=np.int64)
    for i, (_, path) in enumerate(progress(files, desc=f"reading {Path(root).name}",
                                           disable=not show_progress or len(files) < 500)):
        array = np.asarray(resize_pil(open_image(path, mode, path), size_hw, fit), dtype=np.uint8)
        images[i] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels),
                    [name for name, _, _ in classes], [group for _, group, _ in classes],
                    f"folder/{Path(root).expanduser().resolve().name}")
