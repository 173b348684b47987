"""Few-shot evaluation on labelled held-out data (DESIGN.md §1, "Evaluation").

An episode: W classes never trained on, S labelled support images and Q = 15 query images per
class, in the TaskBatch layout (support labels arange(W).repeat_interleave(S)).

    proto     φ = backbone_θ(x) frozen, c_k = mean_{support of k} φ/‖φ‖,
              ŷ(q) = argmax_k cos(φ(q), c_k)                                  (PsCo's protocol)
    finetune  w_0 = θ + zero W-way head, w_{l+1} = w_l − α ∇ CE(f_{w_l}(support), y) for l < L
              (the engine's inner loop, no graph), ŷ(q) = argmax f_{w_L}(q)   (MAML's protocol)

Each episode gives an accuracy a_e; the result is mean(a) ± 1.96 · std(a) / √E, with the
population std (ddof=0) as in the usual few-shot evaluation code. Episodes are drawn from a
seeded numpy Generator and evaluated `batch_episodes` at a time (torch.func.vmap over episodes,
so batch statistics, if the backbone uses them, stay per episode). Both protocols run the support
and the query through the backbone in separate calls: with batch statistics, the prototypes never
depend on the query images. Non-finite scores, or scores tied across the classes for every query
of an episode (collapsed features: the argmax picks class 0, exact chance), raise instead of
reporting an accuracy.
"""
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from bmssl.meta import adapt, detached
from bmssl.models import FewShotModel
from bmssl.progress import progress

PROTOCOLS = ("proto", "finetune")


class Episodes(NamedTuple):
    """E episodes in the TaskBatch layout: support [E, W·S, C, H, W], support_labels [E, W·S],
    query [E, W·Q, C, H, W], query_labels [E, W·Q]."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


class EpisodeSampler:
    """Draws W-way S-shot episodes with Q queries per class from (images, labels), seeded.
    Only classes with at least S + Q images take part (a warning names the others, kept in
    `left_out`); within an episode, support and query images are distinct."""

    def __init__(self, labels, ways: int, shots: int, queries: int = 15, seed: int = 0):
        for name, value, minimum in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        ways, shots, queries = int(ways), int(shots), int(queries)
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape}, "
                             f"dtype {labels.dtype}")
        per_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self.class_indices = [idx for _, idx in sorted(per_class.items()) if idx.size >= shots + queries]
        self.left_out = sorted(c for c, idx in per_class.items() if idx.size < shots + queries)
        if self.left_out and len(self.class_indices) >= ways:
            warnings.warn(f"{len(self.left_out)} of {len(per_class)} classes have fewer than {shots + queries} images "
                          f"({shots} shots + {queries} queries) and take no part in {ways}-way {shots}-shot "
                          f"episodes (class ids {self.left_out[:5]}{'...' if len(self.left_out) > 5 else ''}); "
                          "the accuracy is over the other classes alone", stacklevel=2)
        if len(self.class_indices) < ways:
            raise ValueError(f"{ways}-way episodes with {shots} shots + {queries} queries need {ways} classes "
                             f"with >= {shots + queries} images each; only {len(self.class_indices)} of "
                             f"{len(per_class)} classes have that many")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rng = np.random.default_rng(seed)

    def indices(self, count: int):
        """(support [count, W·S], query [count, W·Q]) indices into the image array, class-major."""
        support, query = [], []
        for _ in range(count):
            classes = self.rng.choice(len(self.class_indices), self.ways, replace=False)
            picks = np.stack([self.rng.choice(self.class_indices[c], self.shots + self.queries, replace=False)
                              for c in classes])
            support.append(picks[:, : self.shots].reshape(-1))
            query.append(picks[:, self.shots:].reshape(-1))
        return torch.from_numpy(np.stack(support)), torch.from_numpy(np.stack(query))

    def sample(self, images: torch.Tensor, count: int) -> Episodes:
        support_idx, query_idx = self.indices(count)
        support_labels = torch.arange(self.ways).repeat_interleave(self.shots).expand(count, -1)
        query_labels = torch.arange(self.ways).repeat_interleave(self.queries).expand(count, -1)
        return Episodes(images[support_idx], support_labels, images[query_idx], query_labels)


@dataclass
class EvalResult:
    """Mean accuracy ± its 95% half-width over episodes (fractions in [0, 1])."""

    mean: float
    ci95: float
    accuracies: np.ndarray
    protocol: str
    ways: int
    shots: int

    def __str__(self):
        return (f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f} % ({self.ways}-way {self.shots}-shot, "
                f"{self.protocol}, {self.accuracies.size} episodes)")


def confidence_interval(accuracies) -> float:
    """Half-width 1.96 · std / √E of the 95% interval of the mean (population std)."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    if accuracies.size == 0:
        raise ValueError("no episodes: the confidence interval needs at least one accuracy")
    return float(1.96 * accuracies.std() / math.sqrt(accuracies.size))


def proto_accuracy(model: FewShotModel, params: dict, episodes: Episodes, ways: int) -> torch.Tensor:
    """Per-episode accuracy [E] of cosine-to-prototype classification on frozen features."""
    support_count = episodes.support.shape[1]

    def one_episode(support, query):
        # two calls: with batch statistics, one call over support + query let the query images move
        # the prototypes (a review measured 0.53 against 0.51 on one 5-way 1-shot episode)
        support_features = F.normalize(model.features(params, support), dim=-1)
        query_features = F.normalize(model.features(params, query), dim=-1)
        prototypes = support_features.reshape(ways, support_count // ways, -1).mean(1)
        cosine = query_features @ F.normalize(prototypes, dim=-1).T
        return cosine.argmax(-1), _score_flags(cosine)

    predictions, flags = torch.func.vmap(one_episode)(episodes.support, episodes.query)
    _check_scores(flags, predictions, "proto: the features of θ", "check θ (the checkpoint) for NaN or Inf values")
    return (predictions == episodes.query_labels).double().mean(1)


def _score_flags(scores: torch.Tensor) -> torch.Tensor:
    """[finite, tied]: every score finite; every query's scores equal across the classes."""
    finite = torch.isfinite(scores).all()
    tied = (scores.amax(-1) == scores.amin(-1)).all()
    return torch.stack([finite, tied])


def _check_scores(flags: torch.Tensor, predictions: torch.Tensor, what: str, hint: str) -> None:
    """An argmax over NaN or all-equal scores picks class 0, which reads as chance accuracy: fail
    instead. flags [E, 2] from _score_flags; predictions [E, W·Q]. Collapsed features can also
    leave rounding noise between the classes (the finetune head's gradient is 0 up to rounding):
    one predicted class for every query of every episode is refused too."""
    episodes = flags.shape[0]
    bad = int((~flags[:, 0]).sum())
    if bad:
        raise FloatingPointError(f"{what} are not finite (NaN or Inf) in {bad} of {episodes} episodes, "
                                 f"so the accuracy would be meaningless; {hint}")
    tied = int(flags[:, 1].sum())
    one_class = bool((predictions == predictions[:, :1]).all()) and predictions.shape[1] > 1
    if tied or one_class:
        found = (f"give every query the same score for every class in {tied} of {episodes} episodes" if tied
                 else f"predict one class for every query of all {episodes} episodes")
        raise ValueError(f"{what} {found} (collapsed features: the same vector for every image?), so the "
                         "accuracy would be exact chance; the model has collapsed")


def finetune_accuracy(model: FewShotModel, params: dict, episodes: Episodes, ways: int, steps: int,
                      lr: float) -> torch.Tensor:
    """Per-episode accuracy [E] after `steps` SGD steps on the support cross-entropy from θ with a
    zero-initialised head (the inner loop, without a graph)."""
    support_labels = episodes.support_labels[0]

    def one_episode(support, query):
        loss_fn = lambda w: F.cross_entropy(model.logits(w, model.features(w, support)), support_labels)  # noqa: E731
        adapted, _ = adapt(model.task_parameters(params, ways), loss_fn, steps, lr, create_graph=False)
        logits = model.logits(adapted, model.features(adapted, query))
        return logits.argmax(-1), _score_flags(logits)

    predictions, flags = torch.func.vmap(one_episode)(episodes.support, episodes.query)
    _check_scores(flags, predictions, f"finetune: the query logits after {steps} SGD steps at lr {lr:g}",
                  "lower the finetune learning rate")
    return (predictions == episodes.query_labels).double().mean(1)


def evaluate(model, images: torch.Tensor, labels, protocol: str = "proto", ways: int = 5, shots: int = 1,
             queries: int = 15, episodes: int = 600, seed: int = 0, batch_episodes: int = 16,
             inner_steps: int | None = None, inner_lr: float | None = None, show_progress: bool = True) -> EvalResult:
    """Few-shot accuracy of `model` (a MetaLearner or a FewShotModel) on images [n, C, H, W] in
    [0, 1] with int labels [n]. finetune uses inner_steps / inner_lr (default: the learner's
    config, else 5 and 0.1)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {protocol!r}")
    config = getattr(model, "config", None)
    network = getattr(model, "model", model)
    if not isinstance(network, FewShotModel):
        raise ValueError(f"evaluate takes a MetaLearner or a FewShotModel, got {type(model).__name__}")
    steps = inner_steps if inner_steps is not None else (config.inner_steps if config else 5)
    lr = inner_lr if inner_lr is not None else (config.inner_lr if config else 0.1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"inner_steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"inner_lr must be a finite number > 0, got {lr!r}")
    if protocol == "finetune" and steps == 0 and network.head_kind == "zero":
        raise ValueError("finetune with 0 SGD steps from the zero head predicts class 0 for every query "
                         "(exact chance): use inner_steps >= 1 (or the proto protocol)")
    for name, value in (("episodes", episodes), ("batch_episodes", batch_episodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a float [n, C, H, W] tensor in [0, 1], got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")

    sampler = EpisodeSampler(labels, ways, shots, queries, seed)
    reference = next(network.parameters())
    params = detached(network.meta_parameters())
    chunks = [min(batch_episodes, episodes - start) for start in range(0, episodes, batch_episodes)]
    accuracies = []
    for count in progress(chunks, desc=f"{protocol} {ways}-way {shots}-shot", total=len(chunks),
                          disable=not show_progress):
        batch = sampler.sample(images, count)
        batch = Episodes(batch.support.to(reference.device, reference.dtype), batch.support_labels.to(reference.device),
                         batch.query.to(reference.device, reference.dtype), batch.query_labels.to(reference.device))
        with torch.no_grad():
            if protocol == "proto":
                accuracy = proto_accuracy(network, params, batch, ways)
            else:
                accuracy = finetune_accuracy(network, params, batch, ways, steps, lr)
        accuracies.append(accuracy.cpu())
    accuracies = torch.cat(accuracies).numpy()
    return EvalResult(float(accuracies.mean()), confidence_interval(accuracies), accuracies, protocol, ways, shots)
