"""Few-shot results table of scratch / SimCLR / MetaSSL / BMSSL under one training budget, plus
the drift probes of the BMSSL objective (paper eq. 3), through the bmssl Python API.

    python bench/omniglot_table.py                       # Omniglot small split -> bench/results/omniglot/
    python bench/omniglot_table.py --dataset glyphs --steps 150 --episodes 600
    python bench/omniglot_table.py --table-only          # rebuild table.md from the JSONs

table.md presents one budget: it is written only when the records in --out agree on it (the data,
evaluation, budget and every MetaConfig field but method and target_data); otherwise the script
names the fields that differ and exits with status 1, as --table-only does without records.

Data. omniglot: unlabelled training on every image of images_background_small1 (5 alphabets);
few-shot tests on the alphabets only in images_background_small2 (Japanese_(katakana), Sanskrit,
Tagalog). glyphs: the embedded default set, split_by_group((0.8, 0.2), seed=0).

Budget. Every trained method sees the same task batches (one seeded generator, same order):
S outer steps of N = K·W pool images with M1 + M2 augmented views each (AugmentConfig.omniglot()),
same backbone initialisation, same Adam / warm-up / cosine schedule. scratch trains nothing.

Methods. scratch, simclr, metassl, bmssl: the engine's MetaConfig with only `method` changed.
bmssl_task (opt-in remedy, not the engine's default): outer = KL(π_{w_{L+δ}} ‖ π_{w_L}) +
task_weight · l(w_L; query), i.e. BMSSL's bootstrapped KL plus the MetaSSL query loss of the
same w_L (Flennerhag et al. 2021 combine the bootstrapped matching loss with the task loss).
bmssl_sq: the engine's bmssl with MetaConfig(target_data="support+query"): the δ target steps
also train on the query views, so the target knows data that w_L has not seen.

Evaluation (bmssl.eval semantics, exact, on cached features). Episodes come from
bmssl.eval.EpisodeSampler with one seed, so every method is scored on the same episodes (and
paired differences are reported). GroupNorm is per sample, so the frozen-backbone features of an
image do not depend on its episode: proto is computed from one forward pass over the test set.
finetune with 1 step from the zero head is exact on the same features too: at w_0 the head is 0,
so ∂CE/∂features = 0 and the first SGD step changes only the head (the backbone is untouched);
ŷ(q) = argmax_k φ(q)·W_1[k] + b_1[k]. `--verify N` checks both against bmssl.eval.evaluate on N
episodes. With --eval-finetune-steps > 1 the engine's evaluate is called (slow on CPU).

Drift probes (every --probe-every steps): features of the whole test set under θ: mean per-dim
std of the raw and of the L2-normalised features, the effective rank exp(H(σ/Σσ)) of the centred
features (Roy & Vetterli 2007), and proto 5-way 1-shot accuracy on 200 fixed episodes; plus the
per-step outer loss and query accuracy of w_L from the learner.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bmssl
from bmssl.augment import AugmentConfig
from bmssl.bench.common import commit
from bmssl.eval import EpisodeSampler, confidence_interval, evaluate
from bmssl.meta import (MetaConfig, MetaLearner, check_task_batch, detached, outer_objective, plan_views,
                        task_loss, adapt_to_task)
from bmssl.models import build_backbone
from bmssl.progress import progress
from bmssl.tasks import make_tasks

REPO = Path(__file__).resolve().parents[1]
METHODS = ("scratch", "simclr", "metassl", "bmssl", "bmssl_sq", "bmssl_task")
DEFAULT_METHODS = METHODS
SETTINGS = ((5, 1), (5, 5), (20, 1))
PROTOCOLS = ("proto", "finetune")
LABELS = {"scratch": "scratch (random init)", "simclr": "SimCLR", "metassl": "MetaSSL",
          "bmssl": "BMSSL (engine default)",
          "bmssl_sq": "BMSSL, target steps on support + query (target_data option)", "bmssl_task": "BMSSL + task loss (remedy, opt-in)"}


# ---------------------------------------------------------------------------------------------
# Data


def load_data(dataset: str, max_test_classes: int | None = None):
    """(train pool float [P, 1, 28, 28], test images float [n, 1, 28, 28], test labels, description).
    max_test_classes keeps the first classes of the test set only (for smoke tests)."""
    from bmssl import data
    if dataset == "omniglot":
        background, evaluation = data.load_omniglot_small_split(image_size=28)
    elif dataset == "glyphs":
        background, evaluation = data.load_glyphs().split_by_group((0.8, 0.2), seed=0)
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    if max_test_classes is not None:
        evaluation = evaluation.select_classes(list(range(min(max_test_classes, evaluation.num_classes))))
    description = {"train": background.summary(), "test": evaluation.summary(),
                   "train_groups": background.groups, "test_groups": evaluation.groups}
    return background.float(), evaluation.float(), evaluation.labels.clone(), description


# ---------------------------------------------------------------------------------------------
# The remedy: KL + task loss of w_L (opt-in, lives here, not in the engine)


class CombinedLearner(MetaLearner):
    """MetaLearner whose outer loss per task is KL(π_target ‖ π_{w_L}) + task_weight · l(w_L; query)
    (config.method must be "bmssl"). Same inner loop, target, vmap over tasks as the engine."""

    def __init__(self, config: MetaConfig, backbone, task_weight: float):
        super().__init__(config, backbone)
        self.task_weight = float(task_weight)

    def meta_gradient(self, batch, batched=True):
        config, model = self.config, self.model
        batch = self._prepare(batch)
        plan = plan_views(config, check_task_batch(batch))
        metassl = replace(config, method="metassl")
        support_labels, query_labels = batch.support_labels[0], batch.query_labels[0]
        extra = (support_labels,) if plan.outer_uses_support else None

        def one_task(theta, support, query):
            task = (support, support_labels, query, query_labels)
            adapted, (start, end) = adapt_to_task(model, theta, *task, config, plan)
            kl, logits = outer_objective(model, adapted, *task, config, plan)
            extra_args = (support, support_labels) if extra is not None else (None, None)
            query_loss, _ = task_loss(model, adapted, query, query_labels, metassl, *extra_args)
            accuracy = (logits.detach().argmax(-1) == query_labels).to(logits.dtype).mean()
            return kl + self.task_weight * query_loss, (start, end, accuracy, kl.detach(), query_loss.detach())

        theta = {name: value.detach().requires_grad_() for name, value in detached(model.meta_parameters()).items()}
        with torch.enable_grad():
            losses, aux = torch.func.vmap(one_task, in_dims=(None, 0, 0))(theta, batch.support, batch.query)
            loss = losses.mean()
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        grads = {name: torch.zeros_like(value) if grad is None else grad
                 for (name, value), grad in zip(theta.items(), grads)}
        names = ("inner_loss_start", "inner_loss", "query_accuracy", "kl", "task_loss")
        return grads, loss.detach(), {n: a.mean().item() for n, a in zip(names, aux)}


def make_learner(method: str, args):
    config = MetaConfig(method="bmssl" if method.startswith("bmssl") else method, inner_steps=args.inner_steps,
                        target_data="support+query" if method == "bmssl_sq" else "support",
                        inner_lr=args.inner_lr, target_steps=args.target_steps, order=args.order,
                        outer_lr=args.outer_lr, warmup_steps=min(args.warmup_steps, args.steps), total_steps=max(args.steps, 1),
                        clip_grad_norm=args.clip_grad_norm, seed=args.seed)
    backbone = build_backbone("conv4", image_shape=(1, 28, 28), seed=args.seed)
    if method == "bmssl_task":
        return CombinedLearner(config, backbone, args.task_weight)
    return MetaLearner(config, backbone)


# ---------------------------------------------------------------------------------------------
# Evaluation on cached features


@torch.no_grad()
def test_features(model, images, chunk: int = 512) -> torch.Tensor:
    params = detached(model.meta_parameters())
    return torch.cat([model.features(params, images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])


def proto_from_features(features, support_idx, query_idx, ways, shots):
    """bmssl.eval.proto_accuracy on precomputed features: cosine to mean normalised support."""
    normalised = F.normalize(features, dim=-1)
    support, query = normalised[support_idx], normalised[query_idx]          # [E, W·S, D], [E, W·Q, D]
    prototypes = F.normalize(support.reshape(support.shape[0], ways, shots, -1).mean(2), dim=-1)
    predictions = torch.einsum("eqd,ewd->eqw", query, prototypes).argmax(-1)
    labels = torch.arange(ways).repeat_interleave(query_idx.shape[1] // ways)
    return (predictions == labels).double().mean(1)


def finetune1_from_features(features, support_idx, query_idx, ways, shots, lr):
    """bmssl.eval.finetune_accuracy with steps=1: one SGD step on the support CE from the zero
    head; the backbone gets no gradient (∂CE/∂φ = (p − y) W_0 = 0), so only the head moves:
    W_1 = −lr ∇_W CE, b_1 = −lr ∇_b CE, computed by autograd on the cached features."""
    support, query = features[support_idx], features[query_idx]
    labels = torch.arange(ways).repeat_interleave(shots)

    def one_episode(support, query):
        head = {"w": support.new_zeros(ways, support.shape[-1]), "b": support.new_zeros(ways)}
        loss = lambda h: F.cross_entropy(F.linear(support, h["w"], h["b"]), labels)  # noqa: E731
        grads = torch.func.grad(loss)(head)
        return F.linear(query, -lr * grads["w"], -lr * grads["b"]).argmax(-1)

    predictions = torch.func.vmap(one_episode)(support, query)
    query_labels = torch.arange(ways).repeat_interleave(query_idx.shape[1] // ways)
    return (predictions == query_labels).double().mean(1)


def episode_indices(labels, ways, shots, queries, episodes, seed):
    """The episodes bmssl.eval.evaluate(seed=seed) draws (same sampler, same order)."""
    return EpisodeSampler(labels, ways, shots, queries, seed).indices(episodes)


def evaluate_all(learner, images, labels, args, show_progress=True):
    model = learner.model
    start = time.perf_counter()
    features = test_features(model, images)
    results = {}
    for ways, shots in progress(SETTINGS, desc="eval settings", disable=not show_progress):
        support_idx, query_idx = episode_indices(labels, ways, shots, args.queries, args.episodes, args.eval_seed)
        key = f"{ways}w{shots}s"
        with torch.no_grad():
            proto = proto_from_features(features, support_idx, query_idx, ways, shots).numpy()
        if args.eval_finetune_steps == 1:
            with torch.no_grad():
                finetune = finetune1_from_features(features, support_idx, query_idx, ways, shots,
                                                   args.inner_lr).numpy()
        else:
            finetune = evaluate(learner, images, labels, "finetune", ways, shots, args.queries, args.episodes,
                                args.eval_seed, inner_steps=args.eval_finetune_steps, inner_lr=args.inner_lr,
                                show_progress=show_progress).accuracies
        for protocol, accuracies in (("proto", proto), ("finetune", finetune)):
            results[f"{protocol}/{key}"] = {
                "protocol": protocol, "ways": ways, "shots": shots, "queries": args.queries,
                "episodes": int(accuracies.size), "mean": float(accuracies.mean()),
                "ci95": confidence_interval(accuracies),
                "accuracies": [round(float(a), 5) for a in accuracies]}
    return results, time.perf_counter() - start


def verify_fast_eval(learner, images, labels, args, episodes):
    """Max |fast − bmssl.eval.evaluate| per-episode accuracy over `episodes` episodes, per setting."""
    report = {}
    sub = argparse.Namespace(**{**vars(args), "episodes": episodes, "eval_finetune_steps": 1})
    fast, _ = evaluate_all(learner, images, labels, sub, show_progress=False)
    for ways, shots in SETTINGS:
        for protocol in PROTOCOLS:
            slow = evaluate(learner, images, labels, protocol, ways, shots, args.queries, episodes, args.eval_seed,
                            inner_steps=1, inner_lr=args.inner_lr, show_progress=False).accuracies
            diff = np.abs(np.asarray(fast[f"{protocol}/{ways}w{shots}s"]["accuracies"]) - slow).max()
            report[f"{protocol}/{ways}w{shots}s"] = float(diff)
    return report


# ---------------------------------------------------------------------------------------------
# Drift probes


@torch.no_grad()
def probe(learner, images, labels, probe_episodes):
    features = test_features(learner.model, images).double()
    normalised = F.normalize(features, dim=-1)
    centred = features - features.mean(0)
    singular = torch.linalg.svdvals(centred)
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    support_idx, query_idx = probe_episodes
    accuracy = proto_from_features(features.float(), support_idx, query_idx, 5, 1).mean()
    return {"step": learner.steps_done, "feature_std": features.std(0).mean().item(),
            "normalised_feature_std": normalised.std(0).mean().item(),
            "effective_rank": math.exp(entropy.item()), "feature_norm": features.norm(dim=1).mean().item(),
            "proto_5w1s_probe": accuracy.item()}


# ---------------------------------------------------------------------------------------------
# One method


def run_method(method, args, pool, images, labels, description, out_dir: Path):
    torch.manual_seed(args.seed)
    learner = make_learner(method, args)
    generator = torch.Generator().manual_seed(args.seed)   # the same task batches for every method
    augment = AugmentConfig.omniglot()
    probe_episodes = episode_indices(labels, 5, 1, args.queries, 200, args.eval_seed + 1)
    history, probes = [], [probe(learner, images, labels, probe_episodes)]
    train_time = step_time = probe_time = 0.0
    steps = 0 if method == "scratch" else args.steps
    wall_start = time.perf_counter()
    load_at_start = _load_average()
    for step in progress(range(steps), desc=f"{method} train", total=steps):
        t0 = time.perf_counter()
        batch = make_tasks(pool, args.tasks * args.ways, args.tasks, args.support_views, args.query_views,
                           augment, generator)
        metrics = learner.step(batch)
        train_time += time.perf_counter() - t0
        step_time += metrics["time"]
        history.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        if (step + 1) % args.probe_every == 0 or step + 1 == steps:
            t1 = time.perf_counter()
            probes.append(probe(learner, images, labels, probe_episodes))
            probe_time += time.perf_counter() - t1
            last = history[-args.probe_every:]
            summary = {k: np.mean([h[k] for h in last if k in h]) for k in ("outer_loss", "query_accuracy")
                       if any(k in h for h in last)}
            print(f"[{method}] step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
                  + f", probe {probes[-1]}", file=sys.stderr, flush=True)
    train_wall = time.perf_counter() - wall_start
    results, eval_time = evaluate_all(learner, images, labels, args)
    verification = verify_fast_eval(learner, images, labels, args, args.verify) if args.verify else None
    config = asdict(learner.config)
    record = {
        "method": method, "label": LABELS[method], "dataset": args.dataset, "data": description,
        "config": config, "task_weight": args.task_weight if method == "bmssl_task" else None,
        "budget": {"outer_steps": steps, "tasks_K": args.tasks, "ways_W": args.ways,
                   "images_per_step_N": args.tasks * args.ways, "support_views_M1": args.support_views,
                   "query_views_M2": args.query_views, "images_seen": steps * args.tasks * args.ways,
                   "views_seen": steps * args.tasks * args.ways * (args.support_views + args.query_views),
                   "augment": asdict(augment), "backbone": "conv4 (GroupNorm), 1x28x28"},
        "eval": {"settings": [f"{w}w{s}s" for w, s in SETTINGS], "queries": args.queries,
                 "episodes": args.episodes, "seed": args.eval_seed,
                 "finetune_steps": args.eval_finetune_steps, "finetune_lr": args.inner_lr,
                 "method": "cached features (exact for proto and 1-step finetune); see module docstring",
                 "verification_max_abs_diff_vs_bmssl_eval": verification},
        "results": results,
        "throughput": {"outer_steps_per_s": steps / train_time if steps else None,
                       "step_only_steps_per_s": steps / step_time if steps else None,
                       "images_per_s": steps * args.tasks * args.ways / train_time if steps else None},
        "wall_s": {"train_incl_task_sampling": train_time, "learner_step_only": step_time, "probes": probe_time,
                   "train_loop_total": train_wall, "eval": eval_time},
        "load_average_1min": {"train_start": load_at_start, "end": _load_average(), "cpus": os.cpu_count()},
        "history": history, "probes": probes, "seed": args.seed, "threads": torch.get_num_threads(),
        "versions": {"bmssl": bmssl.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "platform": platform.platform()},
        "commit": commit(), "command": " ".join(sys.argv),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{method}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr, flush=True)
    return record


def _load_average():
    """The 1-minute load average (None where the OS has none): how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# The table


def pct(mean, ci):
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"


def paired(a, b):
    d = np.asarray(a) - np.asarray(b)
    return f"{100 * d.mean():+.2f} ± {100 * confidence_interval(d):.2f}"


# What makes a method: the record's method and task_weight, and these MetaConfig fields.
METHOD_FIELDS = ("method", "target_data")
EVAL_FIELDS = ("settings", "queries", "episodes", "seed", "finetune_steps", "finetune_lr")


class MixedRecords(ValueError):
    """The records of one --out folder were made under different budgets or settings."""


def _shared_fields(record):
    """{field: value} of what the table presents as common to every row: the data, the
    evaluation and the seed; for a trained method also the budget and every MetaConfig field but
    those that define the method (scratch trains nothing: its budget and optimiser do not apply).
    A MetaConfig field that an older record lacks had its default value. The commit too: rows of
    different code are not one comparison (engine changes move a trained row by several points,
    far outside its CI, which covers the episodes only)."""
    fields = {"dataset": record["dataset"], "data": record["data"], "seed": record["seed"],
              "commit": record.get("commit"), **{f"eval.{k}": record["eval"].get(k) for k in EVAL_FIELDS}}
    if record["budget"]["outer_steps"]:
        config = {**asdict(MetaConfig()), **record["config"]}
        fields.update({f"budget.{k}": v for k, v in record["budget"].items()})
        fields.update({f"config.{k}": v for k, v in config.items() if k not in METHOD_FIELDS})
    return fields


def _load_text(records) -> str:
    """Where the throughput was measured: the CPUs and the 1-minute load averages the records
    sampled (at each method's start and end), or "on a shared CPU" for records without them."""
    samples = [r["load_average_1min"] for r in records.values() if r.get("load_average_1min")]
    loads = [v for s in samples for v in (s["train_start"], s["end"]) if v is not None]
    if not loads:
        return "on a CPU shared with other jobs (load not recorded)"
    cpus = {s["cpus"] for s in samples}
    return (f"on {'/'.join(map(str, sorted(cpus)))} CPU cores, 1-minute load average {min(loads):.1f} to "
            f"{max(loads):.1f} (sampled at each method's start and end)")


def check_same_budget(records, out_dir: Path):
    """MixedRecords naming each field whose value differs between the records, and the files."""
    shared = {method: _shared_fields(record) for method, record in records.items()}
    differing = []
    for field in sorted(set().union(*shared.values())):
        values = {method: fields[field] for method, fields in shared.items() if field in fields}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            differing.append(f"  {field}: " + ", ".join(f"{m}.json {json.dumps(v)}" for m, v in values.items()))
    if differing:
        raise MixedRecords(f"not writing {out_dir / 'table.md'}: it presents one budget and one evaluation, but "
                           f"the records in {out_dir} differ in\n" + "\n".join(differing) + "\nrerun the methods "
                           "with the same flags (--force), or give each set of flags its own --out")


def write_table(out_dir: Path, args):
    """out_dir/table.md from the records there (None when there are none); MixedRecords when
    they were not made under one budget."""
    records = {}
    for method in METHODS:
        path = out_dir / f"{method}.json"
        if path.exists():
            records[method] = json.loads(path.read_text())
    if not records:
        return None
    check_same_budget(records, out_dir)
    any_record = next(iter(records.values()))
    trained = next((r for r in records.values() if r["budget"]["outer_steps"]), any_record)
    budget, eval_info, config = trained["budget"], any_record["eval"], trained["config"]
    lines = [f"# Few-shot accuracy on {any_record['dataset']} (%, mean ± 95% CI)", ""]
    lines += [f"Train: {any_record['data']['train']}", "",
              f"Test (unseen alphabets): {any_record['data']['test']}", "",
              "## Budget (identical for every trained method; scratch trains nothing)", "",
              f"- {trained['budget']['outer_steps']} outer steps × N = {budget['images_per_step_N']} pool images "
              f"(K = {budget['tasks_K']} tasks × W = {budget['ways_W']} ways), M1 = {budget['support_views_M1']} "
              f"support + M2 = {budget['query_views_M2']} query views per image "
              f"= {trained['budget']['images_seen']} images / {trained['budget']['views_seen']} augmented views seen, "
              "the same task batches in the same order for every method (one seeded generator).",
              f"- Conv4 (GroupNorm) 28×28, inner steps L = {config['inner_steps']}, α = {config['inner_lr']}, "
              f"target steps δ = {config['target_steps']}, order {config['order']}, λ = {config['contrastive_weight']}, "
              f"τ = {config['contrastive_temperature']}, Adam β = {config['outer_lr']} with {config['warmup_steps']} "
              f"warm-up steps and cosine decay, grad clip {config['clip_grad_norm']}, seed {any_record['seed']}.",
              f"- This is a tiny CPU budget (paper: L = 5, δ = 5 or more, many thousands of steps); "
              "absolute numbers are far below the paper's.",
              f"- Eval: {eval_info['episodes']} episodes per setting, {eval_info['queries']} queries per class, "
              f"episode seed {eval_info['seed']} (the same episodes for every method and both protocols). "
              "proto = cosine to mean normalised support features; finetune = the engine's inner loop with "
              f"{eval_info['finetune_steps']} step(s) (α = {eval_info['finetune_lr']}) from a zero head, CE only. "
              "The ± covers the episodes only: each method is one training run (one seed, one commit), and "
              "another seed or a change to the engine moves a trained row by more than its interval.",
              "- Throughput (outer steps/s, including task sampling, excluding probes and eval) was measured "
              f"{_load_text(records)}, with the thread count listed under Provenance: indicative only.",
              ""]
    header = "| method | " + " | ".join(f"{p} {s}" for p in PROTOCOLS for s in ("5w1s", "5w5s", "20w1s")) + \
        " | outer steps/s | train wall (s) |"
    lines += ["## Results", "", header, "|" + "---|" * (header.count("|") - 1)]
    for method, record in records.items():
        cells = [pct(record["results"][f"{p}/{s}"]["mean"], record["results"][f"{p}/{s}"]["ci95"])
                 for p in PROTOCOLS for s in ("5w1s", "5w5s", "20w1s")]
        rate = record["throughput"]["outer_steps_per_s"]
        cells += [f"{rate:.2f}" if rate else "–", f"{record['wall_s']['train_incl_task_sampling']:.0f}"]
        lines.append(f"| {record['label']} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for a, b in (("bmssl", "metassl"), ("metassl", "scratch"), ("bmssl", "scratch"),
                                 ("metassl", "simclr"), ("bmssl", "simclr"), ("bmssl_sq", "bmssl"),
                                 ("bmssl_sq", "metassl"), ("bmssl_task", "bmssl"), ("bmssl_task", "metassl")) if a in records and b in records]
    if pairs:
        lines += ["", "## Paired differences (same episodes; mean ± 95% CI of the per-episode difference, points)",
                  "", "| difference | " + " | ".join(f"{p} {s}" for p in PROTOCOLS for s in ("5w1s", "5w5s", "20w1s"))
                  + " |", "|---|" + "---|" * 6]
        for a, b in pairs:
            cells = [paired(records[a]["results"][f"{p}/{s}"]["accuracies"], records[b]["results"][f"{p}/{s}"]["accuracies"])
                     for p in PROTOCOLS for s in ("5w1s", "5w5s", "20w1s")]
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    lines += ["", "## Training trajectories (drift probes on the test-set features)", "",
              "outer loss / query acc: means over the preceding probe window of outer steps; "
              "feat std: mean per-dim std of backbone features; eff. rank: exp entropy of the singular values "
              "of the centred features (max 64); probe acc: proto 5w1s on 200 fixed episodes.", "",
              "| method | step | outer loss | query acc (w_L) | KL part | task part | feat std | normalised feat std | eff. rank | probe acc |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method, record in records.items():
        history, probes = record["history"], record["probes"]
        previous = 0
        for p in probes:
            window = [h for h in history if previous < h["step"] <= p["step"]]
            previous = p["step"]

            def mean(key):
                values = [h[key] for h in window if key in h]
                return f"{np.mean(values):.4f}" if values else "–"
            lines.append(f"| {method} | {p['step']} | {mean('outer_loss')} | {mean('query_accuracy')} | {mean('kl')} | "
                         f"{mean('task_loss')} | {p['feature_std']:.4f} | {p['normalised_feature_std']:.4f} | "
                         f"{p['effective_rank']:.2f} | {100 * p['proto_5w1s_probe']:.2f} |")
    lines += ["", "## Provenance", ""]
    for method, record in records.items():
        lines.append(f"- {method}: commit {record['commit']}, torch {record['versions']['torch']}, "
                     f"{record['threads']} threads, train {record['wall_s']['train_incl_task_sampling']:.0f} s, "
                     f"probes {record['wall_s']['probes']:.0f} s, eval {record['wall_s']['eval']:.0f} s, "
                     f"finished {record['finished']}; command `{record['command']}`")
    path = out_dir / "table.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr, flush=True)
    return path


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("omniglot", "glyphs"), default="omniglot")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/<dataset>")
    parser.add_argument("--steps", type=int, default=300, help="outer steps S (same for every method)")
    parser.add_argument("--tasks", type=int, default=4, help="K")
    parser.add_argument("--ways", type=int, default=5, help="W = N/K")
    parser.add_argument("--support-views", type=int, default=1, help="M1")
    parser.add_argument("--query-views", type=int, default=5, help="M2")
    parser.add_argument("--inner-steps", type=int, default=1, help="L")
    parser.add_argument("--target-steps", type=int, default=2, help="δ")
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--order", type=int, default=2, choices=(1, 2))
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--clip-grad-norm", type=float, default=10.0)
    parser.add_argument("--task-weight", type=float, default=1.0, help="weight of l(w_L; query) in bmssl_task")
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--eval-finetune-steps", type=int, default=1,
                        help="1: exact on cached features; >1 calls bmssl.eval.evaluate (slow)")
    parser.add_argument("--probe-every", type=int, default=25)
    parser.add_argument("--verify", type=int, default=0, help="check the fast eval against bmssl.eval on N episodes")
    parser.add_argument("--max-test-classes", type=int, default=None, help="smoke tests only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rerun methods whose JSON exists")
    parser.add_argument("--table-only", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out or REPO / "bench" / "results" / args.dataset
    if args.table_only:
        table(out_dir, args)
        return
    torch.set_num_threads(args.threads)
    pool, images, labels, description = load_data(args.dataset, args.max_test_classes)
    print(f"train {description['train']}\ntest {description['test']}", file=sys.stderr, flush=True)
    for method in args.methods:
        if (out_dir / f"{method}.json").exists() and not args.force:
            print(f"skip {method}: {out_dir / f'{method}.json'} exists (--force reruns)", file=sys.stderr)
            continue
        run_method(method, args, pool, images, labels, description, out_dir)
        if method != args.methods[-1]:
            table(out_dir, args, final=False)  # the table so far, while the next methods train
    table(out_dir, args)


def table(out_dir: Path, args, final=True):
    """write_table; when the records are mixed (or there are none), the reason on stderr, and at
    the end (final) the exit status 1."""
    try:
        if write_table(out_dir, args) is not None:
            return
        reason = f"no table to build: none of {', '.join(f'{m}.json' for m in METHODS)} is in {out_dir}"
    except MixedRecords as error:
        reason = str(error)
    if final:
        sys.exit(f"omniglot_table.py: {reason}")
    print(f"omniglot_table.py: {reason}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
