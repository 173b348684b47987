"""`bmssl train`: one training run, from a data spec to a checkpointed θ and a results file.

    config = TrainConfig(method="bmssl", data="glyphs", steps=200)
    results = train(config, "runs/bmssl")        # RUN_DIR/checkpoint.pt, results.json, curves.png
    results = train(config, "runs/bmssl", resume="runs/bmssl")   # continues exactly

The loop. A torch.Generator on the training device, seeded with `seed`, draws every task batch
(bmssl.tasks.make_tasks: N pool images, M1 + M2 augmented views each, K tasks of N/K ways) from
the unlabelled training pool; MetaLearner.step makes one outer step. The checkpoint holds θ, Adam,
the schedule, that generator's state, the step, the metrics so far and the full config, so
`--resume` continues with the very next batch: on CPU with the same thread count, the losses equal
those of an uninterrupted run bit for bit. A run that failed (results.json status "failed", with
the error) resumes from its last checkpoint the same way. Resuming a finished run keeps the
few-shot results of results.json; with --eval it evaluates only the requested settings and
protocols they lack (all of them when --episodes, --queries, --eval-seed, --eval-data,
--finetune-steps or --finetune-lr changed), and training further drops them (they were of the
old θ).

Data (`--data`), split by group (alphabet) into train / test, deterministically from split_seed:
    glyphs             the embedded default (bmssl.data.load_glyphs), test_fraction of its alphabets held out
    glyphs:A,B,...     only these glyph alphabets
    omniglot           images_background_small1 for training; the alphabets only in
                       images_background_small2 for testing (load_omniglot_small_split)
    <path>             an Omniglot zip or alphabet/character folder (split by alphabet), or a folder
                       holding images_background_small1.zip and images_background_small2.zip
    folder:<path>      class folders (bmssl.data.load_image_folder), `channels` 1 or 3
`--eval-data SPEC` tests on all of SPEC instead, and trains on all of --data (for omniglot: on
images_background_small1). A test image byte-identical to a training image is refused
(check_disjoint). Training reads the training images alone, never their labels.

torchrun (WORLD_SIZE > 1): DistributedDataParallel semantics with gloo on CPU (nccl on CUDA).
Every rank seeds its task generator with the same `seed`, so every rank draws and augments the
same global batch of K tasks; rank r keeps tasks [r·K/W, (r+1)·K/W). The meta-gradients (and the
loss and metrics) are averaged over ranks before clipping and the Adam step, so θ stays the same
on every rank and equals one process holding the whole batch (up to floating-point summation
order). For simclr, the NT-Xent's negatives are gathered from every rank
(bmssl.distributed.ntxent_gathered), again as in one process. Rank 0 alone writes files and shows
progress; an error is printed by each rank that meets it (every rank, for a bad flag), and a rank
that fails leaves the job at once, so torchrun ends the others instead of waiting on them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import bmssl
from bmssl import run_files, validate
from bmssl.augment import AugmentConfig
from bmssl.interrupt import StopRequests
from bmssl.meta import (CONTRASTIVE_VIEWS, METHODS, SCHEDULES, TARGET_DATA, TASK_BATCHING, VARIANTS, MetaConfig,
                        MetaLearner)
from bmssl.models import BACKBONES, HEADS, NORMS, build_backbone
from bmssl.progress import StepBar
from bmssl.tasks import TaskBatch, make_tasks

AUGMENTS = ("auto", "omniglot", "rgb", "none")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROTOCOLS = ("proto", "finetune")
SETTING = re.compile(r"^(\d+)w(\d+)s$")
PLOT_EVERY_S = 120  # curves.png at checkpoints at most this often; always at the end of an invocation
# The evaluation settings that change the numbers of a (setting, protocol) row; results.json keeps
# them, with the step of θ, as "eval_config" beside its "eval" rows (see _evaluate).
EVALUATED_WITH = ("eval_data", "episodes", "queries", "eval_seed", "finetune_steps", "finetune_lr")


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults: the Omniglot-like 28x28 setting (5-way tasks, one
    support view and five query views per image, L = δ = 5, second order, conv4)."""

    # data
    method: str = "bmssl"                # bmssl | metassl | simclr | scratch
    data: str = "glyphs"                 # see the module docstring
    eval_data: str | None = None         # test on all of this spec instead of a held-out split
    image_size: int = 28
    channels: int = 3                    # folder: data only (1 = grayscale, 3 = RGB)
    test_fraction: float = 0.3           # fraction of the groups held out for testing
    split_seed: int | None = None        # None: seed
    augment: str = "auto"                # auto: omniglot preset for 1 channel, rgb for 3
    # tasks (paper §4.1)
    images_per_batch: int = 40           # N
    tasks: int = 8                       # K; each task is N/K-way
    support_views: int = 1               # M1
    query_views: int = 5                 # M2
    # model
    backbone: str = "conv4"
    hidden: int = 64                     # conv4 width
    depth: int = 4                       # conv4 blocks
    widths: tuple | None = None          # resnet12 widths (default 16 32 64 128)
    norm: str = "group"
    projection_dim: int = 64
    projection_hidden: int | None = None
    head: str = "zero"
    # the two-level loop
    inner_steps: int = 5                 # L
    target_steps: int = 5                # δ
    order: int = 2
    inner_lr: float = 0.1                # α
    outer_lr: float = 1e-3               # β
    contrastive_weight: float = 1.0      # λ
    temperature: float = 0.5             # τ
    kl_temperature: float = 1.0          # T
    task_loss_weight: float = 0.0        # bmssl: weight of MetaSSL's query loss beside the KL
    variant: str = "in"
    contrastive_views: str = "auto"
    target_data: str = "support"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    schedule_steps: int | None = None    # None: max(steps, warmup_steps), fixed at the start of a run
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 10.0
    steps: int = 2000
    seed: int = 0
    dtype: str = "float32"
    # run control: these may change on --resume
    device: str = "auto"
    threads: int | None = None
    task_batching: str = "auto"          # vmap | loop | auto (vmap on CUDA, loop on CPU)
    checkpoint_inner_steps: bool = False # recompute inner steps in the backward (memory flat in L)
    cuda_graph: bool = False             # CUDA: capture each outer step as a CUDA graph and replay it
    checkpoint_every: int = 100
    stop_after: int | None = None
    log_every: int = 10
    progress: bool = True
    # few-shot evaluation at the end of the run
    eval: bool = False
    eval_settings: tuple = ("5w1s", "5w5s")
    episodes: int = 600
    protocols: tuple = ("proto", "finetune")
    queries: int = 15
    eval_batch: int = 16
    eval_seed: int = 0
    finetune_steps: int | None = None    # None: L
    finetune_lr: float | None = None     # None: α

    def __post_init__(self):
        for name in ("widths", "eval_settings", "protocols"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def validate(self) -> "TrainConfig":
        """Check every field; ValueErrors name the command-line flag. Returns self."""
        _choice("method", self.method, METHODS)
        _choice("augment", self.augment, AUGMENTS)
        _choice("backbone", self.backbone, BACKBONES)
        _choice("norm", self.norm, NORMS)
        _choice("head", self.head, HEADS)
        _choice("variant", self.variant, VARIANTS)
        _choice("contrastive_views", self.contrastive_views, CONTRASTIVE_VIEWS)
        _choice("target_data", self.target_data, TARGET_DATA)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("order", self.order, (1, 2))
        _choice("channels", self.channels, (1, 3))
        _choice("task_batching", self.task_batching, TASK_BATCHING)
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError(f"{flag('data')} must name a data set, got {self.data!r}")
        for name, minimum in (("image_size", 4), ("images_per_batch", 2), ("tasks", 1), ("support_views", 1),
                              ("query_views", 1), ("hidden", 1), ("depth", 1), ("projection_dim", 1),
                              ("inner_steps", 0), ("target_steps", 0), ("warmup_steps", 0), ("steps", 0),
                              ("seed", 0), ("checkpoint_every", 1), ("log_every", 1), ("episodes", 1),
                              ("queries", 1), ("eval_batch", 1), ("eval_seed", 0)):
            _integer(name, getattr(self, name), minimum)
        for name, minimum in (("split_seed", 0), ("projection_hidden", 1), ("schedule_steps", 1), ("threads", 1),
                              ("stop_after", 1), ("finetune_steps", 0)):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum)
        for name in ("inner_lr", "outer_lr", "temperature", "kl_temperature"):
            _positive(name, getattr(self, name))
        for name in ("clip_grad_norm", "finetune_lr"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("contrastive_weight", "weight_decay", "task_loss_weight"):
            _real(name, getattr(self, name), 0.0, math.inf)
        _real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _real("test_fraction", self.test_fraction, 0.0, 1.0, open_ends=True)
        if self.widths is not None:
            if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
                raise ValueError(f"{flag('widths')} must be positive integers, got {self.widths!r}")
        if self.images_per_batch % self.tasks:
            raise ValueError(f"{flag('images_per_batch')} (N={self.images_per_batch}) must be divisible by "
                             f"{flag('tasks')} (K={self.tasks}): each task takes N/K images")
        if self.images_per_batch // self.tasks < 2:
            raise ValueError(f"each task needs >= 2 ways, but N/K = {self.images_per_batch}/{self.tasks} = "
                             f"{self.images_per_batch // self.tasks}; raise {flag('images_per_batch')} or lower "
                             f"{flag('tasks')}")
        if self.method == "bmssl" and self.target_steps < 1:
            raise ValueError(f"--method bmssl needs {flag('target_steps')} >= 1 (with δ = 0 the bootstrap "
                             "target is w_L itself and the KL is 0)")
        if (self.method in ("bmssl", "metassl") and self.contrastive_weight > 0
                and self.contrastive_views == "support" and self.support_views < 2):
            raise ValueError(f"{flag('contrastive_views')} support needs {flag('support_views')} >= 2 (one "
                             "support view per image has no contrastive positive); use auto or all")
        if self.method == "simclr" and self.contrastive_weight <= 0:
            raise ValueError(f"--method simclr trains the NT-Xent alone: {flag('contrastive_weight')} must be > 0")
        if self.schedule_steps is not None and self.schedule_steps < self.warmup_steps:
            raise ValueError(f"{flag('schedule_steps')} ({self.schedule_steps}) must be >= "
                             f"{flag('warmup_steps')} ({self.warmup_steps})")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"{flag('device')} must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.protocols or any(p not in PROTOCOLS for p in self.protocols):
            raise ValueError(f"{flag('protocols')} must be one or more of {', '.join(PROTOCOLS)}, "
                             f"got {' '.join(map(str, self.protocols)) or 'nothing'}")
        parse_settings(self.eval_settings)
        return self

    def meta_config(self) -> MetaConfig:
        """The engine's config (bmssl.meta.MetaConfig) for this run."""
        return MetaConfig(
            method=self.method, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
            target_steps=self.target_steps, order=self.order, contrastive_weight=self.contrastive_weight,
            contrastive_temperature=self.temperature, contrastive_variant=self.variant,
            contrastive_views=self.contrastive_views, target_data=self.target_data,
            kl_temperature=self.kl_temperature, task_loss_weight=self.task_loss_weight, head=self.head,
            ways=self.images_per_batch // self.tasks if self.head == "shared" else None,
            projection_dim=self.projection_dim, projection_hidden=self.projection_hidden,
            outer_lr=self.outer_lr, weight_decay=self.weight_decay, schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            total_steps=self.schedule_steps or max(self.steps, self.warmup_steps, 1),
            min_lr_ratio=self.min_lr_ratio, clip_grad_norm=self.clip_grad_norm, seed=self.seed,
            task_batching=self.task_batching, checkpoint_inner_steps=self.checkpoint_inner_steps,
            cuda_graph=self.cuda_graph)

    def to_dict(self) -> dict:
        """Plain types only (tuples as lists), as stored in checkpoints and results.json."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}: written by another bmssl version?")
        return cls(**values)


# Fields that may differ on --resume: where and how long to run, and what to evaluate.
RUN_CONTROL = ("steps", "device", "threads", "task_batching", "checkpoint_inner_steps", "cuda_graph",
               "checkpoint_every",
               "stop_after", "log_every", "progress", "eval",
               "eval_data", "eval_settings", "episodes", "protocols", "queries", "eval_batch", "eval_seed",
               "finetune_steps", "finetune_lr")

# Short aliases beside the long --field-name flags.
ALIASES = {"images_per_batch": ["-N"], "tasks": ["-K"], "support_views": ["--M1"], "query_views": ["--M2"],
           "inner_steps": ["-L"], "target_steps": ["--delta"], "inner_lr": ["--alpha"], "outer_lr": ["--beta"],
           "contrastive_weight": ["--lam"], "temperature": ["--tau"], "warmup_steps": ["--warmup"]}


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + name.replace("_", "-")


# The checks of bmssl.validate, naming the field by its flag.
def _choice(name, value, choices):
    validate.field_choice(flag(name), value, choices)


def _integer(name, value, minimum):
    validate.field_integer(flag(name), value, minimum)


def _positive(name, value):
    validate.field_positive(flag(name), value)


def _real(name, value, low, high, open_ends=False):
    validate.field_in_interval(flag(name), value, low, high, open_ends)


def parse_settings(settings) -> list:
    """["5w1s", "20w5s"] -> [(5, 1), (20, 5)] (ways, shots)."""
    if isinstance(settings, str) or not settings:
        raise ValueError(f"few-shot settings must be a list like 5w1s 5w5s, got {settings!r}")
    parsed = []
    for setting in settings:
        match = SETTING.match(str(setting))
        if not match or int(match[1]) < 2 or int(match[2]) < 1:
            raise ValueError(f"few-shot setting {setting!r} is not <ways>w<shots>s with ways >= 2 and "
                             "shots >= 1 (e.g. 5w1s, 20w5s)")
        parsed.append((int(match[1]), int(match[2])))
    return parsed


# ---- data -------------------------------------------------------------------------------------


class DataSplit(NamedTuple):
    """The unlabelled training pool's source and the labelled held-out test set."""

    train: "bmssl.data.ImageSet"
    test: "bmssl.data.ImageSet"
    description: str


DATA_HELP = ("glyphs (embedded default), glyphs:A,B (those alphabets), omniglot (the small1/small2 "
             "zips), a path to an Omniglot zip or folder, or folder:<path> (class folders)")


def _missing(spec: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"data {spec!r}: {path} does not exist. Pass an existing Omniglot zip or folder, "
        f"folder:<existing class-folder path>, --data omniglot (looks in $BMSSL_OMNIGLOT_DIR or "
        f"<repo>/../shared/data/omniglot), or --data glyphs (embedded, needs no files)")


def load_whole(spec: str, config: TrainConfig, show_progress: bool = False, role: str = "test"):
    """All of data spec `spec` as one ImageSet: the training pool (role "train", what --data
    gives beside --eval-data) or the test set (role "test", what --eval-data reads). The
    Omniglot small split (--data omniglot, or a folder holding both zips) is the one spec whose
    halves differ: images_background_small1 for training, and for testing the alphabets of
    images_background_small2 that small1 lacks."""
    from bmssl import data

    if spec == "glyphs" or spec.startswith("glyphs:"):
        alphabets = tuple(a for a in spec[len("glyphs:"):].split(",") if a) if ":" in spec else None
        return data.load_glyphs(image_size=config.image_size, alphabets=alphabets, show_progress=show_progress)
    if role not in ("train", "test"):
        raise ValueError(f"role must be 'train' or 'test', got {role!r}")
    half = 0 if role == "train" else 1
    if spec == "omniglot":
        return _omniglot_split(spec, None, config)[half]
    if spec.startswith("folder:"):
        if not spec[len("folder:"):].strip():
            raise ValueError(f"data {spec!r} names no folder: give folder:<path to the class folders>")
        path = Path(spec[len("folder:"):]).expanduser()
        if not path.is_dir():
            raise _missing(spec, path)
        return data.load_image_folder(path, image_size=config.image_size, mode="L" if config.channels == 1 else "RGB",
                                      show_progress=show_progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing(spec, path)
    if _holds_small_split(path):
        return _omniglot_split(spec, path, config)[half]
    return data.load_omniglot(path, image_size=config.image_size, show_progress=show_progress)


def _holds_small_split(path: Path) -> bool:
    names = ("images_background_small1", "images_background_small2")
    return path.is_dir() and all((path / f"{n}.zip").exists() or (path / n).is_dir() for n in names)


def _omniglot_split(spec, root, config):
    from bmssl import data

    try:
        return data.load_omniglot_small_split(root=root, image_size=config.image_size)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"data {spec!r}: {error} Or train on the embedded set: --data glyphs") from None


def resolve_data(config: TrainConfig, show_progress: bool = False) -> DataSplit:
    """The training pool and the test set named by config.data (and config.eval_data)."""
    spec = config.data.strip()
    split_seed = config.seed if config.split_seed is None else config.split_seed
    if config.eval_data:
        train = load_whole(spec, config, show_progress, role="train")
        test = load_whole(config.eval_data, config, show_progress, role="test")
        check_disjoint(train, test, spec, config.eval_data)
        description = f"train: all of {train.source} (--data {spec}); test: all of {test.source}"
    elif spec == "omniglot" or (Path(spec).expanduser().exists() and _holds_small_split(Path(spec).expanduser())):
        train, test = _omniglot_split(spec, None if spec == "omniglot" else Path(spec).expanduser(), config)
        description = "train: images_background_small1; test: alphabets only in images_background_small2"
    else:
        whole = load_whole(spec, config, show_progress)
        if len(whole.groups) < 2:
            raise ValueError(f"data {spec!r} has {len(whole.groups)} group(s) ({whole.groups}); a train/test "
                             "split by group needs >= 2. Give --eval-data for a separate test set")
        train, test = whole.split_by_group({"train": 1 - config.test_fraction, "test": config.test_fraction},
                                           seed=split_seed).values()
        description = (f"{spec} split by group with seed {split_seed}: test groups "
                       f"{', '.join(test.groups)}")
    if train.channels != test.channels or train.image_size != test.image_size:
        raise ValueError(f"train images are {train.channels}x{train.image_size} but test images are "
                         f"{test.channels}x{test.image_size}")
    return DataSplit(train, test, description)


def _image_hashes(images: torch.Tensor) -> list:
    """sha1 of each image's bytes, None for a constant image (blank images say nothing of a leak)."""
    flat = images.reshape(len(images), -1)
    constant = (flat == flat[:, :1]).all(dim=1).tolist()
    return [None if blank else hashlib.sha1(row.numpy().tobytes()).hexdigest()
            for row, blank in zip(flat.contiguous(), constant)]


def check_disjoint(train, test, train_spec: str, test_spec: str):
    """ValueError when a test image is byte-identical to a training image (after decoding and
    resizing): few-shot accuracy on such classes measures memorisation, not transfer. Omniglot's
    images_background_small1 and small2 both hold Greek and Latin, for instance."""
    if train.images.shape[1:] != test.images.shape[1:]:
        return  # resolve_data refuses the mismatch with its own message
    seen = set(_image_hashes(train.images)) - {None}
    shared = sorted({test.class_names[int(label)] for h, label in zip(_image_hashes(test.images), test.labels)
                     if h in seen})
    if shared:
        raise ValueError(
            f"--eval-data {test_spec} shares images with --data {train_spec}: {len(shared)} of its "
            f"{test.num_classes} classes ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}) have images "
            "that are also in the training data, so their few-shot accuracy would measure memorisation. Give "
            "test data disjoint from the training data (--data omniglot alone trains on images_background_small1 "
            "and tests on the alphabets only images_background_small2 has)")


def fingerprint(images: torch.Tensor) -> str:
    """sha1 of the training images' shape and bytes: a resumed run must train on the same pool."""
    digest = hashlib.sha1(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def augment_config(config: TrainConfig, channels: int) -> AugmentConfig:
    name = config.augment if config.augment != "auto" else ("omniglot" if channels == 1 else "rgb")
    if name == "rgb" and channels != 3:
        raise ValueError(f"--augment rgb needs 3-channel images; these have {channels}")
    return {"omniglot": AugmentConfig.omniglot, "rgb": AugmentConfig.rgb, "none": AugmentConfig.identity}[name]()


# ---- model ------------------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def build_learner(config: TrainConfig, image_shape, device, dtype=None) -> MetaLearner:
    """The MetaLearner of `config` for images of `image_shape` (C, H, W), seeded with config.seed."""
    options = {"hidden": config.hidden, "depth": config.depth} if config.backbone == "conv4" else (
        {"widths": tuple(config.widths)} if config.widths else {})
    backbone = build_backbone(config.backbone, tuple(image_shape), norm=config.norm, seed=config.seed, **options)
    backbone = backbone.to(device=device, dtype=dtype or DTYPES[config.dtype])
    return MetaLearner(config.meta_config(), backbone)


# ---- torchrun ---------------------------------------------------------------------------------


@dataclass
class World:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_environment(cls, device_name: str) -> "World":
        """Join the torchrun job named by RANK / WORLD_SIZE / MASTER_ADDR, if any: gloo on CPU,
        nccl on CUDA. An already initialised default group is used as it is."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = resolve_device(device_name, local_rank).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: TaskBatch) -> TaskBatch:
        """This rank's tasks [r·K/W, (r+1)·K/W) of the global batch."""
        if self.size == 1:
            return batch
        per_rank = batch.tasks // self.size
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return TaskBatch(*(getattr(batch, f.name)[part] for f in dataclasses.fields(TaskBatch)))

    def average_hook(self):
        """MetaLearner.gradient_hook: the mean over ranks of the meta-gradient, the loss and the
        metrics, in one all_reduce."""

        def hook(grads, loss, aux):
            names, keys = list(grads), list(aux)
            reference = loss.reshape(1)
            flat = torch.cat([grads[n].reshape(-1) for n in names] + [reference,
                             reference.new_tensor([aux[k] for k in keys])])
            dist.all_reduce(flat)
            flat /= self.size
            out, offset = {}, 0
            for name in names:
                count = grads[name].numel()
                out[name] = flat[offset:offset + count].view_as(grads[name])
                offset += count
            loss = flat[offset].clone()
            return out, loss, dict(zip(keys, flat[offset + 1:].tolist()))

        return hook

    def simclr_ntxent(self, labels_per_rank: int):
        """simclr's NT-Xent with negatives from every rank; this rank's labels are offset by
        rank · labels_per_rank so that they are global identities."""
        from bmssl.distributed import ntxent_gathered

        def loss(z, labels, temperature, variant):
            return ntxent_gathered(z, labels + self.rank * labels_per_rank, temperature, variant)

        return loss

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` holds on any rank (so that every rank takes the same branch); one
        all_reduce of a scalar on `device` (nccl needs a CUDA tensor)."""
        if self.size == 1:
            return bool(flag)
        tensor = torch.tensor([float(flag)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self, failed: bool = False):
        """Leave the job: wait for every rank (rank 0 may still be writing results), then tear the
        group down. A rank that destroyed its gloo group while a peer was still connected could
        abort at exit ("terminate called without an active exception"). A rank that fails does
        not wait: its peers sit in the next step's all_reduce, so a barrier would hang the whole
        job until the collective timeout; leaving at once lets that all_reduce fail on the peers
        and torchrun end the job, with this rank's error printed."""
        if self.owns_group and dist.is_initialized():
            if not failed:
                dist.barrier()
            dist.destroy_process_group()


# ---- the run ----------------------------------------------------------------------------------


class Run:
    """The state of a training run: config, data, learner, task generator, metrics."""

    def __init__(self, config: TrainConfig, run_dir, world: World, show_data_progress=False):
        self.config, self.run_dir, self.world = config, Path(run_dir), world
        self.data = resolve_data(config, show_progress=show_data_progress and world.is_main)
        self.device = resolve_device(config.device, world.local_rank)
        if self.device.type == "cuda":
            # the current device is the run's: streams, Triton launches and graph captures that
            # take the current device (torchrun's rank r runs on cuda:r) then land on it
            torch.cuda.set_device(self.device)
        if config.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"{flag('cuda_graph')} captures CUDA graphs: it needs a CUDA device, and this run "
                             f"is on {self.device}")
        self.dtype = DTYPES[config.dtype]
        self.image_shape = (self.data.train.channels, *self.data.train.image_size)
        self.pool = self.data.train.float(self.device, self.dtype)
        self.augment = augment_config(config, self.data.train.channels)
        if config.images_per_batch > len(self.data.train):
            raise ValueError(f"{flag('images_per_batch')} (N={config.images_per_batch}) exceeds the "
                             f"{len(self.data.train)} training images")
        if config.tasks % world.size:
            raise ValueError(f"{flag('tasks')} (K={config.tasks}) must be divisible by the {world.size} "
                             "torchrun processes: each takes K/world tasks")
        self.fingerprint = fingerprint(self.data.train.images)
        self.learner = build_learner(config, self.image_shape, self.device, self.dtype)
        if world.size > 1:
            self.learner.gradient_hook = world.average_hook()
            if config.method == "simclr":  # the other methods' NT-Xent is per task, on one rank
                ways = config.images_per_batch // config.tasks
                self.learner.simclr_ntxent = world.simclr_ntxent(config.tasks // world.size * ways)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.history, self.evaluation, self.step = [], [], 0
        self.evaluated_with = None  # the settings and step of θ of the rows in self.evaluation
        self.saved_step = 0  # the step of the checkpoint on disk
        self.stop_signal = None  # the signal that interrupted the loop, if one did
        self.plotted_at = time.monotonic()

    def data_record(self) -> dict:
        return {"description": self.data.description, "train": self.data.train.summary(),
                "test": self.data.test.summary(), "train_fingerprint": self.fingerprint,
                "image_shape": list(self.image_shape), "test_groups": self.data.test.groups}

    def restore(self, state: dict):
        """Continue from a loaded checkpoint (run_files.load_checkpoint)."""
        if state["data"].get("train_fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint {state['path']} was trained on other images ({state['data'].get('train')}) "
                             f"than --data {self.config.data} with --eval-data {self.config.eval_data} gives now "
                             f"({self.data.train.summary()}): the files changed, or --eval-data did (with it the pool is all of "
                             "--data, without it the training part of a split of --data); resume with the data "
                             "and --eval-data of the original run")
        self.learner.load_state_dict(state["learner"])
        self.generator.set_state(state["generator"].to(torch.uint8))
        self.step = self.saved_step = int(state["step"])
        self.history = [row for row in state["history"] if row["step"] <= self.step]
        if self.learner.steps_done != self.step:
            raise ValueError(f"checkpoint {state['path']} is inconsistent: step {self.step} but the learner "
                             f"has done {self.learner.steps_done} steps")
        results = Path(state["path"]).parent / run_files.RESULTS_NAME
        self.evaluation, self.evaluated_with = self.saved_evaluation(results)

    def saved_evaluation(self, path: Path):
        """The few-shot rows of the results.json at `path` and what they were computed with
        (EVALUATED_WITH and "step"), when they are rows of θ at this checkpoint's step; else
        ([], None). Older results.json files without "eval_config" take it from their config."""
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            return [], None
        except (OSError, ValueError) as error:
            _log(self.world, f"warning: cannot read {path} ({error}); its evaluation results, if any, are not kept")
            return [], None
        rows = payload.get("eval") if isinstance(payload, dict) else None
        if not rows or not isinstance(rows, list):
            return [], None
        evaluated_with = payload.get("eval_config") or {
            **{name: (payload.get("config") or {}).get(name) for name in EVALUATED_WITH}, "step": payload.get("step")}
        if evaluated_with.get("step") != self.step:
            _log(self.world, f"warning: the evaluation in {path} is of step {evaluated_with.get('step')}, not of "
                             f"the checkpoint's step {self.step}; it is not kept")
            return [], None
        return rows, evaluated_with

    def save(self, status: str, final: bool = False):
        """Rank 0: the checkpoint, then results.json (and curves.png, see write_results)."""
        if not self.world.is_main:
            return
        run_files.save_checkpoint(self.run_dir / run_files.CHECKPOINT_NAME, step=self.step,
                                  learner_state=self.learner.state_dict(), generator_state=self.generator.get_state(),
                                  config=self.config.to_dict(), history=self.history, data=self.data_record(),
                                  extra={"world_size": self.world.size, "bmssl_version": bmssl.__version__})
        self.saved_step = self.step
        self.write_results(status, plot=final)

    def write_results(self, status: str, error: str | None = None, plot: bool | None = True,
                      at_checkpoint: bool = False):
        """results.json; curves.png too when `plot`, or (plot False) when the last plot is
        PLOT_EVERY_S old (matplotlib takes about a second, too slow for every checkpoint of a fast
        run); plot None: never. at_checkpoint: the step and history of the checkpoint, not of the
        steps done since (an abort). curves.png is derived from results.json: failing to write
        it warns instead of failing the run (on a full disk it had hidden the checkpoint's error)."""
        if not self.world.is_main:
            return
        step = self.saved_step if at_checkpoint else self.step
        history = [row for row in self.history if row["step"] <= step] if at_checkpoint else self.history
        payload = {"bmssl_version": bmssl.__version__, "status": status, "step": step,
                   "config": self.config.to_dict(), "data": self.data_record(), "world_size": self.world.size,
                   "device": str(self.device), "torch": torch.__version__, "python": platform.python_version(),
                   "threads": torch.get_num_threads(), "history": history, "eval": self.evaluation,
                   "eval_config": self.evaluated_with}
        if error:
            payload["error"] = error
        run_files.write_json(self.run_dir / run_files.RESULTS_NAME, payload)
        if plot is None or (not plot and time.monotonic() - self.plotted_at < PLOT_EVERY_S):
            return
        self.plotted_at = time.monotonic()
        try:
            run_files.plot_curves(self.run_dir / run_files.CURVES_NAME, history,
                                  f"{self.config.method} on {self.config.data}, step {step}")
        except Exception as plot_error:  # noqa: BLE001 - matplotlib / PIL / OSError alike
            _log(self.world, f"warning: could not write {self.run_dir / run_files.CURVES_NAME} "
                             f"({type(plot_error).__name__}: {plot_error}); results.json holds the curves' data")

    def next_batch(self) -> TaskBatch:
        c = self.config
        batch = make_tasks(self.pool, c.images_per_batch, c.tasks, c.support_views, c.query_views, self.augment,
                           self.generator)
        return self.world.shard(batch)


def _log(world: World, message: str):
    if world.is_main:
        print(message, file=sys.stderr, flush=True)


def train(config: TrainConfig, run_dir=None, resume=None, overrides: dict | None = None,
          show_progress: bool | None = None) -> dict:
    """Run (or continue) a training run; returns the results dict also written to results.json.

    resume: a run directory or checkpoint file; its config is used, with `overrides` (a dict of
    TrainConfig fields, e.g. the flags given on the command line) applied where RUN_CONTROL allows.
    run_dir: where files go (default: the resumed checkpoint's folder). A new run refuses a
    run_dir that already holds a checkpoint, and any run refuses one that holds results.json or
    curves.png without a checkpoint (not a run: those files are not bmssl's to overwrite).
    """
    state = None
    if resume is not None:
        state = run_files.load_checkpoint(resume, resuming=True)
        config = merge_resume_config(TrainConfig.from_dict(state["config"]), overrides or {}, state["path"])
        run_dir = Path(run_dir) if run_dir is not None else Path(state["path"]).parent
    elif run_dir is None:
        raise ValueError("--out RUN_DIR is required: where the checkpoint, results.json and curves.png go")
    config.validate()
    if config.schedule_steps is None:  # fixed now, so that a later --steps keeps the schedule
        config = replace(config, schedule_steps=max(config.steps, config.warmup_steps, 1))
    if config.eval:  # what the config alone decides, before the data is read
        check_shared_head(config, config.eval_settings, config.protocols, "this run", "--eval-settings")
        check_finetune_steps(config, config.finetune_steps, config.protocols, "this run")
    if str(run_dir).strip() == "":
        raise ValueError("--out is empty (an unset variable?): give the run directory")
    run_dir = Path(run_dir).expanduser()
    _check_run_directory(run_dir, state)
    run_files.writable_directory(run_dir, "--out")
    # rank 0 writes the directory: it holds the lock, then checks again (a run may have claimed
    # the directory between the check above and the lock)
    main_rank = os.environ.get("RANK", "0") == "0"
    with run_files.RunLock(run_dir) if main_rank else contextlib.nullcontext():
        if main_rank:
            _check_run_directory(run_dir, state)
        if config.threads:
            torch.set_num_threads(config.threads)
        world = World.from_environment(config.device)
        failed = True
        try:
            result = _train(config, run_dir, state, world, show_progress)
            failed = False
            return result
        finally:
            world.close(failed=failed)


def _check_run_directory(run_dir: Path, state) -> None:
    """ValueError when a new run's run_dir holds a run, a resumed run's holds another, or either
    holds results.json / curves.png without a checkpoint."""
    existing = run_dir / run_files.CHECKPOINT_NAME
    if existing.exists():
        if state is None:
            raise ValueError(f"{run_dir} already holds a run ({run_files.CHECKPOINT_NAME}); continue it with "
                             f"--resume {run_dir}, or choose another --out")
        if existing.resolve() != Path(state["path"]).resolve():
            raise ValueError(f"--out {run_dir} already holds another run than the one resumed ({state['path']}); "
                             "continuing there would overwrite it: choose another --out")
    else:
        taken = [name for name in (run_files.RESULTS_NAME, run_files.CURVES_NAME) if (run_dir / name).exists()]
        if taken:
            raise ValueError(f"--out {run_dir} already holds {' and '.join(taken)} but no {run_files.CHECKPOINT_NAME}: "
                             "it is not a run that --resume could continue, and this run would overwrite "
                             f"{'them' if len(taken) > 1 else 'it'}; choose another --out, or move "
                             f"{'them' if len(taken) > 1 else 'it'} away")


def merge_resume_config(saved: TrainConfig, overrides: dict, path) -> TrainConfig:
    """The saved config with the run-control fields of `overrides` applied; any other field
    that differs is an error (it would not continue the same run). --stop-after applies to one
    invocation only: the saved one is dropped."""
    saved, changes = replace(saved, stop_after=None), {}
    for name, value in overrides.items():
        if isinstance(value, list):
            value = tuple(value)
        if value == getattr(saved, name):
            continue
        if name not in RUN_CONTROL:
            allowed = " ".join(flag(n) for n in RUN_CONTROL)
            raise ValueError(f"{flag(name)} {value} differs from the value {getattr(saved, name)!r} of the run in "
                             f"{path}; --resume continues a run as it was set up and only lets {allowed} change. "
                             "Start a new run (another --out) to change it")
        changes[name] = value
    return replace(saved, **changes)


def _train(config: TrainConfig, run_dir: Path, state, world: World, show_progress) -> dict:
    started = time.perf_counter()
    run = Run(config, run_dir, world, show_data_progress=config.progress)
    if config.eval:
        check_eval_feasible(config, run.data.test)
    if state is not None:
        run.restore(state)
        _log(world, f"resumed {state['path']} at step {run.step}")
    else:
        run.save("running")  # step 0: claims the run directory, and a resume point from the start
    if config.method != "scratch" and 0 < config.steps < config.warmup_steps:
        _log(world, f"warning: --steps {config.steps} is shorter than the warm-up (--warmup-steps "
                    f"{config.warmup_steps}): the learning rate climbs only to {config.steps}/{config.warmup_steps} "
                    f"× β = {config.steps / config.warmup_steps * config.outer_lr:g} and never reaches --outer-lr "
                    f"{config.outer_lr:g}; lower --warmup-steps")
    if config.schedule == "cosine" and config.steps > run.learner.config.total_steps:
        _log(world, f"warning: --steps {config.steps} runs past the cosine schedule's {run.learner.config.total_steps} "
                    f"steps; after it the learning rate stays at --min-lr-ratio × β = "
                    f"{config.min_lr_ratio * config.outer_lr:g}")
    parameters = sum(p.numel() for p in run.learner.model.parameters())
    _log(world, f"bmssl train: {config.method} on {run.data.train.summary()}\n  test: {run.data.test.summary()}\n"
                f"  {run.data.description}\n  {config.backbone} ({parameters:,} parameters), "
                f"N={config.images_per_batch} "
                f"K={config.tasks} M1={config.support_views} M2={config.query_views} L={config.inner_steps} "
                f"δ={config.target_steps} order={config.order}, device {run.device}, {torch.get_num_threads()} "
                f"threads, world size {world.size}, out {run_dir}")

    target = config.steps if config.method != "scratch" else run.step
    if config.method == "scratch" and run.step == 0:
        _log(world, "scratch: no training; θ is the seeded random initialisation")
    if config.stop_after is not None:
        target = min(target, run.step + config.stop_after)
    status = _loop(run, target, show_progress)
    if status != "interrupted" and (run.step >= config.steps or config.method == "scratch"):
        status = "finished"
    run.save(status, final=True)
    if status == "finished" and config.eval and world.is_main:
        _evaluate(run, status)
    wall = time.perf_counter() - started
    _log(world, f"{status} at step {run.step} in {wall:.1f}s: {run_dir / run_files.RESULTS_NAME}")
    return {"status": status, "step": run.step, "history": run.history, "eval": run.evaluation,
            "config": config.to_dict(), "run_dir": str(run_dir), "signal": run.stop_signal}


def _evaluate(run: Run, status: str) -> None:
    """The few-shot evaluation of a finished run, into results.json and printed as a table.
    Rows that results.json already holds for this θ (a resumed finished run) are kept and not
    recomputed: only the requested (setting, protocol) pairs it lacks are evaluated, unless an
    EVALUATED_WITH setting (--episodes, --queries, ...) differs from theirs, which recomputes all
    of the requested ones and drops the old rows. Any error is recorded in results.json."""
    from bmssl.evaluation_cli import evaluate_models, format_table

    config = run.config
    wanted = {name: getattr(config, name) for name in EVALUATED_WITH}
    if run.evaluated_with is None or {k: v for k, v in run.evaluated_with.items() if k != "step"} != wanted:
        run.evaluation = []
    have = {(row["setting"], row["protocol"]) for row in run.evaluation}
    requested = [(f"{ways}w{shots}s", protocol) for ways, shots in parse_settings(config.eval_settings)
                 for protocol in config.protocols]
    missing = list(dict.fromkeys(pair for pair in requested if pair not in have))
    if not missing:
        _log(run.world, f"evaluation: results.json holds every requested setting for step {run.step} already; "
                        "not recomputed")
    try:
        for setting in dict.fromkeys(setting for setting, _ in missing):
            protocols = tuple(protocol for s, protocol in missing if s == setting)
            run.evaluation += evaluate_models({config.method: run.learner}, run.data.test,
                                              replace(config, eval_settings=(setting,), protocols=protocols),
                                              show_progress=config.progress)
            run.evaluated_with = {**wanted, "step": run.step}
    except Exception as error:
        run.write_results(status, f"evaluation failed: {error}", plot=False)
        raise
    shown = [row for row in run.evaluation if (row["setting"], row["protocol"]) in requested]
    print(format_table(shown, f"few-shot accuracy (%) on {run.data.test.summary()}"), flush=True)
    run.write_results(status, plot=False)


def _loop(run: Run, target: int, show_progress) -> str:
    """Steps until `target`: "stopped", or "interrupted" after SIGINT / SIGTERM (the step in
    progress finishes first; run.stop_signal names the signal). A second signal aborts the step:
    results.json then says "interrupted", and its error names the step the checkpoint holds. Any other error
    (a non-finite loss, a bad BMSSL_BACKEND, ...) is recorded in results.json as "failed" with
    its text, and raised; the checkpoint stays, and --resume continues from it."""
    config, world = run.config, run.world
    if run.step >= target:
        return "stopped"
    enabled = config.progress if show_progress is None else show_progress
    bar = StepBar(total=config.steps, initial=run.step, desc=config.method, disable=not (enabled and world.is_main),
                  every=config.log_every)
    stop = StopRequests("stopping after the step in progress, then checkpointing; again to abort at once")
    doing = "outer step"  # what was in progress when an error came: a step, or the checkpoint after one
    try:
        with stop:
            while run.step < target:
                doing = f"outer step {run.step + 1}"
                _step(run, bar)
                if world.any(stop.requested, run.device):
                    run.stop_signal = stop.signal
                    return "interrupted"
                if run.step % config.checkpoint_every == 0 and run.step < target:
                    doing = f"the checkpoint after outer step {run.step}"
                    run.save("running")
    except KeyboardInterrupt:  # a second signal: at once, so no plot; results.json as the checkpoint
        run.write_results("interrupted", f"aborted during step {run.step + 1}; {run_files.CHECKPOINT_NAME} holds "
                                         f"step {run.saved_step}: --resume continues from there",
                          plot=None, at_checkpoint=True)
        raise
    except FloatingPointError as error:  # _step's message names the step and the remedies
        run.write_results("failed", str(error), plot=False)
        raise
    except Exception as error:
        resume = (f"the last checkpoint is step {run.saved_step} in {run.run_dir / run_files.CHECKPOINT_NAME}; "
                  f"--resume {run.run_dir} continues from there")
        print(f"bmssl train: rank {world.rank} failed in {doing}; {resume}" if world.size > 1
              else f"bmssl train: failed in {doing}; {resume}", file=sys.stderr, flush=True)
        try:  # printed first: on a full disk this write fails too
            run.write_results("failed", f"{type(error).__name__} in {doing}: {error}; {resume}", plot=False)
        except OSError as write_error:
            _log(world, f"warning: could not record the failure in results.json either ({write_error})")
        raise
    finally:
        bar.close()
    return "stopped"


def _step(run: Run, bar: StepBar) -> None:
    """One outer step, its metrics in run.history and on the bar."""
    batch = run.next_batch()
    try:
        metrics = run.learner.step(batch)
    except FloatingPointError as error:  # recorded in results.json by _loop
        raise FloatingPointError(f"{error}. The last checkpoint is step {run.saved_step} in "
                                 f"{run.run_dir / run_files.CHECKPOINT_NAME}; lower --outer-lr or --inner-lr, or "
                                 "set --clip-grad-norm, and start again") from None
    run.step += 1
    run.evaluation, run.evaluated_with = [], None  # of the θ before this step (a resumed finished run)
    run.history.append({key: float(value) if key != "step" else int(value) for key, value in metrics.items()})
    shown = {"loss": metrics["outer_loss"]}
    if "query_accuracy" in metrics:
        shown["acc"] = metrics["query_accuracy"]
    shown["lr"] = metrics["lr"]
    bar.update(**shown)


def check_eval_feasible(config: TrainConfig, test, settings_flag: str = "--eval-settings") -> None:
    """Fail before training (or before the first of several evaluations), not after it, when the
    test set cannot hold the requested episodes. `settings_flag` names the flag of the settings."""
    import warnings

    from bmssl.eval import EpisodeSampler

    for ways, shots in parse_settings(config.eval_settings):
        try:
            with warnings.catch_warnings():  # the evaluation itself warns about left-out classes
                warnings.simplefilter("ignore")
                EpisodeSampler(test.labels, ways, shots, config.queries)
        except ValueError as error:
            raise ValueError(f"{settings_flag} {ways}w{shots}s on the test set ({test.summary()}): {error}; "
                             "lower the ways, shots or --queries") from None


def check_finetune_steps(model: TrainConfig, finetune_steps, protocols, what: str) -> None:
    """ValueError when the finetune protocol would run 0 SGD steps from `model`'s zero head
    (--finetune-steps 0, or its default L = 0): every query is class 0, exact chance."""
    if "finetune" not in protocols or model.head != "zero":
        return
    steps = finetune_steps if finetune_steps is not None else model.inner_steps
    if steps == 0:
        given = "--finetune-steps 0" if finetune_steps is not None else "--finetune-steps (default: L = 0)"
        raise ValueError(f"{what}: the finetune protocol with 0 SGD steps from the zero head predicts class 0 "
                         f"for every query (exact chance); {given}: give --finetune-steps >= 1, "
                         "or --protocols proto")


def check_shared_head(model: TrainConfig, settings, protocols, what: str, settings_flag: str) -> None:
    """ValueError when `model` (a run's config) has a shared head and the finetune protocol is
    asked for episodes of other ways than its N/K: the meta-learned head has N/K outputs. `what`
    names the model, `settings_flag` the flag that gave `settings`."""
    if model.head != "shared" or "finetune" not in protocols:
        return
    ways = model.images_per_batch // model.tasks
    other = [f"{w}w{s}s" for w, s in parse_settings(settings) if w != ways]
    if other:
        verb = "asks" if len(other) == 1 else "ask"
        raise ValueError(f"{what} has --head shared: a meta-learned {ways}-way head (N/K = "
                         f"{model.images_per_batch}/{model.tasks}), so the finetune protocol runs only {ways}-way "
                         f"episodes, and {settings_flag} {' '.join(other)} {verb} for other ways; give {ways}-way "
                         "settings, or --protocols proto for those")


# ---- command line -----------------------------------------------------------------------------


def _optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `bmssl train`. Every flag defaults to argparse.SUPPRESS, so the parsed
    namespace holds only what was given (TrainConfig supplies the defaults shown in --help, and
    --resume can tell which settings the command line changes)."""
    d = TrainConfig()
    S = argparse.SUPPRESS

    def add(group, name, help, **kwargs):
        if "type" in kwargs and "metavar" not in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = "FLOAT" if kwargs["type"] in (float, _optional_float) else "INT"
        shown = "" if "default:" in help else f" (default: {_shown(getattr(d, name))})"
        group.add_argument(flag(name), *ALIASES.get(name, []), dest=name, default=S, help=help + shown, **kwargs)

    run = parser.add_argument_group("run")
    run.add_argument("--out", "-o", default=S, metavar="RUN_DIR",
                     help="run directory: checkpoint.pt, results.json, curves.png (required for a new run; "
                          "with --resume, defaults to the checkpoint's folder)")
    run.add_argument("--resume", default=S, metavar="RUN_DIR_OR_CHECKPOINT",
                     help="continue a run exactly where its checkpoint left it; only the run-control and "
                          "evaluation flags may change")
    add(run, "method", "bmssl (bootstrapped KL outer loss), metassl (query task loss), simclr (NT-Xent, no "
        "meta level) or scratch (no training: the seeded random init)", choices=METHODS)
    add(run, "steps", "outer steps of the whole run", type=int)
    add(run, "stop_after", "stop after this many steps in this invocation (continue with --resume; default: "
                           "run to --steps)", type=int)
    add(run, "seed", "seeds the backbone, the heads, the task generator and (by default) the split", type=int)
    add(run, "device", "auto, cpu, cuda or cuda:N")
    add(run, "dtype", "parameter and image dtype", choices=tuple(DTYPES))
    add(run, "threads", "torch CPU threads (default: torch's choice)", type=int)
    add(run, "task_batching", "the K tasks as one torch.func.vmap or a Python loop (auto: vmap on CUDA, loop "
        "on CPU, where it measured faster)", choices=TASK_BATCHING)
    add(run, "checkpoint_inner_steps", "order 2: recompute each inner step in the backward instead of keeping "
        "its activations (memory flat in L; measured on 84x84 images: 35%% more time at L = 8, K = 1 and "
        "57%% at L = 5, K = 4; needs the loop over tasks)",
        action=argparse.BooleanOptionalAction)
    add(run, "cuda_graph", "on CUDA: capture the whole outer step (forward and every backward) as a CUDA graph "
        "once and replay it each step (static shapes; not with --checkpoint-inner-steps)",
        action=argparse.BooleanOptionalAction)
    add(run, "checkpoint_every", "write checkpoint.pt and results.json every this many steps", type=int)
    add(run, "log_every", "without a terminal, print a progress line every this many steps", type=int)
    add(run, "progress", "show progress", action=argparse.BooleanOptionalAction)

    data = parser.add_argument_group("data")
    add(data, "data", DATA_HELP, metavar="SPEC")
    add(data, "eval_data", "test on all of this spec (same forms as --data) instead of a held-out split of "
        "--data, and train on all of --data (omniglot: images_background_small1); refused when a test image "
        "is also a training image (default: the held-out split)", metavar="SPEC")
    add(data, "image_size", "image side in pixels", type=int)
    add(data, "channels", "folder: data only: 1 (grayscale) or 3 (RGB)", type=int)
    add(data, "test_fraction", "fraction of the groups (alphabets) held out for testing", type=float)
    add(data, "split_seed", "seed of the train/test split (default: --seed)", type=int)
    add(data, "augment", "view augmentations: auto (omniglot preset for 1 channel, rgb for 3), omniglot, rgb, "
        "none", choices=AUGMENTS)

    tasks = parser.add_argument_group("tasks (paper §4.1)")
    add(tasks, "images_per_batch", "N, unlabelled images per batch", type=int)
    add(tasks, "tasks", "K, tasks per batch (each N/K-way)", type=int)
    add(tasks, "support_views", "M1, support views per image", type=int)
    add(tasks, "query_views", "M2, query views per image", type=int)

    model = parser.add_argument_group("model")
    add(model, "backbone", "backbone", choices=BACKBONES)
    add(model, "hidden", "conv4 channels", type=int)
    add(model, "depth", "conv4 blocks", type=int)
    add(model, "widths", "resnet12 block widths (default: 16 32 64 128)", type=int, nargs="+")
    add(model, "norm", "normalisation layers", choices=NORMS)
    add(model, "projection_dim", "d, output size of the projection head g", type=int)
    add(model, "projection_hidden", "hidden size of g (default: min(feature size, 512))", type=_optional_int)
    add(model, "head", "zero (per-task head at 0) or shared (meta-learned)", choices=HEADS)

    loop = parser.add_argument_group("two-level loop (paper eqs. 1-3)")
    add(loop, "inner_steps", "L, inner SGD steps", type=int)
    add(loop, "target_steps", "δ, extra steps of the bootstrap target (bmssl)", type=int)
    add(loop, "order", "2: through the inner gradients; 1: first order", type=int, choices=(1, 2))
    add(loop, "inner_lr", "α, inner learning rate", type=float)
    add(loop, "outer_lr", "β, peak Adam learning rate", type=float)
    add(loop, "contrastive_weight", "λ, weight of the NT-Xent term of the task loss", type=float)
    add(loop, "temperature", "τ, NT-Xent temperature", type=float)
    add(loop, "kl_temperature", "T of the bootstrap KL's softmax", type=float)
    add(loop, "task_loss_weight", "bmssl: add this x MetaSSL's query loss to the KL (0: paper eq. 3 "
        "alone, which collapsed on Omniglot; 1 fixed it, see README)", type=float)
    add(loop, "variant", "NT-Xent with several positives: in (paper eq. 1) or out (SupCon)", choices=VARIANTS)
    add(loop, "contrastive_views", "views of the inner NT-Xent: auto, support, all", choices=CONTRASTIVE_VIEWS)
    add(loop, "target_data", "data of the δ target steps", choices=TARGET_DATA)
    add(loop, "weight_decay", "Adam weight decay", type=float)
    add(loop, "schedule", "outer learning-rate schedule after the warm-up", choices=SCHEDULES)
    add(loop, "warmup_steps", "linear warm-up steps", type=int)
    add(loop, "schedule_steps", "length of the cosine schedule, warm-up included (default: the larger of --steps "
        "and --warmup-steps, fixed at the first invocation)", type=int)
    add(loop, "min_lr_ratio", "the cosine ends at this fraction of β", type=float)
    add(loop, "clip_grad_norm", "clip the meta-gradient norm (none: no clipping)", type=_optional_float)

    evaluation = parser.add_argument_group("few-shot evaluation")
    add_eval_arguments(evaluation, add)


def add_eval_arguments(group, add) -> None:
    """Evaluation flags shared by `bmssl train` and `bmssl eval`."""
    add(group, "eval", "evaluate on the test set at the end of the run", action=argparse.BooleanOptionalAction)
    add(group, "eval_settings", "N-way K-shot settings, e.g. 5w1s 5w5s 20w1s", nargs="+", metavar="WwSs")
    add(group, "episodes", "episodes per setting and protocol", type=int)
    add(group, "protocols", "proto (cosine to prototypes) and/or finetune (L SGD steps from θ)", nargs="+",
        choices=PROTOCOLS)
    add(group, "queries", "query images per class in an episode", type=int)
    add(group, "eval_batch", "episodes evaluated at once (vmap)", type=int)
    add(group, "eval_seed", "seed of the episodes (the same episodes for every model)", type=int)
    add(group, "finetune_steps", "finetune SGD steps (default: L)", type=_optional_int)
    add(group, "finetune_lr", "finetune learning rate (default: α)", type=_optional_float)


def _shown(value):
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return value


def config_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(args).items() if name in names}


def main(args: argparse.Namespace) -> int:
    """`bmssl train`: build the config from the flags (or the checkpoint, with --resume) and run."""
    overrides = config_overrides(args)
    resume = getattr(args, "resume", None)
    out = getattr(args, "out", None)
    if resume is None:
        result = train(TrainConfig(**overrides), out)
    else:
        result = train(TrainConfig(), out, resume=resume, overrides=overrides)
    if result["status"] == "interrupted":
        # under torchrun a rank may stop because another rank was signalled (signal None here)
        number = result["signal"] if result["signal"] is not None else signal.SIGTERM
        cause = (signal.Signals(result["signal"]).name if result["signal"] is not None
                 else "a signal to another torchrun rank")
        print(f"bmssl train: interrupted by {cause} at step {result['step']}, "
              f"checkpointed; continue with --resume {result['run_dir']}", file=sys.stderr)
        return 128 + int(number)
    return 0
