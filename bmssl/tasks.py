"""Few-shot tasks: the paper's online task construction (§4.1) and supervised episodes.

Online task construction (DESIGN.md §1), from an unlabelled pool [P, C, H, W]:
    1. draw N = images_per_batch distinct pool images;
    2. make M = M1 + M2 augmented views of each (one batched augment call for all N·M views);
    3. split the N images into K blocks of W = N/K; block k is an W-way task and every view of
       its j-th image has pseudo-label j;
    4. per image, the first M1 views go to the support set, the other M2 to the query set.
Result: K tasks, each W-way, M1-shot, with M2 queries per way.

Layout contract (TaskBatch), shared with the meta-learning engine. Sets are image-major: the M1
views of way 0, then the M1 views of way 1, ...; so support_labels[k] = arange(W).repeat_interleave(M1).
    support        float [K, W·M1, C, H, W]    support_labels  int64 [K, W·M1]
    query          float [K, W·M2, C, H, W]    query_labels    int64 [K, W·M2]
    image_index    int64 [K, W]   what way j of task k was made from: a pool index for
                                  make_tasks, the original class label for make_episode
An episode (make_episode) is the supervised counterpart for evaluation: K = 1 task whose ways are
real classes, with `shots` distinct images per class in support and `queries` other images per
class in query, no augmentation.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch

from bmssl.augment import AugmentConfig, check_generator
from bmssl.augment import augment as augment_views


@dataclass(frozen=True)
class TaskBatch:
    """K few-shot tasks in the image-major layout described in the module docstring."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    image_index: torch.Tensor

    def __post_init__(self):
        tasks, ways = self.image_index.shape if self.image_index.dim() == 2 else (None, None)
        if tasks is None or self.support.dim() != 5 or self.query.dim() != 5:
            raise ValueError(f"TaskBatch needs image_index [K, W], support and query [K, n, C, H, W]; "
                             f"got {tuple(self.image_index.shape)}, {tuple(self.support.shape)}, "
                             f"{tuple(self.query.shape)}")
        for name, views, labels in (("support", self.support, self.support_labels),
                                    ("query", self.query, self.query_labels)):
            if views.shape[0] != tasks or views.shape[1] % max(ways, 1) != 0:
                raise ValueError(f"TaskBatch.{name} {tuple(views.shape)} does not hold "
                                 f"{tasks} tasks of {ways} ways")
            if tuple(labels.shape) != tuple(views.shape[:2]):
                raise ValueError(f"TaskBatch.{name}_labels {tuple(labels.shape)} does not match "
                                 f"{name} {tuple(views.shape[:2])}")
        if self.support.shape[2:] != self.query.shape[2:]:
            raise ValueError(f"support images {tuple(self.support.shape[2:])} and query images "
                             f"{tuple(self.query.shape[2:])} differ in shape")

    @property
    def tasks(self) -> int:
        """K, the number of tasks."""
        return self.support.shape[0]

    @property
    def ways(self) -> int:
        """W = N/K, classes (pseudo-classes) per task."""
        return self.image_index.shape[1]

    @property
    def shots(self) -> int:
        """M1, support views per way."""
        return self.support.shape[1] // self.ways

    @property
    def queries(self) -> int:
        """M2, query views per way."""
        return self.query.shape[1] // self.ways

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        """The same batch with every tensor on `device`."""
        return TaskBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                            for f in fields(self)})


def image_major_labels(tasks: int, ways: int, per_way: int, device) -> torch.Tensor:
    """int64 [tasks, ways·per_way] = arange(ways).repeat_interleave(per_way) for every task."""
    labels = torch.arange(ways, device=device, dtype=torch.int64).repeat_interleave(per_way)
    return labels.repeat(tasks, 1)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    """value as an int (a numpy integer too) when it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_images(name: str, images):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor [P, C, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got {images.dtype}")


def make_tasks(pool: torch.Tensor, images_per_batch: int, tasks: int, support_views: int,
               query_views: int, augment: AugmentConfig,
               generator: torch.Generator | None = None, *, views: int | None = None) -> TaskBatch:
    """Paper §4.1: K = `tasks` tasks of W = N/K ways from N = `images_per_batch` pool images.

    pool [P, C, H, W] float on any device; `generator` must live on that device (None = torch's
    default). `views` (M), when given, must equal support_views + query_views. Returns a TaskBatch
    with support [K, W·M1, C, H, W], query [K, W·M2, C, H, W] and image_index [K, W] into the pool.
    """
    _check_images("pool", pool)
    images_per_batch = _check_positive_int("images_per_batch (N)", images_per_batch)
    tasks = _check_positive_int("tasks (K)", tasks)
    support_views = _check_positive_int("support_views (M1)", support_views)
    query_views = _check_positive_int("query_views (M2)", query_views)
    if views is not None and views != support_views + query_views:
        raise ValueError(f"views (M={views}) must equal support_views + query_views (M1 + M2 = "
                         f"{support_views} + {query_views} = {support_views + query_views})")
    if images_per_batch % tasks != 0:
        raise ValueError(f"images_per_batch (N={images_per_batch}) must be divisible by "
                         f"tasks (K={tasks})")
    ways = images_per_batch // tasks
    if ways < 2:
        raise ValueError(f"each task needs at least 2 ways, but N/K = {images_per_batch}/{tasks} "
                         f"= {ways}; draw more images per batch or make fewer tasks")
    if images_per_batch > pool.shape[0]:
        raise ValueError(f"images_per_batch (N={images_per_batch}) exceeds the pool size "
                         f"({pool.shape[0]} images); images are drawn without replacement")
    if not isinstance(augment, AugmentConfig):
        raise ValueError(f"augment must be an AugmentConfig, got {type(augment).__name__}")
    check_generator(generator, pool.device, what="pool images")

    device = pool.device
    per_image = support_views + query_views
    chosen = torch.randperm(pool.shape[0], generator=generator, device=device)[:images_per_batch]
    sources = pool[chosen].repeat_interleave(per_image, dim=0)          # [N·M, C, H, W]
    all_views = augment_views(sources, augment, generator)
    image_shape = pool.shape[1:]
    all_views = all_views.view(tasks, ways, per_image, *image_shape)
    support = all_views[:, :, :support_views].reshape(tasks, ways * support_views, *image_shape)
    query = all_views[:, :, support_views:].reshape(tasks, ways * query_views, *image_shape)
    return TaskBatch(support=support,
                     support_labels=image_major_labels(tasks, ways, support_views, device),
                     query=query,
                     query_labels=image_major_labels(tasks, ways, query_views, device),
                     image_index=chosen.view(tasks, ways))


def sample_episode_indices(labels: torch.Tensor, ways: int, shots: int, queries: int,
                           generator: torch.Generator | None = None, classes=None):
    """Draw an episode's indices from labels [P] (int): `ways` classes without replacement from
    `classes` (default: every label present), then shots + queries distinct images per class.

    Returns (episode_classes [ways], support_index [ways, shots], query_index [ways, queries]),
    int64 on labels' device; support and query indices never share an image. Every candidate class
    must have at least shots + queries images (checked up front, whatever the draw).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    ways = _check_positive_int("ways", ways, minimum=2)
    shots = _check_positive_int("shots", shots)
    queries = _check_positive_int("queries", queries)
    check_generator(generator, labels.device, what="labels")
    device = labels.device
    labels = labels.to(torch.int64)
    if labels.numel() == 0:
        raise ValueError("labels is empty: no images to draw an episode from")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")

    if classes is None:
        count_of = torch.bincount(labels)                                 # images per class id
        candidates = torch.nonzero(count_of).flatten()
    else:
        candidates = torch.as_tensor(classes, dtype=torch.int64, device=device).flatten()
        if candidates.numel() and int(candidates.min()) < 0:
            raise ValueError(f"classes must be >= 0, found {int(candidates.min())}")
        if torch.unique(candidates).numel() != candidates.numel():
            raise ValueError("classes contains duplicates")
        largest = int(candidates.max()) + 1 if candidates.numel() else 0
        count_of = torch.bincount(labels, minlength=largest)
    if candidates.numel() < ways:
        raise ValueError(f"a {ways}-way episode needs {ways} classes, but only "
                         f"{candidates.numel()} are available")
    per_class = shots + queries
    short = candidates[count_of[candidates] < per_class]
    if short.numel():
        raise ValueError(f"{short.numel()} class(es) have fewer than shots + queries = {per_class} "
                         f"images (e.g. classes {short[:10].tolist()}); pass classes= to leave "
                         f"them out")

    pick = torch.randperm(candidates.numel(), generator=generator, device=device)[:ways]
    episode_classes = candidates[pick]
    # Shuffle all images, then stable-sort them by way (images outside the episode sort last):
    # each way's images form one contiguous run in random order, so the first `per_class` of a
    # run are a uniform draw without replacement.
    way_of_class = torch.full_like(count_of, ways)
    way_of_class[episode_classes] = torch.arange(ways, device=device)
    shuffled = torch.randperm(labels.shape[0], generator=generator, device=device)
    order = shuffled[torch.argsort(way_of_class[labels[shuffled]], stable=True)]
    run_start = torch.cumsum(count_of[episode_classes], 0) - count_of[episode_classes]
    chosen = order[run_start[:, None] + torch.arange(per_class, device=device)]   # [ways, per_class]
    return episode_classes, chosen[:, :shots], chosen[:, shots:]


def make_episode(images: torch.Tensor, labels: torch.Tensor, ways: int, shots: int, queries: int,
                 generator: torch.Generator | None = None, classes=None) -> TaskBatch:
    """A `ways`-way `shots`-shot episode with `queries` query images per class, as a TaskBatch with
    K = 1: support [1, ways·shots, C, H, W], query [1, ways·queries, C, H, W], labels remapped to
    [0, ways) in image-major order, image_index [1, ways] = the original class of each way.
    images [P, C, H, W] float and labels [P] int on one device; no augmentation."""
    _check_images("images", images)
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be a tensor of shape [{images.shape[0]}] (one per image), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
    if labels.device != images.device:
        raise ValueError(f"labels are on {labels.device} but images are on {images.device}")
    episode_classes, support_index, query_index = sample_episode_indices(
        labels, ways, shots, queries, generator, classes)
    image_shape = images.shape[1:]
    device = images.device
    return TaskBatch(support=images[support_index.flatten()].view(1, ways * shots, *image_shape),
                     support_labels=image_major_labels(1, ways, shots, device),
                     query=images[query_index.flatten()].view(1, ways * queries, *image_shape),
                     query_labels=image_major_labels(1, ways, queries, device),
                     image_index=episode_classes.view(1, ways))
