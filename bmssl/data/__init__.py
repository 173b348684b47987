"""Offline datasets, all loaded into one in-memory form, bmssl.data.ImageSet.

    from bmssl import data
    glyphs = data.load_glyphs()                        # embedded default, rendered from fonts
    train, test = glyphs.split_by_group((0.8, 0.2), seed=0)
    background = data.load_omniglot("images_background_small1")
    evaluation = data.load_omniglot("images_background_small2",
                                    exclude_alphabets_of="images_background_small1")
    folder = data.load_image_folder("path/to/miniImageNet/train", image_size=84)

Grayscale sets use bright ink on black (255 = stroke). Rendered glyphs are cached in
$BMSSL_CACHE_DIR (default ~/.cache/bmssl).
"""
from bmssl.data.cache import cache_dir
from bmssl.data.common import ImageSet
from bmssl.data.folder import load_image_folder, scan_image_folder
from bmssl.data.fonts import FontSource, find_font_source
from bmssl.data.glyphs import GlyphAlphabet, GlyphConfig, glyph_alphabets, load_glyphs
from bmssl.data.omniglot import (alphabets_only_in, find_omniglot_dir, load_omniglot,
                                 load_omniglot_small_split, omniglot_alphabets, resolve_omniglot)

__all__ = ["ImageSet", "cache_dir", "load_glyphs", "GlyphConfig", "GlyphAlphabet",
           "glyph_alphabets", "FontSource", "find_font_source", "load_omniglot",
           "load_omniglot_small_split", "omniglot_alphabets", "alphabets_only_in",
           "find_omniglot_dir", "resolve_omniglot", "load_image_folder", "scan_image_folder"]
