"""Omniglot in its standard layout, <alphabet>/<character>/<id>_<drawer>.png (105x105, black
strokes on white), read from a folder or straight from a zip file (nothing is extracted).

Images come back as uint8 [n, 1, S, S] with bright strokes on black (ink = 255, the glyphs
dataset's convention), area-averaged down to S = image_size. Classes are "<alphabet>/<character>",
groups are alphabets.

Where the data is: an explicit `root=` folder, else $BMSSL_OMNIGLOT_DIR, else
<repo root>/../shared/data/omniglot. The shared copy holds images_background_small1.zip (Balinese,
Early_Aramaic, Greek, Korean, Latin) and images_background_small2.zip (Greek,
Japanese_(katakana), Latin, Sanskrit, Tagalog); Omniglot is MIT-licensed (c) Brenden Lake.
Never copy it into the repository.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bmssl.data.common import ImageSet, image_size_hw, open_image, resize_pil
from bmssl.progress import progress

ENV_VAR = "BMSSL_OMNIGLOT_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT.parent / "shared" / "data" / "omniglot"
BACKGROUND_SMALL1 = "images_background_small1"
BACKGROUND_SMALL2 = "images_background_small2"


def find_omniglot_dir(root=None) -> Path:
    """The folder holding the Omniglot archives: `root`, else $BMSSL_OMNIGLOT_DIR, else
    DEFAULT_DIR. Raises FileNotFoundError naming the folder and how to point at the data."""
    if root is not None:
        folder, origin = Path(root).expanduser(), "root="
    elif os.environ.get(ENV_VAR):
        folder, origin = Path(os.environ[ENV_VAR]).expanduser(), f"{ENV_VAR}="
    else:
        folder, origin = DEFAULT_DIR, "the default location "
    if folder.is_file():
        raise FileNotFoundError(
            f"Omniglot folder not found: {origin}{folder} is a file, not a folder. Pass the folder "
            f"that holds the archives, or pass the zip itself as `source` (load_omniglot({str(folder)!r})).")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Omniglot folder not found: {origin}{folder} does not exist. Pass root=<folder> "
            f"(or the zip's path as `source`), set {ENV_VAR}, or place images_background_small1.zip / "
            f"images_background_small2.zip in {DEFAULT_DIR}.")
    return folder


def resolve_omniglot(source, root=None) -> Path:
    """The zip file or folder `source` names: an existing path, or an archive name such as
    "images_background_small1" looked up (as .zip, then as a folder) in find_omniglot_dir(root)."""
    path = Path(source).expanduser()
    if path.exists() and (root is None or path.is_absolute()):
        return path
    folder = find_omniglot_dir(root)
    name = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    for candidate in (folder / f"{name}.zip", folder / name):
        if candidate.exists():
            return candidate
    present = sorted(p.name for p in folder.iterdir() if p.suffix == ".zip" or p.is_dir())
    raise FileNotFoundError(f"Omniglot archive {source!r} not found: looked for "
                            f"{folder / name}.zip and {folder / name}/ "
                            f"(that folder holds {present})")


def _index(path: Path) -> list:
    """Sorted [(alphabet, character, file name, member)] for every .png under `path`; member is the
    zip member name or the file Path."""
    entries = []
    if path.is_dir():
        for file in path.rglob("*"):
            parts = file.relative_to(path).parts
            if file.suffix.lower() == ".png" and len(parts) >= 3 and not _hidden(parts):
                entries.append((parts[-3], parts[-2], parts[-1], file))
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as error:
            raise ValueError(f"{path} is not a readable zip file ({error}); it is corrupt or "
                             f"truncated: download it again") from error
        for name in names:
            parts = [p for p in name.split("/") if p]
            if name.lower().endswith(".png") and len(parts) >= 3 and not _hidden(parts):
                entries.append((parts[-3], parts[-2], parts[-1], name))
    if not entries:
        raise ValueError(f"no Omniglot images in {path}: expected <alphabet>/<character>/*.png")
    entries.sort(key=lambda e: e[:3])
    for first, second in zip(entries, entries[1:]):
        # two trees side by side (small1/ and small2/ extracted together share Greek and Latin):
        # merging them would put each image in its class twice, a query beside its own copy
        if first[:3] == second[:3]:
            raise ValueError(f"{path} holds {'/'.join(first[:3])} twice ({first[3]} and {second[3]}): it "
                             f"looks like several Omniglot trees in one place; pass each one as its own "
                             f"source (e.g. .../images_background_small1)")
    return entries


def _hidden(parts) -> bool:
    return any(p.startswith((".", "__MACOSX")) for p in parts)


def omniglot_alphabets(source=BACKGROUND_SMALL1, root=None) -> list:
    """Sorted alphabet names in `source` (archive name, zip path or folder)."""
    return sorted({alphabet for alphabet, _, _, _ in _index(resolve_omniglot(source, root))})


def alphabets_only_in(source, other, root=None) -> list:
    """Sorted alphabets of `source` that `other` does not have
    (alphabets_only_in("images_background_small2", "images_background_small1")
    -> ["Japanese_(katakana)", "Sanskrit", "Tagalog"])."""
    return sorted(set(omniglot_alphabets(source, root)) - set(omniglot_alphabets(other, root)))


def load_omniglot(source=BACKGROUND_SMALL1, *, root=None, alphabets: Sequence[str] | None = None,
                  exclude_alphabets_of=None, image_size=28,
                  show_progress: bool = False) -> ImageSet:
    """Omniglot as an ImageSet: images uint8 [n, 1, H, W] (ink = 255), labels int64 [n],
    class names "<alphabet>/<character>", groups = alphabets, classes and images in sorted order.

    source: archive name ("images_background_small1"), zip path or folder.
    alphabets: keep only these (ValueError names any the source lacks).
    exclude_alphabets_of: drop the alphabets of this other source (or list of sources), e.g.
    load_omniglot("images_background_small2", exclude_alphabets_of="images_background_small1").
    image_size: int or (H, W); 105 keeps the original size.
    """
    path = resolve_omniglot(source, root)
    entries = _index(path)
    available = sorted({e[0] for e in entries})
    wanted = set(available)
    if alphabets is not None:
        alphabets = [alphabets] if isinstance(alphabets, str) else list(alphabets)
        missing = sorted(set(alphabets) - set(available))
        if missing:
            raise ValueError(f"alphabet(s) {missing} are not in {path}; it has {available}")
        wanted = set(alphabets)
    if exclude_alphabets_of is not None:
        others = ([exclude_alphabets_of] if isinstance(exclude_alphabets_of, (str, os.PathLike))
                  else list(exclude_alphabets_of))
        for other in others:
            wanted -= set(omniglot_alphabets(other, root))
    if not wanted:
        raise ValueError(f"no alphabets of {path} are left after the alphabet filters")
    entries = [e for e in entries if e[0] in wanted]

    size_hw = image_size_hw(image_size)
    images = np.empty((len(entries), 1, *size_hw), dtype=np.uint8)
    class_names, class_groups, labels = [], [], np.empty(len(entries), dtype=np.int64)
    archive = None if path.is_dir() else zipfile.ZipFile(path)
    try:
        for i, (alphabet, character, _, member) in enumerate(
                progress(entries, desc=f"reading {path.name}", disable=not show_progress)):
            name = f"{alphabet}/{character}"
            if not class_names or class_names[-1] != name:
                class_names.append(name)
                class_groups.append(alphabet)
            labels[i] = len(class_names) - 1
            try:
                gray = resize_pil(open_image(member.read_bytes if archive is None else
                                             lambda: archive.read(member), "L", f"{member} in {path}"), size_hw)
            except (zipfile.BadZipFile, zlib.error) as error:
                raise ValueError(f"cannot read Omniglot image {member} in {path}: {error}") from error
            images[i, 0] = 255 - np.asarray(gray, dtype=np.uint8)
    finally:
        if archive is not None:
            archive.close()
    label = f"omniglot/{path.name}"
    if wanted != set(available):
        label += ":" + "+".join(sorted(wanted))
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), class_names, class_groups,
                    label)


def load_omniglot_small_split(root=None, image_size=28) -> tuple:
    """(background, evaluation): all of images_background_small1 (5 alphabets) for training, and
    the alphabets of images_background_small2 that small1 lacks (Japanese_(katakana), Sanskrit,
    Tagalog) for few-shot evaluation on unseen alphabets."""
    background = load_omniglot(BACKGROUND_SMALL1, root=root, image_size=image_size)
    evaluation = load_omniglot(BACKGROUND_SMALL2, root=root, image_size=image_size,
                               exclude_alphabets_of=BACKGROUND_SMALL1)
    return background, evaluation
