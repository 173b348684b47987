"""Online task construction (paper §4.1), supervised episodes and the batched augmentations.

Shapes stay tiny (6–8 pixel images, a handful of tasks) so the file runs in seconds on CPU.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bmssl.tasks as tasks_module
from bmssl.augment import AugmentConfig, augment, random_affine_matrices
from bmssl.tasks import TaskBatch, make_episode, make_tasks, sample_episode_indices


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_pool(size, channels=1, height=8, width=8, seed=0, dtype=torch.float32):
    return torch.rand(size, channels, height, width, generator=generator(seed), dtype=dtype)


def preset_for(channels):
    return AugmentConfig.omniglot() if channels == 1 else AugmentConfig.rgb()


@st.composite
def task_settings(draw):
    ways = draw(st.integers(2, 4))
    tasks = draw(st.integers(1, 3))
    return dict(ways=ways, tasks=tasks, shots=draw(st.integers(1, 3)),
                queries=draw(st.integers(1, 3)), spare=draw(st.integers(0, 4)),
                channels=draw(st.sampled_from([1, 3])), height=draw(st.sampled_from([6, 8])),
                width=draw(st.sampled_from([6, 8])), seed=draw(st.integers(0, 2**31 - 1)))


def build(s, config=None, seed=None, pool=None):
    if pool is None:
        pool = random_pool(s["ways"] * s["tasks"] + s["spare"], s["channels"], s["height"],
                           s["width"], seed=s["seed"])
    config = preset_for(s["channels"]) if config is None else config
    batch = make_tasks(pool, s["ways"] * s["tasks"], s["tasks"], s["shots"], s["queries"], config,
                       generator(s["seed"] if seed is None else seed))
    return pool, batch


def views_per_image(batch):
    """[K, W, M1 + M2, C, H, W]: support then query views of every image."""
    k, w = batch.image_index.shape
    support = batch.support.view(k, w, batch.shots, *batch.support.shape[2:])
    query = batch.query.view(k, w, batch.queries, *batch.query.shape[2:])
    return torch.cat([support, query], dim=2)


# ---- task construction ------------------------------------------------------------------------

@given(task_settings())
def test_task_shapes_and_label_layout(s):
    pool, batch = build(s)
    k, w, m1, m2 = s["tasks"], s["ways"], s["shots"], s["queries"]
    image = (s["channels"], s["height"], s["width"])
    assert batch.support.shape == (k, w * m1, *image)
    assert batch.query.shape == (k, w * m2, *image)
    assert batch.support.dtype == batch.query.dtype == pool.dtype
    assert (batch.tasks, batch.ways, batch.shots, batch.queries) == (k, w, m1, m2)
    for labels, per_way in ((batch.support_labels, m1), (batch.query_labels, m2)):
        assert labels.dtype == torch.int64 and labels.shape == (k, w * per_way)
        expected = torch.arange(w).repeat_interleave(per_way)
        assert torch.equal(labels, expected.expand(k, -1))
        for task_labels in labels:
            assert torch.equal(torch.bincount(task_labels, minlength=w), torch.full((w,), per_way))
    assert batch.image_index.dtype == torch.int64 and batch.image_index.shape == (k, w)
    flat = batch.image_index.flatten()
    assert flat.unique().numel() == k * w, "an image appears twice (in one task or in two tasks)"
    assert 0 <= int(flat.min()) and int(flat.max()) < pool.shape[0]


@given(task_settings())
def test_identity_views_are_the_source_images(s):
    pool, batch = build(s, config=AugmentConfig.identity())
    views = views_per_image(batch)
    sources = pool[batch.image_index]                                       # [K, W, C, H, W]
    assert torch.equal(views, sources[:, :, None].expand_as(views))


@given(task_settings())
def test_augmented_views_come_from_their_own_image(s):
    # Constant images stay constant under any crop/affine with border padding, so each view must
    # carry exactly its source's value: a view never mixes in another image.
    size = s["ways"] * s["tasks"] + s["spare"]
    values = torch.linspace(0.05, 0.95, size)[torch.randperm(size, generator=generator(s["seed"]))]
    pool = values.view(size, 1, 1, 1).expand(size, s["channels"], s["height"], s["width"]).clone()
    geometry_only = dataclasses.replace(AugmentConfig.omniglot(), flip_prob=0.5)
    _, batch = build(s, config=geometry_only, pool=pool)
    views = views_per_image(batch)
    expected = values[batch.image_index].view(*batch.image_index.shape, 1, 1, 1, 1)
    torch.testing.assert_close(views, expected.expand_as(views), rtol=0, atol=1e-6)


@given(task_settings())
def test_views_of_one_image_are_different_augmentations(s):
    _, batch = build(s)
    views = views_per_image(batch).flatten(-3)                             # [K, W, M, C·H·W]
    gaps = (views[:, :, :, None] - views[:, :, None, :]).abs().amax(-1)    # [K, W, M, M]
    off_diagonal = ~torch.eye(views.shape[2], dtype=torch.bool)
    assert bool((gaps[..., off_diagonal] > 0).all()), "two views of one image are identical"


@given(task_settings())
def test_same_seed_same_tasks_other_seed_other_tasks(s):
    pool, first = build(s)
    _, again = build(s, pool=pool)
    for name in ("support", "support_labels", "query", "query_labels", "image_index"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    _, other = build(s, pool=pool, seed=s["seed"] + 1)
    assert not torch.equal(first.support, other.support)
    assert not torch.equal(first.query, other.query)


def test_one_batched_augment_call(monkeypatch):
    calls = []

    def counting_augment(images, config, gen):
        calls.append(images.shape[0])
        return augment(images, config, gen)

    monkeypatch.setattr(tasks_module, "augment_views", counting_augment)
    make_tasks(random_pool(20), 12, 3, 2, 3, AugmentConfig.omniglot(), generator(0), views=5)
    assert calls == [12 * 5]


def test_numpy_integer_sizes_give_the_same_batch_as_ints():
    import numpy as np

    pool = random_pool(12)
    want = make_tasks(pool, 6, 2, 1, 2, AugmentConfig.omniglot(), generator(3))
    got = make_tasks(pool, np.int64(6), np.int32(2), np.int64(1), np.int16(2), AugmentConfig.omniglot(), generator(3))
    assert torch.equal(got.support, want.support) and torch.equal(got.query, want.query)
    assert (got.tasks, got.ways) == (2, 3)


def test_half_precision_pool_keeps_its_dtype():
    pool = random_pool(10, channels=3, dtype=torch.float16)
    batch = make_tasks(pool, 6, 2, 1, 2, AugmentConfig.rgb(), generator(1))
    assert batch.support.dtype == batch.query.dtype == torch.float16
    assert bool(torch.isfinite(batch.support).all()) and bool(torch.isfinite(batch.query).all())


def test_task_batch_to_and_shape_checks():
    batch = make_tasks(random_pool(8), 8, 2, 2, 1, AugmentConfig.omniglot(), generator(2))
    moved = batch.to("cpu")
    assert isinstance(moved, TaskBatch)
    assert (moved.tasks, moved.ways, moved.shots, moved.queries) == (2, 4, 2, 1)
    assert torch.equal(moved.support, batch.support)
    with pytest.raises(ValueError, match="support_labels"):
        TaskBatch(batch.support, batch.support_labels[:, :-1], batch.query, batch.query_labels,
                  batch.image_index)
    with pytest.raises(ValueError, match="tasks of"):
        TaskBatch(batch.support[:1], batch.support_labels[:1], batch.query, batch.query_labels,
                  batch.image_index)


BAD_TASK_ARGUMENTS = [
    (dict(images_per_batch=10, tasks=3), "divisible"),
    (dict(images_per_batch=6, tasks=6), "at least 2 ways"),
    (dict(support_views=0), "support_views"),
    (dict(query_views=0), "query_views"),
    (dict(views=4), "M1 \\+ M2"),
    (dict(images_per_batch=24, tasks=4), "pool size"),
    (dict(tasks=0), "tasks"),
    (dict(images_per_batch=2.0), "images_per_batch"),
    (dict(pool=random_pool(20)[0]), "pool must be"),
    (dict(pool=(random_pool(20) * 255).to(torch.uint8)), "floating point"),
    (dict(augment="omniglot"), "AugmentConfig"),
    (dict(generator=123), "torch.Generator"),
]


@pytest.mark.parametrize("change, message", BAD_TASK_ARGUMENTS,
                         ids=[m.replace("\\", "") for _, m in BAD_TASK_ARGUMENTS])
def test_bad_task_arguments_raise(change, message):
    arguments = dict(pool=random_pool(20), images_per_batch=12, tasks=3, support_views=2,
                     query_views=3, augment=AugmentConfig.omniglot(), generator=generator(0),
                     views=5)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        make_tasks(**arguments)


@pytest.mark.gpu
def test_tasks_on_gpu_are_seeded_and_check_the_generator_device():
    pool = random_pool(30).cuda()
    first = make_tasks(pool, 12, 3, 2, 2, AugmentConfig.omniglot(),
                       torch.Generator("cuda").manual_seed(0))
    again = make_tasks(pool, 12, 3, 2, 2, AugmentConfig.omniglot(),
                       torch.Generator("cuda").manual_seed(0))
    assert first.support.is_cuda and torch.equal(first.support, again.support)
    with pytest.raises(ValueError, match="generator is on cpu"):
        make_tasks(pool, 12, 3, 2, 2, AugmentConfig.omniglot(), generator(0))


# ---- supervised episodes ----------------------------------------------------------------------

def labelled_set(classes=7, per_class=6, seed=0, channels=1):
    """Image i is constant with value i / count, so its index can be read back from its pixels."""
    count = classes * per_class
    labels = torch.arange(classes).repeat(per_class)[torch.randperm(count, generator=generator(seed))]
    images = (torch.arange(count, dtype=torch.float64) / count).view(count, 1, 1, 1)
    return images.expand(count, channels, 4, 4).clone(), labels


def index_of(images, count):
    return torch.round(images[..., 0, 0, 0] * count).long()


@given(ways=st.integers(2, 5), shots=st.integers(1, 3), queries=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_episode_layout_and_disjoint_sets(ways, shots, queries, seed):
    images, labels = labelled_set(seed=seed)
    episode = make_episode(images, labels, ways, shots, queries, generator(seed))
    assert (episode.tasks, episode.ways, episode.shots, episode.queries) == (1, ways, shots, queries)
    assert episode.support.shape == (1, ways * shots, 1, 4, 4)
    assert episode.query.shape == (1, ways * queries, 1, 4, 4)
    assert torch.equal(episode.support_labels[0], torch.arange(ways).repeat_interleave(shots))
    assert torch.equal(episode.query_labels[0], torch.arange(ways).repeat_interleave(queries))
    classes = episode.image_index[0]
    assert classes.unique().numel() == ways
    support_index = index_of(episode.support[0], labels.numel())
    query_index = index_of(episode.query[0], labels.numel())
    # every image carries its class's remapped label, and no image is used twice
    assert torch.equal(labels[support_index], classes[episode.support_labels[0]])
    assert torch.equal(labels[query_index], classes[episode.query_labels[0]])
    used = torch.cat([support_index, query_index])
    assert used.unique().numel() == used.numel(), "an image is both in support and in query"


def test_episode_is_seeded_and_respects_classes():
    images, labels = labelled_set()
    first = make_episode(images, labels, 3, 2, 2, generator(5))
    again = make_episode(images, labels, 3, 2, 2, generator(5))
    assert torch.equal(first.support, again.support) and torch.equal(first.query, again.query)
    draws = {tuple(make_episode(images, labels, 3, 2, 2, generator(seed), classes=[1, 4, 6])
                   .image_index[0].sort().values.tolist()) for seed in range(10)}
    assert draws == {(1, 4, 6)}
    classes, support_index, query_index = sample_episode_indices(labels, 4, 2, 3, generator(1))
    assert support_index.shape == (4, 2) and query_index.shape == (4, 3)
    assert torch.equal(labels[support_index], classes[:, None].expand(4, 2))


def test_episode_uses_every_image_of_a_class_when_asked():
    images, labels = labelled_set(classes=3, per_class=5)
    classes, support_index, query_index = sample_episode_indices(labels, 3, 2, 3, generator(0))
    used = torch.cat([support_index, query_index], dim=1)
    assert used.flatten().sort().values.tolist() == list(range(15))


BAD_EPISODES = [
    (dict(ways=8), "needs 8 classes"),
    (dict(shots=4, queries=3), "fewer than shots \\+ queries = 7"),
    (dict(classes=[0, 1, 99]), "fewer than shots"),
    (dict(classes=[0, 0, 1]), "duplicates"),
    (dict(ways=1), "ways"),
    (dict(shots=0), "shots"),
    (dict(queries=0), "queries"),
    (dict(labels=torch.zeros(3, dtype=torch.int64)), "one per image"),
    (dict(labels=torch.full((42,), 0.5)), "integer"),
    (dict(generator="seed"), "torch.Generator"),
]


@pytest.mark.parametrize("change, message", BAD_EPISODES,
                         ids=[m.replace("\\", "") for _, m in BAD_EPISODES])
def test_bad_episode_arguments_raise(change, message):
    images, labels = labelled_set()
    arguments = dict(images=images, labels=labels, ways=3, shots=2, queries=2, generator=generator(0))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        make_episode(**arguments)


# ---- augmentations ----------------------------------------------------------------------------

PRESETS = {"omniglot": (AugmentConfig.omniglot(), 1), "rgb": (AugmentConfig.rgb(), 3),
           "noisy": (AugmentConfig(rotation_degrees=30, noise_std=0.1), 3)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_augment_output_contract(preset, dtype):
    config, channels = PRESETS[preset]
    images = random_pool(16, channels, 8, 10, seed=3).to(dtype)
    out = augment(images, config, generator(0))
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)


def test_identity_config_is_identity():
    images = random_pool(5, 3, 7, 9)
    out = augment(images, AugmentConfig.identity(), generator(0))
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()
    assert not AugmentConfig.identity().has_geometry and not AugmentConfig.identity().has_colour


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_augment_is_seeded(preset):
    config, channels = PRESETS[preset]
    images = random_pool(6, channels)
    assert torch.equal(augment(images, config, generator(7)), augment(images, config, generator(7)))
    other = augment(images, config, generator(8))
    assert not torch.equal(augment(images, config, generator(7)), other)


@pytest.mark.parametrize("height, width", [(8, 8), (5, 9)])
def test_flip_matches_torch_flip(height, width):
    images = random_pool(4, 1, height, width)
    out = augment(images, AugmentConfig(flip_prob=1.0), generator(0))
    torch.testing.assert_close(out, images.flip(-1), rtol=0, atol=1e-6)


def test_rotation_is_a_rotation_in_pixel_units_on_non_square_images():
    height, width = 6, 10
    theta = random_affine_matrices(64, height, width, AugmentConfig(rotation_degrees=90),
                                   generator(0), dtype=torch.float64)
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2], dtype=torch.float64))
    rotation = to_pixels @ theta[:, :, :2] @ torch.linalg.inv(to_pixels)
    eye = torch.eye(2, dtype=torch.float64).expand(64, 2, 2)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), eye)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(64, dtype=torch.float64))
    assert float(theta[:, :, 2].abs().max()) == 0.0
    angles = torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0]).abs()
    assert float(angles.max()) <= math.pi / 2 + 1e-9 and float(angles.max()) > math.pi / 4


def test_crop_zoom_and_translate_matrices():
    crop = random_affine_matrices(32, 8, 8, AugmentConfig(crop_scale=(0.25, 0.25)), generator(0))
    torch.testing.assert_close(crop[:, :, :2], 0.5 * torch.eye(2).expand(32, 2, 2))
    assert float(crop[:, :, 2].abs().max()) <= 0.5 + 1e-6
    zoom = random_affine_matrices(4, 8, 8, AugmentConfig(zoom=(2.0, 2.0)), generator(0))
    torch.testing.assert_close(zoom, torch.tensor([[0.5, 0, 0], [0, 0.5, 0]]).expand(4, 2, 3))
    shift = random_affine_matrices(64, 8, 8, AugmentConfig(translate=0.25), generator(0))
    torch.testing.assert_close(shift[:, :, :2], torch.eye(2).expand(64, 2, 2))
    assert float(shift[:, :, 2].abs().max()) <= 0.5 + 1e-6 and float(shift[:, :, 2].abs().max()) > 0.2


def test_brightness_scales_each_image_by_one_factor():
    images = 0.05 + 0.4 * random_pool(8, 3)
    out = augment(images, AugmentConfig(brightness=0.5), generator(0))
    ratio = out / images
    per_image = ratio.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert float(per_image.min()) >= 0.5 - 1e-6 and float(per_image.max()) <= 1.5 + 1e-6


def test_grayscale_and_noise():
    images = random_pool(4, 3)
    gray = augment(images, AugmentConfig(grayscale_prob=1.0), generator(0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    noisy = augment(images, AugmentConfig(noise_std=0.05), generator(0))
    assert not torch.equal(noisy, images) and float((noisy - images).abs().max()) < 0.5
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0


def test_colour_jitter_on_grayscale_images_is_an_error():
    with pytest.raises(ValueError, match="3-channel"):
        augment(random_pool(2, 1), AugmentConfig.rgb(), generator(0))


@pytest.mark.parametrize("field, value", [
    ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.9, 0.5)), ("crop_scale", (0.5, 1.5)),
    ("crop_ratio", (-1.0, 1.0)), ("zoom", (0.0, 1.0)), ("rotation_degrees", -1.0),
    ("translate", 2.0), ("shear_degrees", 80.0), ("flip_prob", 1.5), ("brightness", -0.1),
    ("grayscale_prob", -0.5), ("noise_std", -1.0), ("padding_mode", "wrap"),
    ("interpolation", "area"), ("zoom", (1.0,)),
    # non-finite values once gave all-NaN views
    ("zoom", (1.0, float("inf"))), ("crop_ratio", (1.0, float("inf"))), ("crop_scale", (float("nan"), 1.0)),
    ("brightness", float("inf")), ("contrast", float("inf")), ("saturation", float("nan")),
    ("noise_std", float("inf")), ("rotation_degrees", float("nan")),
    # a bare number for a pair once failed with a raw TypeError; a bool is not an angle
    ("crop_scale", 0.5), ("zoom", ("1", "2")), ("rotation_degrees", True),
])
def test_bad_augment_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_augment_config_takes_numpy_and_torch_scalars_as_floats():
    """np.float32(10) was refused with 'np.float32(10.0) must lie in [0, 180.0]'."""
    config = AugmentConfig(rotation_degrees=np.float32(10), zoom=(np.float64(0.9), 1), flip_prob=np.float16(0.5))
    assert config.rotation_degrees == 10.0 and type(config.rotation_degrees) is float
    assert config.zoom == (0.9, 1.0) and config.flip_prob == 0.5


@pytest.mark.parametrize("preset", ["identity", "omniglot"])
def test_images_outside_unit_range_are_refused(preset):
    """A 0..255 pool (images.float() instead of ImageSet.float()) became all-1.0 views under any
    geometry, and passed through unchanged under the identity: now a ValueError either way."""
    config = getattr(AugmentConfig, preset)()
    pool = random_pool(3) * 255
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*ImageSet.float\(\)"):
        augment(pool, config, generator(0))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        make_tasks(pool, 2, 1, 1, 1, config, generator(0))
    nan_pool = random_pool(3)
    nan_pool[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got values in \[nan"):
        augment(nan_pool, config, generator(0))
    assert augment(random_pool(3), config, generator(0)).shape == (3, 1, 8, 8)


def test_bad_augment_inputs():
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        augment(torch.rand(3, 8, 8), AugmentConfig.omniglot(), generator(0))
    with pytest.raises(ValueError, match="floating point"):
        augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), AugmentConfig.omniglot(), generator(0))
    with pytest.raises(ValueError, match="AugmentConfig"):
        augment(random_pool(2), "omniglot", generator(0))
    assert augment(random_pool(0), AugmentConfig.omniglot(), generator(0)).shape == (0, 1, 8, 8)


@pytest.mark.gpu
def test_augment_on_gpu_is_seeded_and_checks_the_generator_device():
    images = random_pool(6, 3).cuda()
    first = augment(images, AugmentConfig.rgb(), torch.Generator("cuda").manual_seed(1))
    again = augment(images, AugmentConfig.rgb(), torch.Generator("cuda").manual_seed(1))
    assert first.is_cuda and torch.equal(first, again)
    with pytest.raises(ValueError, match="generator is on cpu"):
        augment(images, AugmentConfig.rgb(), generator(0))
