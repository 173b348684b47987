"""glyphs: the embedded default dataset, an Omniglot-like set rendered from real fonts.

Classes are characters, groups (alphabets) are Unicode scripts or symbol blocks (see
bmssl.data.fonts), instances are font style x pen width x a small random affine. Images are
grayscale uint8 [n, 1, S, S] (S = image_size, 28 by default), bright strokes on black
(ink = 255): the convention of bmssl.data.omniglot too, so the two are interchangeable.

Choosing the characters of an alphabet (in code-point order): drop those that render as the
font's .notdef box, blank or tiny, and those whose silhouette (28 px, every glyph scaled to the
same span) equals one already kept. Alphabets go in order of their first code point, so Latin
keeps "A" and Cyrillic loses its lookalike "А": no two classes of the set look the same.
Letter alphabets keep their first `max_classes_per_alphabet` survivors (Unicode lists the core
alphabet first); symbol blocks keep survivors spread evenly over the block. Alphabets with
fewer than `min_classes_per_alphabet` survivors are dropped.

Drawing an instance: FreeType draws the glyph at RENDER_FONT_SIZE px with the instance's pen
(an outline widens it, an erosion thins it), cropped to its ink. One affine (the alphabet-wide
size normalisation x jitter: rotation, scale, aspect, shear, shift) maps it onto a canvas
SUPERSAMPLE times the output, which is box-filtered down; all instances of a character are one
batched torch.grid_sample. A character's random numbers come from numpy's PCG64 seeded with
(seed, code point), so a subset of alphabets renders exactly the images of the full set.

Results are cached as .npz in bmssl.data.cache.cache_dir(), keyed by the config, the font files,
this code and the Pillow / FreeType / Unicode versions.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import unicodedata
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bmssl.data import cache
from bmssl.data.common import ImageSet
from bmssl.data.fonts import SYMBOL_BLOCKS, FontSource, find_font_source, script_candidates
from bmssl.progress import progress

RENDER_VERSION = 1  # bump whenever a change here alters the rendered pixels
RENDER_FONT_SIZE = 48  # px: glyphs are drawn this big, then resampled
SUPERSAMPLE = 2  # the affine runs on a canvas this many times the output size
REFERENCE_SIZE = 28  # px: size of the silhouettes compared to find duplicates
TYPICAL_FILL = 0.62  # an alphabet's median glyph spans this fraction of the image
MAX_FILL = 0.9  # no glyph spans more than this fraction, whatever the jitter
MIN_FILL = 0.25  # glyphs spanning less than this (after normalisation) are dropped as tiny
MIN_ERODED_INK = 0.45  # a thinner pen is used only when it keeps this fraction of the ink
_SYMBOL_NAMES = frozenset(name for name, _, _ in SYMBOL_BLOCKS)


def _real(value) -> bool:
    """A real number (numpy and torch scalars too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class GlyphConfig:
    """What the glyphs dataset renders.

    image_size: output side in px. instances_per_class: images per character (Omniglot has 20).
    max_classes_per_alphabet / min_classes_per_alphabet: see the module docstring.
    alphabets: render only these (None: all).
    stroke_widths: pen widths as fractions of the font size, relative to the font's own: > 0
        adds an outline that wide, < 0 erodes the strokes (a thinner pen, nearer Omniglot's
        ~1 px strokes; a glyph that would lose most of its ink keeps the font's width).
    pens_per_class: a pen is a (font style, stroke width) pair; each character draws its
        instances in turn with at most this many pens, chosen at random.
    rotation_deg (<= 180), shear (<= 1): symmetric uniform ranges; scale, aspect: (low, high)
        uniform ranges, 0 < low <= high; shift (<= 0.5): the largest offset per axis, as a
        fraction of image_size. Other values raise ValueError.
    seed: drives the pens and the jitter.
    """

    image_size: int = 28
    instances_per_class: int = 20
    max_classes_per_alphabet: int = 40
    min_classes_per_alphabet: int = 10
    alphabets: tuple | None = None
    stroke_widths: tuple = (-0.02, 0.0, 0.015)
    pens_per_class: int = 10
    rotation_deg: float = 10.0
    scale: tuple = (0.85, 1.1)
    aspect: tuple = (0.9, 1.1)
    shear: float = 0.15
    shift: float = 0.06
    seed: int = 0

    def __post_init__(self):
        for name, minimum in (("image_size", 8), ("instances_per_class", 1), ("max_classes_per_alphabet", 1),
                              ("min_classes_per_alphabet", 1), ("pens_per_class", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"GlyphConfig.{name} must be an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers as int (the cache key's repr)
        for name in ("scale", "aspect"):
            pair = getattr(self, name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_real(v) for v in pair)
                    and all(math.isfinite(v) and v > 0 for v in pair) and pair[0] <= pair[1]):
                raise ValueError(f"GlyphConfig.{name} must be a (low, high) pair with 0 < low <= high, "
                                 f"both finite, got {pair!r}")
            object.__setattr__(self, name, (float(pair[0]), float(pair[1])))
        for name, high in (("rotation_deg", 180.0), ("shear", 1.0), ("shift", 0.5)):
            value = getattr(self, name)
            if not (_real(value) and 0.0 <= value <= high):
                raise ValueError(f"GlyphConfig.{name} must be a number in [0, {high}], got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 1 <= self.min_classes_per_alphabet <= self.max_classes_per_alphabet:
            raise ValueError("need 1 <= min_classes_per_alphabet <= max_classes_per_alphabet, got "
                             f"{self.min_classes_per_alphabet} and {self.max_classes_per_alphabet}")
        if not self.stroke_widths or not all(-0.1 < w <= 0.1 for w in self.stroke_widths):
            raise ValueError("stroke_widths must be non-empty, each in (-0.1, 0.1], got "
                             f"{self.stroke_widths}")
        if self.alphabets is not None:
            names = (self.alphabets,) if isinstance(self.alphabets, str) else self.alphabets
            object.__setattr__(self, "alphabets", tuple(sorted(set(names))))
        for name in ("stroke_widths", "scale", "aspect"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))


@dataclass(frozen=True)
class GlyphAlphabet:
    """One alphabet of the catalogue. chars: its characters; fonts: per character, the indices
    into FontSource.files of the fonts that draw it; scale: output px per rendered px at
    image_size 1 (the alphabet-wide size normalisation)."""

    name: str
    chars: tuple
    fonts: tuple
    scale: float


# ---- rasterising --------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _font(path: str, size: int = RENDER_FONT_SIZE):
    from PIL import ImageFont

    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _require_pillow():
    try:
        import PIL  # noqa: F401
    except ImportError as error:
        raise ImportError("the glyphs dataset renders with Pillow: `pip install pillow`") from error


def _rasterise(font, char: str, stroke_px: int = 0):
    """The glyph cropped to its ink, uint8 [h, w] (255 = ink), or None when it has no ink.
    stroke_px > 0 draws an outline that wide around the strokes; < 0 erodes them by -stroke_px
    (falling back to the plain glyph when erosion would keep less than MIN_ERODED_INK of the ink,
    so thin-stroked glyphs do not fall apart)."""
    from PIL import Image, ImageDraw, ImageFilter

    outline = max(stroke_px, 0)
    left, top, right, bottom = font.getbbox(char, stroke_width=outline)
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), char, font=font, fill=255,
                                stroke_width=outline, stroke_fill=255)
    if stroke_px < 0:
        eroded = canvas.filter(ImageFilter.MinFilter(2 * -stroke_px + 1))
        ink = np.asarray(canvas).sum(dtype=np.int64)
        if np.asarray(eroded).sum(dtype=np.int64) >= MIN_ERODED_INK * ink:
            canvas = eroded
    box = canvas.getbbox()
    return np.asarray(canvas.crop(box), dtype=np.uint8) if box else None


@lru_cache(maxsize=64)
def _notdef_pixels(path: str):
    """The font's .notdef rendering (for a code point no font maps), uint8 [h, w] or None."""
    return _rasterise(_font(path), "\U0010fffd", 0)


def _is_notdef(glyph: np.ndarray, path: str) -> bool:
    notdef = _notdef_pixels(path)
    return notdef is not None and np.array_equal(glyph, notdef)


@lru_cache(maxsize=8)
def _sample_points(image_size: int) -> torch.Tensor:
    """float32 [SUPERSAMPLE**2 * image_size**2, 3]: (u, v, 1) for the SUPERSAMPLE x SUPERSAMPLE
    sub-pixel centres of every output pixel, normalised to [-1, 1] over the supersampled canvas;
    ordered (sub-pixel, row, column) so that averaging over the first axis box-filters."""
    canvas = image_size * SUPERSAMPLE
    rows = []
    for sub_y in range(SUPERSAMPLE):
        for sub_x in range(SUPERSAMPLE):
            ys = (torch.arange(image_size, dtype=torch.float64) * SUPERSAMPLE + sub_y) * 2 + 1
            xs = (torch.arange(image_size, dtype=torch.float64) * SUPERSAMPLE + sub_x) * 2 + 1
            v, u = torch.meshgrid(ys / canvas - 1, xs / canvas - 1, indexing="ij")
            rows.append(torch.stack([u.flatten(), v.flatten(), torch.ones_like(u.flatten())], 1))
    return torch.cat(rows).float()


def _place(glyphs: list, which: np.ndarray, matrices: np.ndarray, shifts: np.ndarray,
           image_size: int) -> np.ndarray:
    """Draw glyphs[which[i]] (uint8 [h, w] each) mapped by matrices[i] (float [2, 2], glyph px ->
    output px, about the glyph's centre; shrunk to span at most MAX_FILL of the image) and moved
    by shifts[i] (float [2], output px), for i < n, in one batched bilinear resample on a canvas
    SUPERSAMPLE times the output, box-filtered down. Returns uint8 [n, image_size, image_size]."""
    n = len(which)
    sizes = np.array([g.shape[::-1] for g in glyphs], dtype=np.float64)  # (w, h) per glyph
    pad_w, pad_h = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    stack = np.zeros((len(glyphs), pad_h, pad_w), dtype=np.float32)
    offsets = np.zeros((len(glyphs), 2))
    for k, glyph in enumerate(glyphs):
        h, w = glyph.shape
        top, left = (pad_h - h) // 2, (pad_w - w) // 2
        stack[k, top:top + h, left:left + w] = glyph
        offsets[k] = (left, top)
    used_sizes = sizes[which]
    spans = (np.abs(matrices) @ used_sizes[:, :, None])[:, :, 0].max(1)  # mapped bounding box
    matrices = matrices * np.minimum(1.0, MAX_FILL * image_size / spans)[:, None, None]
    canvas = image_size * SUPERSAMPLE
    inverse = np.linalg.inv(matrices * SUPERSAMPLE)  # canvas px -> glyph px
    in_centre = offsets[which] + used_sizes / 2.0
    out_centre = canvas / 2.0 + np.asarray(shifts, dtype=np.float64) * SUPERSAMPLE
    # normalised coordinates (align_corners=False): x_px = (u + 1) * extent / 2
    to_norm = np.array([2.0 / pad_w, 2.0 / pad_h])
    theta = np.empty((n, 2, 3))
    theta[:, :, :2] = to_norm[None, :, None] * inverse * (canvas / 2.0)
    theta[:, :, 2] = to_norm * (np.einsum("nij,nj->ni", inverse, canvas / 2.0 - out_centre)
                                + in_centre) - 1.0
    points = _sample_points(image_size)  # [P, 3]
    grid = F.linear(points, torch.from_numpy(theta).float().reshape(2 * n, 3))  # [P, 2n]
    grid = grid.view(-1, n, 2).transpose(0, 1).view(n, SUPERSAMPLE * SUPERSAMPLE * image_size,
                                                     image_size, 2)
    source = torch.from_numpy(stack)[torch.from_numpy(np.asarray(which, dtype=np.int64))]
    drawn = F.grid_sample(source[:, None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    drawn = drawn.view(n, SUPERSAMPLE * SUPERSAMPLE, image_size, image_size).mean(1)
    return drawn.round_().clamp_(0, 255).to(torch.uint8).numpy()


# ---- the catalogue ------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _catalogue(files: tuple, max_classes: int, min_classes: int) -> tuple:
    """All alphabets the fonts give, filtered and selected as the module docstring says.
    Returns a tuple of GlyphAlphabet sorted by name."""
    candidates = script_candidates(files)
    by_first_code = sorted(candidates, key=lambda name: (ord(next(iter(candidates[name]))), name))
    seen_silhouettes = set()
    alphabets = []
    for name in by_first_code:
        chars = candidates[name]
        survivors, sizes = [], []
        symbols = name in _SYMBOL_NAMES
        for char, fonts in chars.items():
            path = str(files[fonts[0]])
            glyph = _rasterise(_font(path), char, 0)
            if glyph is None or _is_notdef(glyph, path):
                continue
            survivors.append((char, fonts, glyph))
            sizes.append(max(glyph.shape))
            if not symbols and len(survivors) >= 3 * max_classes:
                break  # letters keep the first survivors; 3x leaves room for the filters below
        if not survivors:
            continue
        scale = TYPICAL_FILL * REFERENCE_SIZE / float(np.median(sizes))
        survivors = [s for s in survivors if max(s[2].shape) * scale >= MIN_FILL * REFERENCE_SIZE]
        if not survivors:
            continue
        count = len(survivors)
        # silhouettes: each glyph scaled to the same span, so lookalikes match across alphabets
        # whatever their alphabet's size normalisation
        fit_scale = np.array([TYPICAL_FILL * REFERENCE_SIZE / max(glyph.shape)
                              for _, _, glyph in survivors])
        silhouettes = _place([glyph for _, _, glyph in survivors], np.arange(count),
                             fit_scale[:, None, None] * np.eye(2), np.zeros((count, 2)),
                             REFERENCE_SIZE) >= 128
        kept, kept_silhouettes = [], set()
        for (char, fonts, _), silhouette in zip(survivors, silhouettes):
            key = silhouette.tobytes()
            if not silhouette.any() or key in seen_silhouettes or key in kept_silhouettes:
                continue
            kept_silhouettes.add(key)
            kept.append((char, fonts, key))
        if symbols and len(kept) > max_classes:
            spread = np.linspace(0, len(kept) - 1, max_classes).round().astype(int)
            kept = [kept[i] for i in spread]
        kept = kept[:max_classes]
        if len(kept) < min_classes:
            continue
        seen_silhouettes.update(key for _, _, key in kept)
        alphabets.append(GlyphAlphabet(name, tuple(c for c, _, _ in kept),
                                       tuple(f for _, f, _ in kept), scale / REFERENCE_SIZE))
    return tuple(sorted(alphabets, key=lambda alphabet: alphabet.name))


def glyph_alphabets(font_dir=None, config: GlyphConfig | None = None) -> list:
    """The alphabets the glyphs dataset would render with these fonts and config (the
    config's own `alphabets` filter ignored). Returns a list of GlyphAlphabet, sorted by name."""
    _require_pillow()
    config = config or GlyphConfig()
    source = find_font_source(font_dir)
    with _single_torch_thread():
        return list(_catalogue(source.files, config.max_classes_per_alphabet,
                               config.min_classes_per_alphabet))


# ---- rendering ----------------------------------------------------------------------------------
def _render_char(char: str, font_paths: list, config: GlyphConfig, alphabet_scale: float):
    """uint8 [instances_per_class, image_size, image_size]: the instances of one character."""
    size = config.image_size
    rng = np.random.default_rng([config.seed, ord(char)])
    pens = [(path, width) for path in font_paths for width in config.stroke_widths]
    order = rng.permutation(len(pens))[:config.pens_per_class]
    n = config.instances_per_class
    angle = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, n))
    scale = rng.uniform(*config.scale, n)
    aspect = rng.uniform(*config.aspect, n)
    shear = rng.uniform(-config.shear, config.shear, n)
    shift = rng.uniform(-config.shift, config.shift, (n, 2)) * size
    # matrix = zoom * rotation @ shear @ diag(aspect, 1 / aspect)
    cos, sin = np.cos(angle), np.sin(angle)
    zoom = alphabet_scale * size * scale
    matrices = np.empty((n, 2, 2))
    matrices[:, 0, 0] = zoom * cos * aspect
    matrices[:, 0, 1] = zoom * (cos * shear - sin) / aspect
    matrices[:, 1, 0] = zoom * sin * aspect
    matrices[:, 1, 1] = zoom * (sin * shear + cos) / aspect
    used = sorted(set(int(order[i % len(order)]) for i in range(n)))
    glyphs = []
    for pen in used:
        path, width = pens[pen]
        glyph = _rasterise(_font(path), char, int(round(width * RENDER_FONT_SIZE)))
        if glyph is None:
            raise RuntimeError(f"{path} drew no ink for U+{ord(char):04X}; the catalogue should "
                               f"have dropped it")
        glyphs.append(glyph)
    which = np.array([used.index(int(order[i % len(order)])) for i in range(n)])
    return _place(glyphs, which, matrices, shift, size)


def _render(source: FontSource, alphabets: list, config: GlyphConfig, show_progress: bool):
    """Every instance of every character of `alphabets`: (images uint8 [n, 1, S, S],
    labels int64 [n], class names, class groups)."""
    images, labels, names, groups = [], [], [], []
    total = sum(len(a.chars) for a in alphabets)
    steps = ((alphabet, char, fonts) for alphabet in alphabets
             for char, fonts in zip(alphabet.chars, alphabet.fonts))
    for alphabet, char, fonts in progress(steps, desc="rendering glyphs", total=total,
                                          disable=not show_progress):
        paths = [str(source.files[i]) for i in fonts]
        images.append(_render_char(char, paths, config, alphabet.scale))
        labels.append(np.full(config.instances_per_class, len(names), dtype=np.int64))
        names.append(f"{alphabet.name}/U+{ord(char):04X}")
        groups.append(alphabet.name)
    if not images:
        raise ValueError("the glyph config selects no alphabets to render")
    return np.concatenate(images)[:, None], np.concatenate(labels), names, groups


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """sha256 of this module's and bmssl.data.fonts' source: any edit re-renders the cache."""
    from bmssl.data import fonts

    digest = hashlib.sha256()
    for module_file in (__file__, fonts.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()


@contextmanager
def _single_torch_thread():
    """Run torch on one thread inside: the per-character ops are tiny, and spreading them over
    several threads of a busy machine makes rendering ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cache_description(source: FontSource, config: GlyphConfig) -> dict:
    import PIL
    from PIL import features

    return {"dataset": "glyphs", "render_version": RENDER_VERSION, "code": _code_fingerprint(),
            "config": asdict(config), "font_source": source.name, "fonts": source.fingerprint(),
            "constants": [RENDER_FONT_SIZE, SUPERSAMPLE, REFERENCE_SIZE, TYPICAL_FILL, MAX_FILL,
                          MIN_FILL, MIN_ERODED_INK],
            "pillow": PIL.__version__, "freetype": features.version("freetype2"),
            "unicode": unicodedata.unidata_version}


def load_glyphs(config: GlyphConfig | None = None, *, font_dir=None, use_cache: bool = True,
                show_progress: bool = True, **overrides) -> ImageSet:
    """The glyphs dataset as an ImageSet: images uint8 [n, 1, S, S] (ink = 255), labels int64 [n],
    class names "<alphabet>/U+XXXX", groups = alphabets, source "glyphs/<font source>@<key>".

    config: a GlyphConfig; keyword `overrides` replace its fields (load_glyphs(image_size=32)).
    font_dir: a folder of fonts instead of the default source (bmssl.data.fonts.find_font_source).
    use_cache: read / write the .npz cache (bmssl.data.cache.cache_dir()).
    Raises FileNotFoundError when no fonts are found, ValueError for unknown alphabets.
    """
    _require_pillow()
    config = replace(config or GlyphConfig(), **overrides)
    source = find_font_source(font_dir)
    key = cache.cache_key(_cache_description(source, config))
    label = f"glyphs/{source.name}@{key[:10]}"
    path = cache.cache_dir() / f"glyphs-{key[:24]}.npz"
    cached = cache.load_arrays(path, key) if use_cache else None
    if cached is not None:
        arrays, _ = cached
        return ImageSet(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]),
                        list(arrays["class_names"]), list(arrays["class_groups"]), label)

    alphabets = glyph_alphabets(font_dir, config)
    if config.alphabets is not None:
        available = [a.name for a in alphabets]
        unknown = sorted(set(config.alphabets) - set(available))
        if unknown:
            raise ValueError(f"unknown glyph alphabet(s) {unknown} for font source "
                             f"{source.name}; available: {available}")
        alphabets = [a for a in alphabets if a.name in config.alphabets]
    with _single_torch_thread():
        images, labels, names, groups = _render(source, alphabets, config, show_progress)
    if use_cache:
        cache.save_arrays(path, {"images": images, "labels": labels,
                                 "class_names": np.array(names, dtype=str),
                                 "class_groups": np.array(groups, dtype=str)},
                          key, {"source": label, "font_dir": str(source.directory)})
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), names, groups, label)
