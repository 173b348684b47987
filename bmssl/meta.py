"""The two-level loop of BMSSL and MetaSSL (DESIGN.md §1, paper eqs. 1-3), functional and
batched over tasks.

    task loss      l(w; D) = CE(f_w(D), y) + λ · NTXent(g_w(views), y)                  (eq. 1)
    inner loop     w_0 = θ (+ zero head),  w_{l+1} = w_l − α ∇_w l(w_l; support),  l < L
    target         w_{L+δ}: δ more steps from stopgrad(w_L), no graph, then detached
    outer, bmssl   KL(π_{w_{L+δ}} ‖ π_{w_L}) on the query views, π_w = softmax(f_w / T)   (eq. 3)
    outer, metassl l(w_L; query)                                                         (eq. 2)
    θ ← Adam(θ, ∇_θ mean_k outer_k)

order=2 differentiates through the inner gradients (the full meta-gradient); order=1 detaches
them (first-order MAML: dw_L/dθ = I, so ∇_θ outer = ∇_w outer at w_L; under bmssl the
projection head then gets no outer gradient, since the KL reads the classifier only).

The K tasks of a batch run as one computation, torch.func.vmap over tasks with θ shared
(in_dims=None), or as a Python loop over tasks: task_batching="auto" takes vmap on CUDA and the
loop on CPU, where vmap's grouped convolutions measured slower (bench/bench_unroll.py). Inner
gradients are torch.func.grad under vmap and torch.autograd.grad in the loop; the outer gradient
is plain reverse-mode autograd over θ, whose backward builds no graph, so the ops need second
derivatives, never third.

    from bmssl.models import build_backbone
    from bmssl.meta import MetaConfig, MetaLearner
    config = MetaConfig(method="bmssl", inner_steps=5, target_steps=5, order=2,
                        outer_lr=1e-3, warmup_steps=500, total_steps=20_000, clip_grad_norm=10.0)
    learner = MetaLearner(config, build_backbone("conv4", image_shape=(1, 28, 28), seed=0))
    metrics = learner.step(task_batch)   # a bmssl.tasks.TaskBatch
    torch.save(learner.state_dict(), "checkpoint.pt")   # θ, Adam, schedule, step count

Contrastive views. The support set holds M1 views per image. With M1 >= 2 the inner NT-Xent
runs over them. With M1 = 1 (Omniglot: M1=1, M2=5) a support view has no positive, so
contrastive_views="auto" (default) adds the task's query views to the NT-Xent (never to the
cross-entropy). They are unlabelled augmentations of the same images, and their pseudo-label is
the image's identity, so no label leaks; the inner loop does then see the query images through
g, which MetaSSL's query loss should be read with. "support" forbids this, "all" always does it.
MetaSSL's outer NT-Xent runs over the query views (M2 >= 2), else over support + query views.

Baselines through the same learner: "simclr" (NT-Xent over all M views of every image of the
batch, no meta level, same data) and "scratch" (step() trains nothing).
"""
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bmssl.models import HEADS, FewShotModel
from bmssl import validate
from bmssl.ops import kl_bootstrap, ntxent, sgd_unroll_step

METHODS = ("bmssl", "metassl", "simclr", "scratch")
CONTRASTIVE_VIEWS = ("auto", "support", "all")
TARGET_DATA = ("support", "support+query")
SCHEDULES = ("cosine", "constant")
TASK_BATCHING = ("auto", "vmap", "loop")
# MetaConfig fields that choose how the maths runs, not what it computes
EXECUTION_FIELDS = ("task_batching", "checkpoint_inner_steps", "cuda_graph")
VARIANTS = ("in", "out")


@dataclass
class MetaConfig:
    """Everything the engine needs besides the backbone. Validated on construction."""

    method: str = "bmssl"              # "bmssl" | "metassl" | "simclr" | "scratch"
    inner_steps: int = 5               # L
    inner_lr: float = 0.1              # α
    target_steps: int = 5              # δ (bmssl)
    order: int = 2                     # 2: through the inner gradients; 1: first-order MAML
    contrastive_weight: float = 1.0    # λ; 0 disables the NT-Xent term (simclr: λ · NT-Xent, λ > 0)
    contrastive_temperature: float = 0.5  # τ
    contrastive_variant: str = "in"    # "in" (paper eq. 1) | "out" (SupCon L_out)
    contrastive_views: str = "auto"    # "auto" | "support" | "all"
    target_data: str = "support"       # data of the δ target steps: "support" | "support+query"
    kl_temperature: float = 1.0        # T of π_w = softmax(logits / T)
    task_loss_weight: float = 0.0      # bmssl: + this × MetaSSL's query task loss of w_L (0: eq. 3 alone)
    head: str = "zero"                 # "zero": per-task head at 0 | "shared": meta-learned
    ways: int | None = None            # needed by head="shared"
    projection_dim: int = 64           # d
    projection_hidden: int | None = None  # default min(feature_dim, 512)
    outer_lr: float = 1e-3             # β (Adam)
    weight_decay: float = 0.0
    schedule: str = "cosine"           # "cosine" (needs total_steps, else constant) | "constant"
    warmup_steps: int = 0              # linear warm-up from 0 to β
    total_steps: int | None = None     # length of the cosine decay
    min_lr_ratio: float = 0.0          # the cosine decays to min_lr_ratio · β
    clip_grad_norm: float | None = None
    seed: int | None = 0               # draws the heads' initial weights (not the backbone's)
    # how the maths runs (never what it computes; may differ when a state is loaded)
    task_batching: str = "auto"        # "vmap" | "loop" | "auto": vmap on CUDA, loop on CPU
    checkpoint_inner_steps: bool = False  # order 2: recompute each inner step in the backward
    cuda_graph: bool = False           # CUDA: capture the outer step as a CUDA graph, replay it (bmssl.cuda_graph)

    def __post_init__(self):
        self.validate()

    def validate(self):
        _choice("method", self.method, METHODS)
        _choice("contrastive_views", self.contrastive_views, CONTRASTIVE_VIEWS)
        _choice("contrastive_variant", self.contrastive_variant, VARIANTS)
        _choice("target_data", self.target_data, TARGET_DATA)
        _choice("head", self.head, HEADS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("order", self.order, (1, 2))
        _choice("task_batching", self.task_batching, TASK_BATCHING)
        if not isinstance(self.checkpoint_inner_steps, bool):
            raise ValueError(f"checkpoint_inner_steps must be True or False, got {self.checkpoint_inner_steps!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        if self.cuda_graph and self.checkpoint_inner_steps:
            raise ValueError("cuda_graph and checkpoint_inner_steps do not combine: the capture would hold "
                             "every recomputed step anyway; choose one")
        if self.checkpoint_inner_steps and self.task_batching == "vmap":
            raise ValueError("checkpoint_inner_steps runs each task's inner loop under torch.utils.checkpoint, "
                             "which torch.func.vmap cannot trace: use task_batching='loop' or 'auto'")
        _integer("inner_steps", self.inner_steps, 0)
        _integer("target_steps", self.target_steps, 0)
        _integer("projection_dim", self.projection_dim, 1)
        _integer("warmup_steps", self.warmup_steps, 0)
        _positive("inner_lr", self.inner_lr)
        validate.field_temperature("contrastive_temperature", self.contrastive_temperature)
        validate.field_temperature("kl_temperature", self.kl_temperature)
        _positive("outer_lr", self.outer_lr)
        _non_negative("contrastive_weight", self.contrastive_weight)
        _non_negative("task_loss_weight", self.task_loss_weight)
        _non_negative("weight_decay", self.weight_decay)
        if self.projection_hidden is not None:
            _integer("projection_hidden", self.projection_hidden, 1)
        if self.total_steps is not None:
            _integer("total_steps", self.total_steps, 1)
            if self.total_steps < self.warmup_steps:
                raise ValueError(f"total_steps ({self.total_steps}) must be >= warmup_steps ({self.warmup_steps})")
        if self.clip_grad_norm is not None:
            _positive("clip_grad_norm", self.clip_grad_norm)
        validate.field_in_interval("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.head == "shared":
            if self.ways is None:
                raise ValueError("head='shared' needs ways (the size of the meta-learned head)")
            _integer("ways", self.ways, 2)
        elif self.ways is not None:
            _integer("ways", self.ways, 2)
        if self.method == "bmssl" and self.target_steps < 1:
            raise ValueError("method='bmssl' needs target_steps >= 1: with δ = 0 the target w_{L+δ} "
                             "is w_L itself and the KL is 0")
        if self.inner_steps == 0 and self.head == "zero":
            # w_L is θ with a zero head: its logits are 0 for every θ, so the KL and the cross-entropy
            # are constant; only the NT-Xent on θ's features (bmssl: times task_loss_weight) can learn
            learns = self.contrastive_weight > 0 and (self.method != "bmssl" or self.task_loss_weight > 0)
            if self.method in ("bmssl", "metassl") and not learns:
                needs = ("task_loss_weight > 0 and contrastive_weight > 0" if self.method == "bmssl"
                         else "contrastive_weight > 0")
                raise ValueError(f"method='{self.method}' with inner_steps=0 and the zero head has a zero "
                                 "meta-gradient: w_L is θ with a zero head, whose logits are 0 for every θ; "
                                 f"use inner_steps >= 1, head='shared' or {needs}")
        if self.method == "simclr" and self.contrastive_weight == 0:
            raise ValueError("method='simclr' is the NT-Xent alone (times contrastive_weight): a weight of 0 "
                             "leaves nothing to train")
        if self.seed is not None:
            _integer("seed", self.seed, 0)


_choice = validate.field_choice
_integer = validate.field_integer
_positive = validate.field_positive
_non_negative = validate.field_non_negative


# ---------------------------------------------------------------------------------------------
# Task batches


class TaskShape(NamedTuple):
    """What the engine reads off a task batch (after check_task_batch)."""

    tasks: int      # K
    ways: int       # W
    shots: int      # M1, support views per image
    queries: int    # M2, query views per image


def check_task_batch(batch) -> TaskShape:
    """A TaskBatch (bmssl.tasks) or anything with its four fields: support [K, W·M1, C, H, W],
    support_labels [K, W·M1], query [K, W·M2, C, H, W], query_labels [K, W·M2], the labels the
    same for every task, each of the W classes M1 (M2) times."""
    for field in ("support", "support_labels", "query", "query_labels"):
        if not isinstance(getattr(batch, field, None), torch.Tensor):
            raise ValueError(f"a task batch needs a tensor field {field!r} (TaskBatch layout)")
    support, query = batch.support, batch.query
    if support.dim() != 5 or query.dim() != 5:
        raise ValueError(f"support and query must be [K, n, C, H, W], got {tuple(support.shape)} "
                         f"and {tuple(query.shape)}")
    if support.shape[0] != query.shape[0] or support.shape[2:] != query.shape[2:]:
        raise ValueError(f"support {tuple(support.shape)} and query {tuple(query.shape)} must share "
                         "K and the image shape")
    counts = {}
    for name, images in (("support", support), ("query", query)):
        labels = getattr(batch, f"{name}_labels")
        if labels.shape != images.shape[:2]:
            raise ValueError(f"{name}_labels {tuple(labels.shape)} must be [K, n] = {tuple(images.shape[:2])}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{name}_labels must be integers, got {labels.dtype}")
        if not bool((labels == labels[:1]).all()):
            raise ValueError(f"every task must have the same {name}_labels (the TaskBatch layout "
                             "arange(W).repeat_interleave(M)); the engine shares them across tasks")
        per_class = torch.bincount(labels[0].long().clamp(min=0))
        if int(labels.min()) < 0 or per_class.numel() < 2 or bool((per_class != per_class[0]).any()):
            raise ValueError(f"{name}_labels must hold each of W >= 2 classes 0..W-1 equally often, "
                             f"got counts {per_class.tolist()}")
        counts[name] = per_class
    if counts["support"].numel() != counts["query"].numel():
        raise ValueError(f"support has {counts['support'].numel()} classes but query has {counts['query'].numel()}")
    return TaskShape(support.shape[0], counts["support"].numel(), int(counts["support"][0]), int(counts["query"][0]))


class ViewPlan(NamedTuple):
    """Which views each loss sees (resolved from the config and M1, M2 outside vmap)."""

    ways: int
    inner_uses_query: bool    # inner NT-Xent over support + query views
    outer_uses_support: bool  # metassl outer NT-Xent over query + support views


def plan_views(config: MetaConfig, shape: TaskShape) -> ViewPlan:
    contrastive = config.contrastive_weight > 0
    if contrastive and config.contrastive_views == "support" and shape.shots < 2:
        raise ValueError(f"contrastive_views='support' with M1={shape.shots} support view per image: the "
                         "inner NT-Xent has no positives; use 'auto' or 'all', or contrastive_weight=0")
    inner_uses_query = contrastive and (config.contrastive_views == "all"
                                        or (config.contrastive_views == "auto" and shape.shots < 2))
    outer_uses_support = contrastive and shape.queries < 2
    return ViewPlan(shape.ways, inner_uses_query, outer_uses_support)


# ---------------------------------------------------------------------------------------------
# The functional pieces: one task, parameters as dicts


def task_loss(model: FewShotModel, params: dict, views, labels, config: MetaConfig, extra_views=None,
              extra_labels=None):
    """l(w; D) = CE(f_w(views), labels) + λ NTXent(g_w(views ∪ extra_views), labels ∪ extra_labels).
    The extra views enter the NT-Xent only. Returns (loss, logits of `views`)."""
    images = views if extra_views is None else torch.cat([views, extra_views])
    features = model.features(params, images)
    logits = model.logits(params, features[: views.shape[0]])
    loss = F.cross_entropy(logits, labels)
    if config.contrastive_weight > 0:
        z_labels = labels if extra_labels is None else torch.cat([labels, extra_labels])
        z = model.embeddings(params, features)
        loss = loss + config.contrastive_weight * ntxent(z, z_labels, config.contrastive_temperature,
                                                         config.contrastive_variant)
    return loss, logits


def detached(params: dict) -> dict:
    return {name: value.detach() for name, value in params.items()}


def adapt(params: dict, loss_fn, steps: int, lr: float, create_graph: bool, checkpoint: bool = False):
    """SGD: w_{l+1} = w_l − lr ∇ loss_fn(w_l) for l < steps. create_graph=False detaches each
    gradient (the step is then linear in w_l with slope 1). checkpoint (with create_graph): each
    step runs under torch.utils.checkpoint, so the backward recomputes it instead of keeping its
    activations (memory flat in the number of steps, at about one more step's compute each).
    Returns w_steps and the losses [loss(w_0), ..., loss(w_{steps-1})] (detached)."""
    grad_and_loss = torch.func.grad_and_value(loss_fn) if inside_functorch() else _autograd_grad_and_loss(loss_fn)
    losses = []
    for _ in range(steps):
        if create_graph and checkpoint:
            params, loss = checkpointed_step(params, loss_fn, lr)
        else:
            grads, loss = grad_and_loss(params if create_graph else detached(params))
            params = sgd_unroll_step(params, grads, lr)  # every tensor in one fused op
        losses.append(loss.detach())
    return params, losses


def inside_functorch() -> bool:
    """Whether a torch.func transform (vmap over tasks, grad) is active around this call."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _autograd_grad_and_loss(loss_fn):
    """torch.func.grad_and_value(loss_fn) in plain autograd, for the loop over tasks: the same
    gradient (differentiable when the weights carry a graph), without functorch's wrapper around
    every op, which also swaps torch's fused GroupNorm backward for a composite one."""

    def grad_and_loss(params):
        # differentiable gradients when the weights carry a graph to θ, as torch.func.grad's are
        differentiable = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
        with torch.enable_grad():
            # a weight with no graph (the zero head of w_0, or every weight of a graph-free
            # step) is a leaf here, so that autograd can differentiate it
            weights = {n: v if v.requires_grad else v.detach().requires_grad_() for n, v in params.items()}
            loss = loss_fn(weights)
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=differentiable,
                                        allow_unused=True, materialize_grads=True)  # unused: 0, as torch.func
        return dict(zip(weights, grads)), (loss if differentiable else loss.detach())

    return grad_and_loss


def checkpointed_step(params: dict, loss_fn, lr: float):
    """One differentiable inner step, w − lr ∇ loss_fn(w), under torch.utils.checkpoint
    (non-reentrant): only w is kept; the outer backward reruns the step, gradient included, to
    differentiate it. Plain autograd inside (torch.func transforms do not nest in checkpoint).
    Returns (the new weights, the loss at w)."""
    names = list(params)

    def step(*values):
        # the zero head of w_0 is a constant: a leaf here, so that the step can differentiate it
        weights = {n: v if v.requires_grad else v.detach().requires_grad_() for n, v in zip(names, values)}
        loss = loss_fn(weights)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True,
                                    allow_unused=True, materialize_grads=True)  # unused (λ = 0: the projection): 0
        updated = sgd_unroll_step(weights, dict(zip(names, grads)), lr)
        return (*(updated[n] for n in names), loss)

    *values, loss = torch.utils.checkpoint.checkpoint(step, *params.values(), use_reentrant=False)
    return dict(zip(names, values)), loss


def inner_loss_fn(model, support, support_labels, query, query_labels, config, plan):
    """The support loss of the inner loop, as a function of w."""
    if plan.inner_uses_query:
        return lambda w: task_loss(model, w, support, support_labels, config, query, query_labels)[0]
    return lambda w: task_loss(model, w, support, support_labels, config)[0]


def bootstrap_target(model, adapted, support, support_labels, query, query_labels, config, plan,
                     return_losses=False):
    """w_{L+δ}: δ more SGD steps from stopgrad(w_L) with no graph, then detached (paper eq. 3).
    target_data="support+query" trains the δ steps on both sets (CE and NT-Xent over all views).
    return_losses: also return the δ losses (the first is the loss at w_L)."""
    if config.target_data == "support":
        loss_fn = inner_loss_fn(model, support, support_labels, query, query_labels, config, plan)
    else:
        views, labels = torch.cat([support, query]), torch.cat([support_labels, query_labels])
        loss_fn = lambda w: task_loss(model, w, views, labels, config)[0]  # noqa: E731
    target, losses = adapt(detached(adapted), loss_fn, config.target_steps, config.inner_lr, create_graph=False)
    return (detached(target), losses) if return_losses else detached(target)


def outer_objective(model, adapted, support, support_labels, query, query_labels, config, plan, target=None):
    """The outer loss of w_L = `adapted` on the query views. bmssl: KL(π_target ‖ π_{w_L}), with
    the target w_{L+δ} computed from stopgrad(w_L) unless given, plus task_loss_weight × the
    metassl loss; metassl: l(w_L; query). Returns (loss, query logits of w_L).

    task_loss_weight > 0 is bmssl's remedy for collapse: on real Omniglot the KL alone is
    minimised by shrinking the features until the δ target steps change nothing (README,
    "Results"); the task loss, the meta-objective Bootstrapped Meta-Learning pairs with its
    matching term, keeps them informative."""
    extra = (support, support_labels) if plan.outer_uses_support else (None, None)
    if config.method == "bmssl":
        features = model.features(adapted, query)
        logits = model.logits(adapted, features)
        if target is None:
            target = bootstrap_target(model, adapted, support, support_labels, query, query_labels, config, plan)
        target_logits = model.logits(target, model.features(target, query)).detach()
        loss = kl_bootstrap(logits, target_logits, config.kl_temperature)
        if config.task_loss_weight > 0:
            loss = loss + config.task_loss_weight * task_loss(model, adapted, query, query_labels, config, *extra)[0]
        return loss, logits
    return task_loss(model, adapted, query, query_labels, config, *extra)


def adapt_to_task(model, theta, support, support_labels, query, query_labels, config, plan, final_loss=True):
    """The inner loop of one task: w_L from w_0 = task_parameters(θ). Returns (w_L, the
    support losses at w_0 and at w_L, detached). final_loss=False skips the forward pass that
    the loss at w_L costs (None is returned for it, and for w_0 when L = 0): the caller has it."""
    start = model.task_parameters(theta, plan.ways)
    loss_fn = inner_loss_fn(model, support, support_labels, query, query_labels, config, plan)
    adapted, losses = adapt(start, loss_fn, config.inner_steps, config.inner_lr, create_graph=config.order == 2,
                            checkpoint=config.checkpoint_inner_steps)
    final = loss_fn(detached(adapted)).detach() if final_loss else None
    return adapted, (losses[0] if losses else final, final)


def task_outer_loss(model, theta, support, support_labels, query, query_labels, config, plan, target=None):
    """One task: adapt θ on the support set (L steps), then the outer objective on the query set.
    `target` overrides w_{L+δ} (tests hold it fixed). Returns (outer loss, aux) with aux =
    (support loss at w_0, support loss at w_L, query accuracy of w_L)."""
    task = (support, support_labels, query, query_labels)
    # bmssl's first target step computes the support loss at w_L: reuse it
    reuse = config.method == "bmssl" and target is None and config.target_data == "support"
    adapted, (loss_start, loss_end) = adapt_to_task(model, theta, *task, config, plan, final_loss=not reuse)
    if reuse:
        target, target_losses = bootstrap_target(model, adapted, *task, config, plan, return_losses=True)
        loss_end = target_losses[0]
        loss_start = loss_end if loss_start is None else loss_start
    outer, logits = outer_objective(model, adapted, *task, config, plan, target)
    accuracy = (logits.detach().argmax(-1) == query_labels).to(logits.dtype).mean()
    return outer, (loss_start, loss_end, accuracy)


def batches_tasks(config: MetaConfig, device: torch.device) -> bool:
    """True: the K tasks run as one torch.func.vmap; False: a Python loop over tasks.
    task_batching="auto" takes vmap on CUDA and the loop on CPU, where vmap's grouped
    convolutions measured slower than K separate ones (bench/bench_unroll.py), and the loop
    whenever inner steps are checkpointed."""
    if config.task_batching == "auto":
        return device.type == "cuda" and not config.checkpoint_inner_steps
    return config.task_batching == "vmap"


def meta_loss(model, theta, batch, config, batched=None, shape=None):
    """mean_k outer_k(θ) over the K tasks of `batch`: torch.func.vmap over tasks (θ and the
    labels shared, in_dims=None), or a Python loop when batched=False (None: as
    config.task_batching says). Returns (loss, aux) with aux the per-task means of
    task_outer_loss's aux. shape: the batch's TaskShape, when check_task_batch has already
    read it (the check reads label values, which a CUDA graph capture cannot)."""
    plan = plan_views(config, shape if shape is not None else check_task_batch(batch))
    if batched is None:
        batched = batches_tasks(config, batch.support.device)
    if batched and config.checkpoint_inner_steps:
        raise ValueError("checkpoint_inner_steps needs the loop over tasks (batched=False): torch.func.vmap "
                         "cannot trace torch.utils.checkpoint")
    support_labels, query_labels = batch.support_labels[0], batch.query_labels[0]

    def one_task(theta, support, query):
        return task_outer_loss(model, theta, support, support_labels, query, query_labels, config, plan)

    if batched:
        losses, aux = torch.func.vmap(one_task, in_dims=(None, 0, 0))(theta, batch.support, batch.query)
    else:
        results = [one_task(theta, batch.support[k], batch.query[k]) for k in range(batch.support.shape[0])]
        losses = torch.stack([loss for loss, _ in results])
        aux = tuple(torch.stack(column) for column in zip(*(aux for _, aux in results)))
    return losses.mean(), tuple(a.mean() for a in aux)


def simclr_loss(model, theta, batch, config, ntxent_fn=None, ways=None):
    """λ · NT-Xent over all M = M1 + M2 views of every image of the batch (K·W images; the views
    of image j of task k are positives), no meta level. `ntxent_fn(z, labels, temperature,
    variant)` replaces bmssl.ntxent (torchrun passes one whose negatives span every rank)."""
    support, query = batch.support, batch.query
    tasks = support.shape[0]
    ways = ways if ways is not None else batch.support_labels[0].max().item() + 1
    images = torch.cat([support, query], dim=1).flatten(0, 1)
    offsets = torch.arange(tasks, device=support.device)[:, None] * ways
    labels = torch.cat([batch.support_labels + offsets, batch.query_labels + offsets], dim=1).flatten()
    z = model.embeddings(theta, model.features(theta, images))
    loss = (ntxent_fn or ntxent)(z, labels.long(), config.contrastive_temperature, config.contrastive_variant)
    return config.contrastive_weight * loss


AUX_NAMES = ("inner_loss_start", "inner_loss", "query_accuracy")


def meta_gradient(model, theta, batch, config, batched=None, simclr_ntxent=None):
    """∇_θ of the method's outer loss. Returns (grads dict, loss, aux dict of floats).
    simclr_ntxent: simclr_loss's ntxent_fn.

    The outer gradient is plain reverse-mode autograd over θ (leaf tensors), around the
    functorch transforms inside (vmap over tasks, torch.func.grad per inner step). Its backward
    builds no graph of its own, so the ops need second derivatives only, never third."""
    grads, loss, aux = meta_gradient_tensors(model, theta, batch, config, batched, simclr_ntxent)
    return grads, loss, {name: value.item() for name, value in aux.items()}


def meta_gradient_tensors(model, theta, batch, config, batched=None, simclr_ntxent=None, shape=None):
    """meta_gradient with aux as 0-dim tensors: nothing here reads a tensor's value when
    `shape` (the batch's TaskShape, from check_task_batch) is given, so a CUDA graph can capture
    it (bmssl.cuda_graph)."""
    leaves = {name: value.detach().requires_grad_() for name, value in theta.items()}
    with torch.enable_grad():
        if config.method == "simclr":
            if shape is None:
                check_task_batch(batch)
            ways = shape.ways if shape is not None else None
            loss, aux = simclr_loss(model, leaves, batch, config, simclr_ntxent, ways), {}
        else:
            loss, aux = meta_loss(model, leaves, batch, config, batched, shape)
            aux = dict(zip(AUX_NAMES, (a.detach() for a in aux)))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {name: torch.zeros_like(value) if grad is None else grad
             for (name, value), grad in zip(leaves.items(), grads)}
    return grads, loss.detach(), aux


# ---------------------------------------------------------------------------------------------
# The learner: θ, Adam, the schedule


def lr_factor(config: MetaConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 to min_lr_ratio at total_steps
    (constant when schedule="constant" or total_steps is None)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant" or config.total_steps is None:
        return 1.0
    span = max(config.total_steps - config.warmup_steps, 1)
    progress = min(step - config.warmup_steps, span) / span
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MetaLearner:
    """θ = backbone + projection head (+ shared head), trained by `config.method`.

        learner = MetaLearner(MetaConfig(method="bmssl"), build_backbone("conv4", (1, 28, 28)))
        metrics = learner.step(task_batch)   # outer_loss, inner_loss, query_accuracy, grad_norm, lr, time

    Two hooks for data-parallel training (bmssl.training sets them under torchrun), None by default:
    gradient_hook(grads, loss, aux) -> (grads, loss, aux) runs on the meta-gradient before the
    finiteness checks, clipping and the Adam step (e.g. averaging them over ranks);
    simclr_ntxent is simclr_loss's ntxent_fn.
    """

    def __init__(self, config: MetaConfig, backbone: nn.Module):
        if not isinstance(config, MetaConfig):
            raise ValueError(f"config must be a MetaConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            if config.seed is not None:
                torch.manual_seed(config.seed)
            self.model = FewShotModel(backbone, config.projection_dim, config.projection_hidden,
                                      config.head, config.ways)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.outer_lr,
                                          weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(config, step))
        self.steps_done = 0
        self.gradient_hook = None
        self.simclr_ntxent = None
        self._captured = None  # config.cuda_graph: the CapturedMetaGradient of the last capture

    @property
    def theta(self) -> dict:
        """θ, the meta-parameters by name (the live tensors)."""
        return self.model.meta_parameters()

    def _prepare(self, batch):
        """The batch's tensors on the model's device, images in its dtype."""
        check_task_batch(batch)
        reference = next(self.model.parameters())
        fields = {name: getattr(batch, name) for name in ("support", "support_labels", "query", "query_labels")}
        for name in ("support", "query"):
            fields[name] = fields[name].to(device=reference.device, dtype=reference.dtype)
        for name in ("support_labels", "query_labels"):
            fields[name] = fields[name].to(device=reference.device, dtype=torch.long)
        return _Batch(**fields)

    def meta_gradient(self, batch, batched=None):
        """(grads, loss, aux) at the current θ, without updating anything. With config.cuda_graph
        the step is captured on first use (and again when the batch's shapes or task layout
        change) and replayed."""
        theta, batch = detached(self.model.meta_parameters()), self._prepare(batch)
        if not self.config.cuda_graph:
            return meta_gradient(self.model, theta, batch, self.config, batched, self.simclr_ntxent)
        if self.simclr_ntxent is not None:
            raise ValueError("cuda_graph does not capture the all-gather of the distributed NT-Xent "
                             "(simclr under torchrun): run it without cuda_graph")
        from bmssl.cuda_graph import CapturedMetaGradient

        if self._captured is None or not self._captured.replays(batch):
            self._captured = None  # free the old graph's memory before capturing the new one
            self._captured = CapturedMetaGradient(self.model, theta, batch, self.config, batched)
        grads, loss, aux = self._captured(theta, batch)
        return grads, loss, {name: value.item() for name, value in aux.items()}

    def step(self, batch) -> dict:
        """One outer step on a task batch. Returns floats: outer_loss, grad_norm, lr, time, step,
        and for bmssl/metassl inner_loss_start and inner_loss (the support loss at w_0 and at
        w_L) and query_accuracy (of w_L), all means over tasks."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.config.method == "scratch":
            check_task_batch(batch)
            self.steps_done += 1
            return {"step": self.steps_done, "lr": 0.0, "time": time.perf_counter() - start}
        grads, loss, aux = self.meta_gradient(batch)
        if self.gradient_hook is not None:
            grads, loss, aux = self.gradient_hook(grads, loss, aux)
        loss_value = loss.item()
        where = f"{self.config.method} outer step {self.steps_done + 1}"
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{where}: the outer loss is {loss_value}")
        parameters = dict(self.model.named_parameters())
        for name, grad in grads.items():
            parameters[name].grad = grad
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else math.inf
        theta = list(parameters.values())
        grad_norm = torch.nn.utils.clip_grad_norm_(theta, max_norm).item()
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"{where}: the meta-gradient norm is {grad_norm}")
        try:
            self.optimizer.step()
        except RuntimeError as error:  # an lr so large that Adam's step size overflows the dtype
            if "overflow" not in str(error):
                raise
            raise FloatingPointError(f"{where}: Adam's update overflowed ({error}); lower outer_lr") from None
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.stack(torch._foreach_norm(theta)).isfinite().all():  # fused norms, one host sync
            raise FloatingPointError(f"{where}: θ is not finite after the Adam update; lower outer_lr")
        self.scheduler.step()
        self.steps_done += 1
        return {"step": self.steps_done, "outer_loss": loss_value, **aux, "grad_norm": grad_norm, "lr": lr,
                "time": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "steps_done": self.steps_done,
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        """Restore θ, Adam's moments, the schedule and the step count. The saved config must
        equal this learner's (the fields that differ are named), but for the EXECUTION_FIELDS,
        which change how the maths runs, not what it computes."""
        saved = state.get("config", {})
        differing = [field.name for field in dataclasses.fields(self.config)
                     if field.name not in EXECUTION_FIELDS and saved.get(field.name) != getattr(self.config, field.name)]
        if differing:
            raise ValueError(f"the state was saved with a different config: {', '.join(differing)} differ")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])


class _Batch(NamedTuple):
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
