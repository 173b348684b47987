"""Font sources for the glyphs dataset, and which characters each font can draw for which alphabet.

Sources, first found wins:
  1. an explicit folder, not searched recursively (`font_dir=` or $BMSSL_FONT_DIR)
                                                               -> "custom:<folder name>"
  2. Debian's fonts-noto-core, /usr/share/fonts/truetype/noto  -> "noto-core" (~140 scripts)
  3. the DejaVu fonts inside matplotlib's wheel                -> "dejavu-matplotlib" (~25)
Only the styles Regular, Bold, Italic/Oblique and BoldItalic/BoldOblique are used; *UI and
*Display families (near-duplicates / tiny subsets) are skipped.

Alphabets are Unicode scripts, named from the character names ("GREEK CAPITAL LETTER ALPHA" ->
"Greek"), plus a few symbol blocks (Braille, Arrows, Box_Drawing, ...). A letter is a candidate
when it is a base letter (category Lu/Lt/Lo, or Ll whose capital the font lacks) with no Unicode
decomposition, so accented and compatibility forms (À, ﬁ, presentation forms) are left out.
A font serves a script when its family is generic (NotoSans, DejaVuSerif, ...), names the script
(NotoSansDevanagari) or has that script as its largest one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FONT_DIR_ENV = "BMSSL_FONT_DIR"
NOTO_DIR = Path("/usr/share/fonts/truetype/noto")
FONT_SUFFIXES = (".ttf", ".otf")
STYLES = ("Regular", "Bold", "Italic", "BoldItalic", "Oblique", "BoldOblique")
INSTALL_HINT = ("install one: `pip install matplotlib` (ships the DejaVu fonts) or "
                "`apt-get install fonts-noto-core` (~140 scripts), or point BMSSL_FONT_DIR "
                "(or font_dir=) at a folder of .ttf/.otf fonts")

# Symbol "alphabets": (name, first code point, last code point); categories So and Sm only.
SYMBOL_BLOCKS = (
    ("Arrows", 0x2190, 0x21FF),
    ("Mathematical_Operators", 0x2200, 0x22FF),
    ("Miscellaneous_Technical", 0x2300, 0x23FF),
    ("Box_Drawing", 0x2500, 0x257F),
    ("Geometric_Shapes", 0x25A0, 0x25FF),
    ("Miscellaneous_Symbols", 0x2600, 0x26FF),
    ("Dingbats", 0x2700, 0x27BF),
    ("Braille", 0x2800, 0x28FF),
    ("Supplemental_Mathematical_Operators", 0x2A00, 0x2AFF),
    ("Miscellaneous_Symbols_and_Arrows", 0x2B00, 0x2BFF),
    ("Yijing_Hexagrams", 0x4DC0, 0x4DFF),
    ("Tai_Xuan_Jing", 0x1D300, 0x1D35F),
    ("Alchemical_Symbols", 0x1F700, 0x1F77F),
)
_NAME_SEPARATORS = (" LETTER ", " SYLLABLE ", " SYLLABICS ", " CHARACTER ", " SIGN ",
                    " HIEROGLYPH ", " IDEOGRAPH", " IDEOGRAM ")
# An alphabet is drawn in at most this many fonts, each covering at least this fraction of what
# the best-covering font covers (keeps the dotted circle of 190 Noto fonts out of Geometric_Shapes).
MAX_FONTS_PER_ALPHABET = 12
MIN_RELATIVE_COVERAGE = 0.5


@dataclass(frozen=True)
class FontSource:
    """A set of font files. name: "noto-core", "dejavu-matplotlib" or "custom:<folder>";
    files: the usable font files, sorted by file name."""

    name: str
    directory: Path
    files: tuple

    def fingerprint(self) -> list:
        """[[file name, size in bytes, sha1 of the bytes], ...]: what the glyph cache key records
        of the fonts, so a font replaced in place (same name, same size) renders afresh."""
        return [[path.name, path.stat().st_size, _content_sha1(path)] for path in self.files]


def _content_sha1(path: Path) -> str:
    """sha1 of a font file, remembered per (path, size, mtime) for this process: hashing the
    ~200 Noto files takes a noticeable fraction of a second, once."""
    stat = path.stat()
    return _sha1_of(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1024)
def _sha1_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _style_files(directory: Path, prefix: str = "") -> tuple:
    files = []
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if path.suffix.lower() not in FONT_SUFFIXES or not path.name.startswith(prefix):
            continue
        family, _, style = path.stem.partition("-")
        if (style or "Regular") in STYLES and not family.endswith(("UI", "Display")):
            files.append(path)
    return tuple(files)


def matplotlib_font_dir():
    """matplotlib's bundled font folder (found without importing matplotlib), or None when
    matplotlib is not installed."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


def find_font_source(font_dir=None) -> FontSource:
    """The font source to render from (see the module docstring for the order).
    Raises FileNotFoundError, naming what to install, when none is usable."""
    explicit = font_dir if font_dir is not None else os.environ.get(FONT_DIR_ENV)
    if explicit:
        directory = Path(explicit).expanduser()
        origin = "font_dir=" if font_dir is not None else f"{FONT_DIR_ENV}="
        if not directory.is_dir():
            raise FileNotFoundError(f"{origin}{directory} is not a folder of fonts")
        files = _style_files(directory)
        if not files:
            raise FileNotFoundError(f"{origin}{directory} holds no .ttf/.otf fonts in the styles "
                                    f"{', '.join(STYLES)}")
        return FontSource(f"custom:{directory.name}", directory, files)
    if NOTO_DIR.is_dir():
        files = _style_files(NOTO_DIR, "Noto")
        if files:
            return FontSource("noto-core", NOTO_DIR, files)
    mpl_dir = matplotlib_font_dir()
    if mpl_dir is not None and mpl_dir.is_dir():
        files = _style_files(mpl_dir, "DejaVu")
        if files:
            return FontSource("dejavu-matplotlib", mpl_dir, files)
    raise FileNotFoundError(f"the glyphs dataset needs fonts and found none ({NOTO_DIR} is absent "
                            f"and matplotlib is not installed); {INSTALL_HINT}")


def script_of(char: str, known_scripts=frozenset()):
    """The alphabet a candidate character belongs to ("Greek", "Old_Italic", "Braille"), or None
    when it is not a candidate (not a base letter or a symbol of SYMBOL_BLOCKS).

    The script is the part of the character's name before LETTER / SYLLABLE / SIGN / ...
    ("OLD ITALIC LETTER A" -> "Old_Italic"), less CAPITAL / SMALL. A name without such a word
    ("PAU CIN HAU RISING TONE") takes the longest of `known_scripts` it starts with, else its
    first word."""
    category = unicodedata.category(char)
    if unicodedata.decomposition(char):
        return None
    if category in ("So", "Sm"):
        code = ord(char)
        for name, first, last in SYMBOL_BLOCKS:
            if first <= code <= last:
                return name
        return None
    if category not in ("Lu", "Ll", "Lt", "Lo"):
        return None
    name = unicodedata.name(char, "")
    key = _named_script(name)
    if key is None and name:
        prefixes = [k for k in known_scripts
                    if (name + " ").startswith(k.upper().replace("_", " ") + " ")]
        key = max(prefixes, key=len) if prefixes else name.split(" ")[0].title()
    return key


def _named_script(name: str):
    for separator in _NAME_SEPARATORS:
        if separator in name:
            key = re.sub(r"( CAPITAL| SMALL)+$", "", name.split(separator)[0])
            return key.title().replace(" ", "_") if key else None
    return None


def _read_cmap(path: Path) -> frozenset:
    try:
        from fontTools.ttLib import TTFont
    except ImportError as error:
        raise ImportError("the glyphs dataset reads font character maps with fontTools; "
                          "`pip install matplotlib` (which brings fonttools) or "
                          "`pip install fonttools`") from error
    with TTFont(str(path), lazy=True) as font:
        return frozenset(font["cmap"].getBestCmap() or {})


def _family_remainder(path: Path) -> str:
    family = path.stem.partition("-")[0]
    family = re.sub(r"^(Noto|DejaVu)(Sans|Serif)?", "", family)
    return re.sub(r"(Mono|Condensed)+$", "", family).lower()


@lru_cache(maxsize=4)
def script_candidates(files: tuple) -> dict:
    """For each alphabet, the fonts that draw each of its candidate characters.
    Returns {alphabet name: {char: (index into `files`, ...)}}, alphabets sorted by name, chars in
    code-point order; fonts are limited by MAX_FONTS_PER_ALPHABET and MIN_RELATIVE_COVERAGE."""
    cmaps = [_read_cmap(path) for path in files]
    known_scripts = frozenset(filter(None, (_named_script(unicodedata.name(chr(code), ""))
                                            for cmap in cmaps for code in cmap
                                            if unicodedata.category(chr(code))[0] == "L")))
    per_font = []
    for cmap in cmaps:
        letters = {}
        for code in cmap:
            char = chr(code)
            script = script_of(char, known_scripts)
            if script is None:
                continue
            if unicodedata.category(char) == "Ll":
                upper = char.upper()
                if len(upper) == 1 and upper != char and ord(upper) in cmap:
                    continue  # the capital stands for the letter
            letters[char] = script
        per_font.append(letters)
    symbol_names = {name for name, _, _ in SYMBOL_BLOCKS}
    alphabets: dict = {}
    for index, (path, letters) in enumerate(zip(files, per_font)):
        counts = Counter(s for s in letters.values() if s not in symbol_names)
        top = counts.most_common(1)[0][0] if counts else None
        remainder = _family_remainder(path)
        for char, script in letters.items():
            serves = (script in symbol_names or not remainder or script == top
                      or script.replace("_", "").lower() in remainder)
            if serves:
                alphabets.setdefault(script, {}).setdefault(char, []).append(index)
    result = {}
    for script, chars in sorted(alphabets.items()):
        coverage = Counter(index for fonts in chars.values() for index in fonts)
        best = max(coverage.values())
        ranked = sorted(coverage, key=lambda index: (-coverage[index], files[index].name))
        kept = {index for index in ranked[:MAX_FONTS_PER_ALPHABET]
                if coverage[index] >= best * MIN_RELATIVE_COVERAGE}
        styles = {char: tuple(i for i in fonts if i in kept)
                  for char, fonts in sorted(chars.items())}
        result[script] = {char: fonts for char, fonts in styles.items() if fonts}
    return result
