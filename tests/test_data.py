"""bmssl.data: ImageSet and its splits, the rendered glyphs set and its cache, Omniglot from the
shared zips (skipped with a reason where they are absent), and the class-folder loader."""
import io
import os
import unicodedata
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bmssl import data
from bmssl.data import cache, fonts, glyphs, omniglot
from bmssl.data.common import ImageSet

# ---- helpers ------------------------------------------------------------------------------------
PREFERRED_ALPHABETS = ("Armenian", "Braille", "Greek", "Hebrew")
SMALL = dict(max_classes_per_alphabet=12, instances_per_class=6)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_VAR, str(folder))
    return folder


@pytest.fixture(scope="module")
def alphabet_names():
    names = [a.name for a in data.glyph_alphabets()]
    picked = [n for n in PREFERRED_ALPHABETS if n in names]
    return tuple(picked if len(picked) >= 3 else names[:4])


def small_glyphs(alphabets, **overrides):
    options = dict(SMALL, alphabets=alphabets, use_cache=False, show_progress=False)
    options.update(overrides)
    return data.load_glyphs(**options)


def synthetic_set(groups=10, classes_per_group=3, per_class=2, channels=1, size=8):
    names, class_groups = [], []
    for g in range(groups):
        for c in range(classes_per_group):
            names.append(f"group{g}/class{c}")
            class_groups.append(f"group{g}")
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    images = (labels.view(-1, 1, 1, 1) * 7 % 256).to(torch.uint8).expand(-1, channels, size, size)
    return ImageSet(images.contiguous(), labels, names, class_groups, "synthetic")


# ---- ImageSet -----------------------------------------------------------------------------------
def test_imageset_validates_its_fields():
    good = synthetic_set(groups=2)
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(good.images.float(), good.labels, good.class_names, good.class_groups)
    with pytest.raises(ValueError, match="int64"):
        ImageSet(good.images, good.labels.int(), good.class_names, good.class_groups)
    with pytest.raises(ValueError, match="labels must lie"):
        ImageSet(good.images, good.labels + 1, good.class_names, good.class_groups)
    with pytest.raises(ValueError, match="class groups"):
        ImageSet(good.images, good.labels, good.class_names, good.class_groups[:-1])


def test_imageset_float_counts_and_indices():
    dataset = synthetic_set(groups=3, per_class=4)
    as_float = dataset.float()
    assert as_float.dtype == torch.float32 and as_float.shape == dataset.images.shape
    assert torch.allclose(as_float * 255, dataset.images.float())
    assert dataset.class_counts().tolist() == [4] * 9
    for label, positions in enumerate(dataset.class_indices()):
        assert (dataset.labels[positions] == label).all() and len(positions) == 4


def test_select_classes_relabels_in_the_given_order():
    dataset = synthetic_set(groups=3)
    chosen = dataset.select_classes(["group2/class1", 0])
    assert chosen.class_names == ["group2/class1", "group0/class0"]
    assert chosen.labels.tolist() == [1, 1, 0, 0], "images keep their original order"
    original = dataset.class_indices()
    assert torch.equal(chosen.images[chosen.labels == 0], dataset.images[original[7]])
    assert torch.equal(chosen.images[chosen.labels == 1], dataset.images[original[0]])
    with pytest.raises(ValueError, match="unknown class"):
        dataset.select_classes(["nope"])
    with pytest.raises(ValueError, match="unknown group"):
        dataset.select_groups(["group9"])


def test_split_by_group_is_disjoint_complete_and_seeded():
    dataset = synthetic_set(groups=10)
    parts = dataset.split_by_group((0.6, 0.2, 0.2), seed=3)
    group_sets = [set(p.groups) for p in parts]
    assert [len(g) for g in group_sets] == [6, 2, 2]
    assert set().union(*group_sets) == set(dataset.groups)
    assert all(a.isdisjoint(b) for i, a in enumerate(group_sets) for b in group_sets[i + 1:])
    assert sum(len(p) for p in parts) == len(dataset)
    again = dataset.split_by_group((0.6, 0.2, 0.2), seed=3)
    assert [p.groups for p in again] == [p.groups for p in parts]
    assert torch.equal(again[0].images, parts[0].images)
    others = {tuple(dataset.split_by_group((0.6, 0.2, 0.2), seed=s)[1].groups) for s in range(6)}
    assert len(others) > 1, "the seed does not change the split"


def test_split_by_group_mapping_explicit_and_errors():
    dataset = synthetic_set(groups=4)
    named = dataset.split_by_group({"train": 0.75, "test": 0.25}, seed=0)
    assert set(named) == {"train", "test"} and len(named["test"].groups) == 1
    explicit = dataset.split_by_group([["group0", "group3"], ["group1"]])
    assert explicit[0].groups == ["group0", "group3"] and explicit[1].groups == ["group1"]
    with pytest.raises(ValueError, match="overlap"):
        dataset.split_by_group([["group0"], ["group0"]])
    with pytest.raises(ValueError, match="sum to 1"):
        dataset.split_by_group((0.5, 0.2))
    with pytest.raises(ValueError, match="non-empty parts"):
        dataset.split_by_group((0.2, 0.2, 0.2, 0.2, 0.1, 0.1))
    with pytest.raises(ValueError, match="not a mix"):
        dataset.split_by_group([0.5, ["group0"]])


def test_split_by_class_fractions():
    dataset = synthetic_set(groups=5, classes_per_group=4)
    train, test = dataset.split_by_class((0.75, 0.25), seed=1)
    assert (train.num_classes, test.num_classes) == (15, 5)
    assert set(train.class_names).isdisjoint(test.class_names)


# ---- fonts --------------------------------------------------------------------------------------
def test_script_of_names_alphabets_and_rejects_non_letters():
    assert fonts.script_of("\u0391") == "Greek"  # GREEK CAPITAL LETTER ALPHA
    assert fonts.script_of("\U00010300") == "Old_Italic"
    assert fonts.script_of("\u2801") == "Braille"
    assert fonts.script_of("\u00e9") is None  # é decomposes to e + acute
    assert fonts.script_of("\u0301") is None  # combining mark
    assert fonts.script_of("7") is None and fonts.script_of(" ") is None
    tone = unicodedata.lookup("PAU CIN HAU RISING TONE LONG")  # a letter named without LETTER
    assert fonts.script_of(tone) == "Pau"
    assert fonts.script_of(tone, frozenset({"Pau_Cin_Hau", "Pau"})) == "Pau_Cin_Hau"


def test_missing_fonts_raise_an_error_that_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(fonts.FONT_DIR_ENV, raising=False)
    monkeypatch.setattr(fonts, "NOTO_DIR", tmp_path / "no-noto")
    monkeypatch.setattr(fonts, "matplotlib_font_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install matplotlib.*fonts-noto-core"):
        fonts.find_font_source()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        fonts.find_font_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        fonts.find_font_source(tmp_path / "empty")


def test_notdef_rendering_is_recognised():
    source = fonts.find_font_source()
    path = str(source.files[0])
    cmap = fonts._read_cmap(source.files[0])
    missing = next(c for c in (0x0915, 0x0E01, 0x1200, 0xA000, 0x13000, 0x12000) if c not in cmap)
    present = next(c for c in cmap if fonts.script_of(chr(c)))
    missing_glyph = glyphs._rasterise(glyphs._font(path), chr(missing))
    present_glyph = glyphs._rasterise(glyphs._font(path), chr(present))
    assert missing_glyph is not None and glyphs._is_notdef(missing_glyph, path)
    assert present_glyph is not None and not glyphs._is_notdef(present_glyph, path)


# ---- glyphs -------------------------------------------------------------------------------------
def test_glyphs_shapes_labels_and_source(alphabet_names):
    dataset = small_glyphs(alphabet_names)
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (1, 28, 28)
    assert dataset.labels.dtype == torch.int64
    assert dataset.groups == sorted(alphabet_names)
    assert dataset.class_counts().tolist() == [SMALL["instances_per_class"]] * dataset.num_classes
    assert all(10 <= dataset.class_groups.count(g) <= 12 for g in alphabet_names)
    for name, group in zip(dataset.class_names, dataset.class_groups):
        alphabet, code = name.split("/U+")
        assert alphabet == group and fonts.script_of(chr(int(code, 16))) == group
    assert dataset.source.startswith(f"glyphs/{fonts.find_font_source().name}@")
    bigger = small_glyphs(alphabet_names[:1], image_size=36, instances_per_class=2)
    assert bigger.images.shape[1:] == (1, 36, 36)


def test_glyphs_are_deterministic_per_seed(alphabet_names):
    first = small_glyphs(alphabet_names, seed=5)
    second = small_glyphs(alphabet_names, seed=5)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.class_names == second.class_names
    other = small_glyphs(alphabet_names, seed=6)
    assert other.class_names == first.class_names
    assert not torch.equal(other.images, first.images)


def test_a_subset_renders_the_same_images_as_a_larger_set(alphabet_names):
    larger = small_glyphs(alphabet_names)
    subset = small_glyphs(alphabet_names[1:2])
    assert torch.equal(larger.select_groups(alphabet_names[1:2]).images, subset.images)


def test_glyph_images_have_ink_and_classes_differ(alphabet_names):
    dataset = small_glyphs(alphabet_names)
    pixels = dataset.float()
    ink = pixels.mean(dim=(1, 2, 3))
    assert (pixels.amax(dim=(1, 2, 3)) > 0.7).all(), "an image has no solid stroke"
    assert (ink > 0.01).all() and (ink < 0.6).all(), "an image is blank or mostly ink"
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0],
                        pixels[..., :, -1]], -1)
    assert border.mean() < 0.05, "the background should be dark (ink = 255 convention)"
    per_class = torch.stack([pixels[i] for i in dataset.class_indices()])  # [C, K, 1, H, W]
    within = (per_class[:, 0] - per_class[:, 1]).abs().mean(dim=(1, 2, 3))
    assert (within > 0).all(), "instances of a class should differ (style / jitter)"
    means = per_class.mean(1).flatten(1)
    distance = torch.cdist(means, means, p=1) / means.shape[1]
    distance.fill_diagonal_(float("inf"))
    assert distance.min() > 0.005, "two classes look the same on average"


def test_lookalikes_across_alphabets_are_kept_once():
    names = {a.name: a for a in data.glyph_alphabets()}
    if not {"Latin", "Cyrillic"} <= set(names):
        pytest.skip("this font source has no Latin and Cyrillic alphabets")
    assert "A" in names["Latin"].chars
    assert "\u0410" not in names["Cyrillic"].chars  # CYRILLIC CAPITAL A renders like Latin A
    assert "\u0416" in names["Cyrillic"].chars  # ZHE has no Latin twin


@pytest.mark.parametrize("field, value", [
    ("scale", (0.0, 0.0)), ("scale", (1.2, 0.8)), ("aspect", (0.9, float("inf"))), ("aspect", (-1.0, 1.0)),
    ("shift", 5.0), ("shift", -0.1), ("rotation_deg", float("nan")), ("shear", 3.0),
    ("image_size", 28.5), ("image_size", 4), ("instances_per_class", 0), ("pens_per_class", True),
    ("stroke_widths", (0.0, 0.5)), ("stroke_widths", ()), ("seed", -1),
    ("shear", True), ("scale", 0.9), ("scale", ("0.8", "1.0")),  # True was accepted as 1
])
def test_bad_glyph_config_names_the_field(field, value):
    """Degenerate ranges once failed deep in the renderer (LinAlgError) or rendered blank images."""
    with pytest.raises(ValueError, match=field):
        glyphs.GlyphConfig(**{field: value})


def test_glyph_config_takes_numpy_scalars():
    """np.float32(0.05) was refused: 'must lie in [0, 0.5], got np.float32(0.05)'."""
    config = glyphs.GlyphConfig(shift=np.float32(0.05), image_size=np.int64(28), scale=[np.float64(0.9), 1])
    assert type(config.shift) is float and type(config.image_size) is int and config.scale == (0.9, 1.0)
    assert glyphs.GlyphConfig() == glyphs.GlyphConfig(image_size=np.int32(28)), "the same cache key"


def test_unknown_glyph_alphabet_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown glyph alphabet.*Klingon"):
        data.load_glyphs(alphabets=("Klingon",), use_cache=False, show_progress=False)


def test_glyph_cache_round_trip(alphabet_names, private_cache, monkeypatch):
    fresh = small_glyphs(alphabet_names, use_cache=True)
    files = list(private_cache.glob("glyphs-*.npz"))
    assert len(files) == 1
    render = glyphs._render
    monkeypatch.setattr(glyphs, "_render", lambda *a, **k: pytest.fail("re-rendered a cached set"))
    cached = small_glyphs(alphabet_names, use_cache=True)
    assert torch.equal(cached.images, fresh.images) and torch.equal(cached.labels, fresh.labels)
    assert cached.class_names == fresh.class_names and cached.class_groups == fresh.class_groups
    assert cached.source == fresh.source
    monkeypatch.setattr(glyphs, "_render", render)
    small_glyphs(alphabet_names, use_cache=True, seed=1)
    assert len(list(private_cache.glob("glyphs-*.npz"))) == 2, "another seed must get its own file"


def test_font_fingerprint_sees_a_file_replaced_with_the_same_name_size_and_mtime(tmp_path):
    font = tmp_path / "Font-Regular.ttf"
    font.write_bytes(b"A" * 64)
    source = fonts.FontSource("custom:x", tmp_path, (font,))
    before = source.fingerprint()
    stat = font.stat()
    font.write_bytes(b"B" * 64)
    os.utime(font, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fonts._sha1_of.cache_clear()  # what a new process sees: the hash is remembered per process
    after = source.fingerprint()
    assert before[0][:2] == after[0][:2] == ["Font-Regular.ttf", 64] and before != after


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered", "empty"])
def test_corrupt_glyph_cache_is_rerendered(alphabet_names, private_cache, damage):
    fresh = small_glyphs(alphabet_names[:2], use_cache=True)
    (path,) = private_cache.glob("glyphs-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not an npz file at all" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
        arrays["images"] = arrays["images"].copy()
        arrays["images"][0, 0, 0, 0] ^= 0xFF
        np.savez_compressed(path, **arrays)
    with pytest.warns(UserWarning, match="ignoring the cache file"):
        again = small_glyphs(alphabet_names[:2], use_cache=True)
    assert torch.equal(again.images, fresh.images)
    key = cache.cache_key(glyphs._cache_description(
        fonts.find_font_source(), glyphs.GlyphConfig(**SMALL, alphabets=alphabet_names[:2])))
    assert cache.load_arrays(path, key) is not None, "the rebuilt file should be valid again"


def test_cache_write_is_atomic_and_survives_an_unwritable_folder(tmp_path):
    arrays = {"x": np.arange(10, dtype=np.int64)}
    target = tmp_path / "sub" / "file.npz"
    assert cache.save_arrays(target, arrays, "k1")
    assert [p.name for p in target.parent.iterdir()] == ["file.npz"], "temp file left behind"
    loaded, meta = cache.load_arrays(target, "k1")
    assert np.array_equal(loaded["x"], arrays["x"]) and meta == {}
    with pytest.warns(UserWarning, match="different key"):
        assert cache.load_arrays(target, "k2") is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write"):
        assert not cache.save_arrays(blocker / "inside.npz", arrays, "k1")


@pytest.mark.slow
def test_default_glyph_set_size(private_cache):
    dataset = data.load_glyphs(show_progress=False)
    assert len(dataset.groups) >= 20 and dataset.num_classes >= 500
    assert dataset.class_counts().eq(20).all() and dataset.images.shape[1:] == (1, 28, 28)
    train, test = dataset.split_by_group((0.8, 0.2), seed=0)
    assert set(train.groups).isdisjoint(test.groups)


# ---- Omniglot ------------------------------------------------------------------------------------
SMALL1_ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
SMALL2_ONLY = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


@pytest.fixture(scope="module")
def omniglot_dir():
    try:
        folder = omniglot.find_omniglot_dir()
    except FileNotFoundError as error:
        pytest.skip(f"Omniglot data not available: {error}")
    for name in (omniglot.BACKGROUND_SMALL1, omniglot.BACKGROUND_SMALL2):
        if not (folder / f"{name}.zip").is_file():
            pytest.skip(f"Omniglot data not available: {folder / name}.zip is missing")
    return folder


def zip_alphabets(path):
    with zipfile.ZipFile(path) as archive:
        return {n.split("/")[1] for n in archive.namelist() if n.endswith(".png")}


def test_omniglot_small1_loads_from_the_zip(omniglot_dir):
    dataset = data.load_omniglot("images_background_small1")
    assert data.omniglot_alphabets("images_background_small1") == SMALL1_ALPHABETS
    assert dataset.groups == SMALL1_ALPHABETS
    assert (dataset.num_classes, len(dataset)) == (136, 2720)
    assert dataset.class_counts().eq(20).all()
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (2720, 1, 28, 28)
    pixels = dataset.float()
    assert pixels[..., 0, :].mean() < 0.02 and 0.02 < pixels.mean() < 0.3, "ink should be bright"
    assert dataset.class_names[0] == "Balinese/character01"


def test_omniglot_small2_only_alphabets_match_the_zips(omniglot_dir):
    small1 = zip_alphabets(omniglot_dir / "images_background_small1.zip")
    small2 = zip_alphabets(omniglot_dir / "images_background_small2.zip")
    assert sorted(small2 - small1) == SMALL2_ONLY
    only_small2 = data.alphabets_only_in("images_background_small2", "images_background_small1")
    assert only_small2 == SMALL2_ONLY
    evaluation = data.load_omniglot("images_background_small2",
                                    exclude_alphabets_of="images_background_small1")
    assert evaluation.groups == SMALL2_ONLY
    assert evaluation.class_counts().eq(20).all()
    background, held_out = data.load_omniglot_small_split()
    assert set(background.groups).isdisjoint(held_out.groups)
    assert torch.equal(held_out.images, evaluation.images)


def test_omniglot_has_twenty_drawers_per_character(omniglot_dir):
    with zipfile.ZipFile(omniglot_dir / "images_background_small2.zip") as archive:
        drawers = {}
        for name in archive.namelist():
            if name.endswith(".png"):
                _, alphabet, character, file = name.split("/")
                drawers.setdefault((alphabet, character), set()).add(file[:-4].split("_")[1])
    assert len(drawers) == 156
    assert all(d == {f"{i:02d}" for i in range(1, 21)} for d in drawers.values())


def test_omniglot_explicit_alphabets_and_sizes(omniglot_dir):
    tagalog = data.load_omniglot("images_background_small2", alphabets=["Tagalog"], image_size=105)
    assert tagalog.groups == ["Tagalog"] and tagalog.images.shape[1:] == (1, 105, 105)
    assert set(tagalog.images.unique().tolist()) == {0, 255}, "105 px keeps the binary originals"
    with pytest.raises(ValueError, match="Klingon.*Tagalog"):
        data.load_omniglot("images_background_small2", alphabets=["Klingon"])


def test_omniglot_folder_equals_zip(omniglot_dir, tmp_path):
    with zipfile.ZipFile(omniglot_dir / "images_background_small2.zip") as archive:
        members = [n for n in archive.namelist() if "/Tagalog/" in n]
        archive.extractall(tmp_path, members)
    from_folder = data.load_omniglot(tmp_path / "images_background_small2")
    from_zip = data.load_omniglot("images_background_small2", alphabets=["Tagalog"])
    assert from_folder.class_names == from_zip.class_names
    assert torch.equal(from_folder.images, from_zip.images)


def test_omniglot_dir_from_environment(omniglot_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(omniglot.ENV_VAR, str(omniglot_dir))
    assert omniglot.find_omniglot_dir() == omniglot_dir
    monkeypatch.setenv(omniglot.ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="BMSSL_OMNIGLOT_DIR=.*elsewhere"):
        data.load_omniglot("images_background_small1")


def write_png(image_array):
    buffer = io.BytesIO()
    Image.fromarray(image_array).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_omniglot_zip(path, alphabets=("Alpha", "Beta"), characters=2, drawers=3):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet in alphabets:
            for c in range(1, characters + 1):
                for d in range(1, drawers + 1):
                    strokes = np.full((105, 105), 255, dtype=np.uint8)
                    column = rng.integers(0, 95)
                    strokes[rng.integers(0, 90):, column:column + 8] = 0
                    archive.writestr(f"fake/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png",
                                     write_png(strokes))


def test_omniglot_loader_on_a_generated_zip(tmp_path):
    fake_omniglot_zip(tmp_path / "fake.zip")
    dataset = data.load_omniglot(tmp_path / "fake.zip", image_size=(21, 35))
    assert dataset.groups == ["Alpha", "Beta"] and dataset.num_classes == 4
    assert dataset.images.shape == (12, 1, 21, 35) and dataset.class_counts().eq(3).all()
    assert (dataset.images.amax(dim=(1, 2, 3)) > 100).all(), "black strokes become bright ink"
    assert data.load_omniglot("fake", root=tmp_path).num_classes == 4


def test_omniglot_bad_paths_and_corrupt_zips(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.*BMSSL_OMNIGLOT_DIR"):
        data.find_omniglot_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="images_background_small9"):
        data.load_omniglot("images_background_small9", root=tmp_path)
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04 definitely not a zip" * 20)
    with pytest.raises(ValueError, match="not a readable zip"):
        data.load_omniglot(tmp_path / "garbage.zip")
    fake_omniglot_zip(tmp_path / "whole.zip")
    whole = (tmp_path / "whole.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="not a readable zip"):
        data.load_omniglot(tmp_path / "cut.zip")
    with zipfile.ZipFile(tmp_path / "badpng.zip", "w") as archive:
        archive.writestr("x/Alpha/character01/0001_01.png", b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image x/Alpha/character01/0001_01.png in .*badpng.zip"):
        data.load_omniglot(tmp_path / "badpng.zip")
    (tmp_path / "nopng.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "nopng.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="no Omniglot images"):
        data.load_omniglot(tmp_path / "nopng.zip")


def test_omniglot_refuses_two_trees_in_one_folder_and_a_zip_as_root(tmp_path):
    """small1/ and small2/ extracted side by side share Greek and Latin: merged, each of those
    images was in its class twice (a review's episodes had 420 of 3750 queries identical to a
    support image). A zip passed as root= said it "does not exist"."""
    fake_omniglot_zip(tmp_path / "fake.zip")
    with zipfile.ZipFile(tmp_path / "fake.zip") as archive:
        archive.extractall(tmp_path / "both" / "one")
        archive.extractall(tmp_path / "both" / "two")
    with pytest.raises(ValueError, match="holds Alpha/character01/0001_01.png twice"):
        data.load_omniglot(tmp_path / "both")
    assert data.load_omniglot(tmp_path / "both" / "one").num_classes == 4
    with pytest.raises(FileNotFoundError, match="is a file, not a folder.*as `source`"):
        data.load_omniglot("fake", root=tmp_path / "fake.zip")


# ---- class folders ------------------------------------------------------------------------------
def solid(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def test_flat_image_folder(tmp_path):
    colours = {"apple": (255, 0, 0), "sky": (0, 0, 255), "leaf": (0, 200, 0)}
    for name, colour in colours.items():
        folder = tmp_path / name
        folder.mkdir()
        solid(colour).save(folder / "a.png")
        solid(colour, (64, 64)).save(folder / "b.jpg", quality=95)
        solid(colour, (20, 50)).save(folder / "c.JPEG", quality=95)
        (folder / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    dataset = data.load_image_folder(tmp_path, image_size=32, show_progress=False)
    assert dataset.class_names == ["apple", "leaf", "sky"] and dataset.groups == dataset.class_names
    assert dataset.images.shape == (9, 3, 32, 32) and dataset.class_counts().tolist() == [3, 3, 3]
    channel_means = dataset.float().mean(dim=(2, 3))
    for label, name in enumerate(dataset.class_names):
        dominant = int(np.argmax(colours[name]))
        assert (channel_means[dataset.labels == label].argmax(1) == dominant).all()
    gray = data.load_image_folder(tmp_path, image_size=(16, 24), mode="L", show_progress=False)
    assert gray.images.shape == (9, 1, 16, 24)


def test_nested_image_folder_and_fit(tmp_path):
    left_red_right_blue = np.zeros((20, 60, 3), dtype=np.uint8)
    left_red_right_blue[:, :20, 0] = 255
    left_red_right_blue[:, 20:40, 1] = 255
    left_red_right_blue[:, 40:, 2] = 255
    for group in ("birds", "cats"):
        for cls in ("one", "two"):
            folder = tmp_path / group / cls
            folder.mkdir(parents=True)
            Image.fromarray(left_red_right_blue).save(folder / "x.png")
    nested = data.load_image_folder(tmp_path, image_size=20, show_progress=False)
    assert nested.class_names == ["birds/one", "birds/two", "cats/one", "cats/two"]
    assert nested.class_groups == ["birds", "birds", "cats", "cats"]
    cropped = nested.float()[0].mean(dim=(1, 2))
    assert cropped.argmax() == 1 and cropped[1] > 0.95, "center_crop keeps the green middle"
    stretched = data.load_image_folder(tmp_path, image_size=20, fit="stretch",
                                       show_progress=False).float()[0].mean(dim=(1, 2))
    assert torch.allclose(stretched, torch.full((3,), 1 / 3), atol=0.05)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        data.load_image_folder(tmp_path / "empty")
    root = tmp_path / "mixed"
    (root / "cls").mkdir(parents=True)
    solid((1, 2, 3)).save(root / "cls" / "a.png")
    (root / "group" / "inner").mkdir(parents=True)
    with pytest.raises(ValueError, match="mixes"):
        data.load_image_folder(root)
    with pytest.raises(ValueError, match="without .* images.*group"):
        data.load_image_folder(root, layout="flat")
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "bad.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        data.load_image_folder(tmp_path / "broken", show_progress=False)
    with pytest.raises(ValueError, match="layout"):
        data.load_image_folder(root, layout="deep")



@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path, mode):
    """Pillow's convert("L") of a 16-bit PNG clips every value above 255 to white; the loaders
    rescale, v8 = round(v16 / 257)."""
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    (tmp_path / "cls").mkdir()
    Image.fromarray(ramp).save(tmp_path / "cls" / "ramp.png")
    assert Image.open(tmp_path / "cls" / "ramp.png").mode.startswith("I"), "the PNG is 16-bit"
    loaded = data.load_image_folder(tmp_path, image_size=16, mode=mode, show_progress=False).images[0]
    expected = torch.from_numpy(np.round(ramp / 257).astype(np.uint8))
    assert loaded.shape[0] == (1 if mode == "L" else 3)
    assert all(torch.equal(channel, expected) for channel in loaded)


def test_a_sixteen_bit_omniglot_png_is_rescaled(tmp_path):
    strokes = np.full((105, 105), 65535, dtype=np.uint16)
    strokes[:, 50:55] = 0
    with zipfile.ZipFile(tmp_path / "deep.zip", "w") as archive:
        archive.writestr("x/Alpha/character01/0001_01.png", write_png(strokes))
    image = data.load_omniglot(tmp_path / "deep.zip", image_size=105).images[0, 0]
    assert image[:, 50:55].eq(255).all() and image[:, :50].eq(0).all(), "ink 255 on black, as for 8-bit"


@pytest.mark.parametrize("background", [0, 255])
def test_transparent_pixels_are_composited_onto_white(tmp_path, background):
    """A transparent background kept the colour hidden under it: an Omniglot-style RGBA glyph on
    transparent black became all ink after the inversion (mean 255)."""
    rgba = np.zeros((105, 105, 4), dtype=np.uint8)
    rgba[..., :3] = background
    rgba[:, 50:55] = (0, 0, 0, 255)  # opaque black strokes
    with zipfile.ZipFile(tmp_path / "alpha.zip", "w") as archive:
        archive.writestr("x/Alpha/character01/0001_01.png", write_png(rgba))
    image = data.load_omniglot(tmp_path / "alpha.zip", image_size=105).images[0, 0]
    assert image[:, 50:55].eq(255).all() and image[:, :50].eq(0).all(), "ink on black, as for an opaque PNG"
    (tmp_path / "folder" / "cls").mkdir(parents=True)
    Image.fromarray(rgba).save(tmp_path / "folder" / "cls" / "a.png")
    folder = data.load_image_folder(tmp_path / "folder", image_size=105, show_progress=False)
    assert folder.images[0, :, :, :50].eq(255).all() and folder.images[0, :, :, 50:55].eq(0).all()


def test_image_size_and_extensions_are_checked_and_normalised(tmp_path):
    """image_size=True gave 1x1 images and 84.0 a TypeError; extensions=".png" was iterated
    character by character, and "png" without its dot matched nothing."""
    for bad in (True, 84.0, (8,), (8, 8, 8), "28"):
        with pytest.raises(ValueError, match="image_size must be an int or an \\(H, W\\) pair of ints"):
            data.common.image_size_hw(bad)
    assert data.common.image_size_hw(np.int64(8)) == (8, 8) and data.common.image_size_hw([6, 7]) == (6, 7)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        solid((9, 9, 9)).save(tmp_path / name / "x.png")
    for extensions in (".png", "png", ["PNG"]):
        loaded = data.load_image_folder(tmp_path, image_size=8, extensions=extensions, show_progress=False)
        assert loaded.num_classes == 2


def test_a_decompression_bomb_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    """Pillow raises DecompressionBombError (not an OSError) past 2x MAX_IMAGE_PIXELS."""
    (tmp_path / "cls").mkdir()
    solid((9, 9, 9), (64, 64)).save(tmp_path / "cls" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)
    with pytest.raises(ValueError, match="cannot read image .*big.png.*decompression bomb"):
        data.load_image_folder(tmp_path, image_size=8, show_progress=False)


def test_split_fractions_must_be_finite_and_a_class_name_part_is_one_class():
    dataset = synthetic_set(groups=4)
    for fractions in ((float("nan"), 1.0), (float("inf"), 0.5), (0.5, float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            dataset.split_by_group(fractions)
        with pytest.raises(ValueError, match="finite"):
            dataset.split_by_class(fractions)
    named = dataset.split_by_class({"a": dataset.class_names[0], "b": dataset.class_names[1:3]})
    assert named["a"].class_names == dataset.class_names[:1] and named["b"].num_classes == 2


def test_nested_layout_refuses_a_group_without_class_folders_and_warns_about_loose_images(tmp_path):
    for group, cls in (("birds", "owl"), ("cats", "lynx")):
        (tmp_path / group / cls).mkdir(parents=True)
        solid((200, 10, 10)).save(tmp_path / group / cls / "a.png")
    solid((1, 1, 1)).save(tmp_path / "cats" / "stray.png")
    with pytest.warns(UserWarning, match="cats holds images directly"):
        assert data.load_image_folder(tmp_path, image_size=8, layout="nested", show_progress=False).num_classes == 2
    (tmp_path / "dogs").mkdir()
    with pytest.raises(ValueError, match=r"without .* images.*dogs/"), pytest.warns(UserWarning, match="stray|cats"):
        data.load_image_folder(tmp_path, image_size=8, layout="nested", show_progress=False)

