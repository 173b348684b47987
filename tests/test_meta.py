"""The two-level loop (bmssl/meta.py) on a tiny conv net at 8x8: exact meta-gradients (finite
differences, float64), first vs second order, the stop-gradient target, vmap == loop,
determinism and exact resume, learning on a trivial problem, config validation."""
import io
import math
from typing import NamedTuple

import pytest
import torch

from bmssl import meta
from bmssl.meta import MetaConfig, MetaLearner
from bmssl.models import ConvNet, FewShotModel, ResNet12, build_backbone


class Batch(NamedTuple):
    """The TaskBatch contract of bmssl/tasks.py, built here from random tensors."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and the CI cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_batch(tasks=2, ways=3, shots=2, queries=2, size=8, dtype=torch.float64, seed=0, noise=None):
    """K tasks of W images; each image's views are the image plus noise (or fresh noise when
    noise is None)."""
    generator = torch.Generator().manual_seed(seed)
    if noise is None:
        support = torch.rand(tasks, ways * shots, 1, size, size, generator=generator, dtype=dtype)
        query = torch.rand(tasks, ways * queries, 1, size, size, generator=generator, dtype=dtype)
    else:
        base = torch.rand(tasks, ways, 1, size, size, generator=generator, dtype=dtype)
        support = base.repeat_interleave(shots, 1)
        query = base.repeat_interleave(queries, 1)
        support = support + noise * torch.randn(support.shape, generator=generator, dtype=dtype)
        query = query + noise * torch.randn(query.shape, generator=generator, dtype=dtype)
    support_labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_labels = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return Batch(support, support_labels, query, query_labels)


def tiny_backbone(dtype=torch.float64, seed=0, norm="group"):
    return build_backbone("conv4", (1, 8, 8), hidden=4, depth=2, norm=norm, seed=seed).to(dtype)


def tiny_learner(dtype=torch.float64, backbone_seed=0, norm="group", **overrides):
    options = dict(inner_steps=2, target_steps=2, inner_lr=0.3, projection_dim=4, projection_hidden=8,
                   contrastive_temperature=0.5, outer_lr=1e-2)
    options.update(overrides)
    return MetaLearner(MetaConfig(**options), tiny_backbone(dtype, backbone_seed, norm))


def directional_fd(function, theta, direction, eps=1e-5):
    plus = {k: theta[k] + eps * direction[k] for k in theta}
    minus = {k: theta[k] - eps * direction[k] for k in theta}
    return (function(plus) - function(minus)).item() / (2 * eps)


def random_direction(theta, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in theta.items()}


def dot(grads, direction):
    return sum((grads[k] * direction[k]).sum() for k in grads).item()


def fixed_target_loss(learner, batch, targets):
    """mean_k outer_k(θ) with each task's target w_{L+δ} held at the given constants."""
    config, model = learner.config, learner.model
    plan = meta.plan_views(config, meta.check_task_batch(batch))
    labels = (batch.support_labels[0], batch.query_labels[0])

    def loss(theta):
        total = 0
        for k, target in enumerate(targets):
            task = (batch.support[k], labels[0], batch.query[k], labels[1])
            total = total + meta.task_outer_loss(model, theta, *task, config, plan, target=target)[0]
        return total / len(targets)

    return loss


def targets_at(learner, theta, batch):
    config, model = learner.config, learner.model
    plan = meta.plan_views(config, meta.check_task_batch(batch))
    targets = []
    for k in range(batch.support.shape[0]):
        task = (batch.support[k], batch.support_labels[0], batch.query[k], batch.query_labels[0])
        adapted, _ = meta.adapt_to_task(model, theta, *task, config, plan)
        targets.append(meta.bootstrap_target(model, adapted, *task, config, plan))
    return targets


@pytest.mark.parametrize("method,norm,shots", [("metassl", "group", 2), ("bmssl", "group", 2),
                                               ("metassl", "batch", 2), ("bmssl", "batch", 1)])
def test_second_order_meta_gradient_matches_finite_differences(method, norm, shots):
    learner = tiny_learner(method=method, order=2, norm=norm)
    batch = random_batch(seed=1, shots=shots)
    theta = meta.detached(learner.theta)
    grads, _, _ = learner.meta_gradient(batch)
    if method == "metassl":
        loss = lambda th: meta.meta_loss(learner.model, th, batch, learner.config)[0]  # noqa: E731
    else:  # the target is a stop-gradient: differentiate with it held where θ puts it
        loss = fixed_target_loss(learner, batch, targets_at(learner, theta, batch))
    for seed in range(2):
        direction = random_direction(theta, seed)
        numeric = directional_fd(loss, theta, direction)
        assert dot(grads, direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["metassl", "bmssl"])
def test_first_order_is_the_gradient_at_w_L_and_differs_from_second_order(method):
    first = tiny_learner(method=method, order=1)
    second = tiny_learner(method=method, order=2)
    batch = random_batch(seed=2)
    grads_first, loss_first, _ = first.meta_gradient(batch)
    grads_second, loss_second, _ = second.meta_gradient(batch)
    assert loss_first.item() == pytest.approx(loss_second.item(), rel=1e-12)
    difference = sum((grads_first[k] - grads_second[k]).norm() for k in grads_first)
    assert difference > 1e-4 * sum(g.norm() for g in grads_second.values())

    # FOMAML: ∇_θ ≈ mean_k ∇_w outer_k(w) at w = w_L^k (dw_L/dθ = I), θ's entries only
    config, model = first.config, first.model
    plan = meta.plan_views(config, meta.check_task_batch(batch))
    theta = meta.detached(first.theta)
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for k in range(batch.support.shape[0]):
        task = (batch.support[k], batch.support_labels[0], batch.query[k], batch.query_labels[0])
        adapted, _ = meta.adapt_to_task(model, theta, *task, config, plan)
        target = meta.bootstrap_target(model, adapted, *task, config, plan) if method == "bmssl" else None
        grad_at_w = torch.func.grad(
            lambda w: meta.outer_objective(model, w, *task, config, plan, target)[0])(meta.detached(adapted))
        for name in expected:
            expected[name] += grad_at_w[name] / batch.support.shape[0]
    for name in expected:
        torch.testing.assert_close(grads_first[name], expected[name], rtol=1e-10, atol=1e-12)


def test_bootstrap_target_gets_no_gradient():
    learner = tiny_learner(method="bmssl", order=2)
    batch = random_batch(seed=3)
    theta = meta.detached(learner.theta)
    grads, _, _ = learner.meta_gradient(batch)

    # 1. The target comes out detached even when θ is tracked.
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    targets = targets_at(learner, leaves, batch)
    assert all(not t.requires_grad and t.grad_fn is None for target in targets for t in target.values())

    # 2. The engine's gradient is the gradient with the target replaced by constants ...
    fixed_targets = targets_at(learner, theta, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    fixed = torch.autograd.grad(fixed_target_loss(learner, batch, fixed_targets)(leaves), list(leaves.values()))
    for (name, expected) in zip(leaves, fixed):
        torch.testing.assert_close(grads[name], expected, rtol=1e-10, atol=1e-13)

    # 3. ... and not the derivative of the loss whose target moves with θ.
    moving = lambda th: meta.meta_loss(learner.model, th, batch, learner.config)[0]  # noqa: E731
    direction = random_direction(theta, 7)
    numeric_moving = directional_fd(moving, theta, direction)
    assert abs(dot(grads, direction) - numeric_moving) > 1e-3 * abs(numeric_moving)


@pytest.mark.parametrize("method,order,views,options", [
    ("bmssl", 2, "auto", {}), ("metassl", 2, "all", {}), ("bmssl", 1, "support", {}), ("metassl", 1, "auto", {}),
    ("bmssl", 2, "all", {"target_data": "support+query", "norm": "batch"}),
    ("metassl", 2, "auto", {"head": "shared", "ways": 3, "norm": "batch", "shots": 1, "queries": 1}),
])
def test_vmap_over_tasks_equals_the_loop(method, order, views, options):
    options = dict(options)
    shots, queries = options.pop("shots", 2), options.pop("queries", 2)
    learner = tiny_learner(method=method, order=order, contrastive_views=views, **options)
    batch = random_batch(tasks=3, shots=shots, queries=queries, seed=4)
    grads_vmap, loss_vmap, aux_vmap = learner.meta_gradient(batch, batched=True)
    grads_loop, loss_loop, aux_loop = learner.meta_gradient(batch, batched=False)
    torch.testing.assert_close(loss_vmap, loss_loop, rtol=1e-12, atol=1e-14)
    for name in grads_loop:
        torch.testing.assert_close(grads_vmap[name], grads_loop[name], rtol=1e-9, atol=1e-12)
    assert aux_vmap == pytest.approx(aux_loop, rel=1e-10)


def test_single_support_view_uses_query_views_for_the_contrastive_term():
    batch = random_batch(shots=1, queries=3, seed=5)  # Omniglot-like M1 = 1
    learner = tiny_learner(method="metassl", contrastive_views="auto")
    shape = meta.check_task_batch(batch)
    assert shape == meta.TaskShape(tasks=2, ways=3, shots=1, queries=3)
    assert meta.plan_views(learner.config, shape).inner_uses_query
    metrics = learner.step(batch)
    assert torch.isfinite(torch.tensor(metrics["outer_loss"]))
    with pytest.raises(ValueError, match="no positives"):
        tiny_learner(contrastive_views="support").step(batch)
    assert not meta.plan_views(MetaConfig(contrastive_weight=0.0, contrastive_views="support"), shape).inner_uses_query
    tiny_learner(contrastive_weight=0.0, contrastive_views="support").step(batch)


def run_steps(learner, batches):
    return [learner.step(batch) for batch in batches]


def test_learner_is_deterministic_and_resumes_exactly():
    options = dict(method="bmssl", warmup_steps=2, total_steps=6, clip_grad_norm=1.0, dtype=torch.float32)
    batches = [random_batch(seed=10 + i, dtype=torch.float32) for i in range(4)]
    keys = ("outer_loss", "inner_loss", "inner_loss_start", "query_accuracy", "grad_norm", "lr")
    first = run_steps(tiny_learner(**options), batches)
    again = run_steps(tiny_learner(**options), batches)
    assert [[m[k] for k in keys] for m in first] == [[m[k] for k in keys] for m in again]
    # warm-up 1/2, 1, then cosine over the 4 remaining steps
    assert [m["lr"] for m in first] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 * 0.5 * (1 + 2**-0.5)])

    learner = tiny_learner(**options)
    run_steps(learner, batches[:2])
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    continued = run_steps(learner, batches[2:])

    resumed_learner = tiny_learner(**options, backbone_seed=99)
    buffer.seek(0)
    resumed_learner.load_state_dict(torch.load(buffer))
    assert resumed_learner.steps_done == 2
    resumed = run_steps(resumed_learner, batches[2:])
    assert [[m[k] for k in keys] for m in continued] == [[m[k] for k in keys] for m in resumed]
    assert [m["outer_loss"] for m in first[2:]] == [m["outer_loss"] for m in continued]

    with pytest.raises(ValueError, match="inner_lr"):
        tiny_learner(**{**options, "inner_lr": 0.5}).load_state_dict(learner.state_dict())


def test_how_the_engine_runs_may_change_on_load_and_changes_no_number():
    """task_batching and checkpoint_inner_steps choose how the maths runs, not what it computes:
    a state saved under one loads under the other (also when the saved config predates the
    fields), and the next steps agree to rounding."""
    options = dict(method="bmssl", warmup_steps=0, total_steps=4)
    batches = [random_batch(seed=20 + i) for i in range(3)]
    learner = tiny_learner(**options, task_batching="vmap")
    run_steps(learner, batches[:1])
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)  # a copy: state_dict() shares the live tensors
    continued = run_steps(learner, batches[1:])
    buffer.seek(0)
    state = torch.load(buffer)
    other = tiny_learner(**options, task_batching="loop", checkpoint_inner_steps=True)
    state["config"] = {k: v for k, v in state["config"].items() if k not in meta.EXECUTION_FIELDS}
    other.load_state_dict(state)
    resumed = run_steps(other, batches[1:])
    for a, b in zip(continued, resumed):
        assert a["outer_loss"] == pytest.approx(b["outer_loss"], rel=1e-10)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)


@pytest.mark.parametrize("method", ["metassl", "simclr"])
def test_training_reduces_the_loss_on_a_learnable_problem(method):
    """Fresh images every step; an image's views are the image plus a little noise."""
    temperature = 0.2 if method == "simclr" else 0.5
    learner = tiny_learner(method=method, dtype=torch.float32, outer_lr=2e-2, inner_steps=1,
                           contrastive_temperature=temperature)
    losses = [learner.step(random_batch(seed=s, noise=0.05, dtype=torch.float32))["outer_loss"]
              for s in range(150)]
    early, late = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert late < 0.8 * early, (early, late)


def test_bmssl_step_descends_the_kl_to_a_fixed_target():
    """BMSSL's target moves with θ, so its loss need not fall over training (see the report);
    what a step must do is lower the KL to the target it was computed against."""
    learner = tiny_learner(method="bmssl")
    batch = random_batch(seed=6, noise=0.05)
    theta = meta.detached(learner.theta)
    fixed = fixed_target_loss(learner, batch, targets_at(learner, theta, batch))
    grads, loss, _ = learner.meta_gradient(batch)
    assert fixed(theta).item() == pytest.approx(loss.item(), rel=1e-12)
    step_size, squared_norm = 1e-5, sum((g * g).sum() for g in grads.values()).item()
    stepped = {k: v - step_size * grads[k] for k, v in theta.items()}
    assert fixed(stepped).item() < loss.item() - 0.5 * step_size * squared_norm


def test_scratch_trains_nothing_and_simclr_skips_the_meta_level():
    learner = tiny_learner(method="scratch")
    before = {k: v.clone() for k, v in learner.theta.items()}
    metrics = learner.step(random_batch())
    assert metrics["step"] == 1 and "outer_loss" not in metrics
    assert all(torch.equal(before[k], v) for k, v in learner.theta.items())
    simclr = tiny_learner(method="simclr").step(random_batch())
    assert "query_accuracy" not in simclr and simclr["outer_loss"] > 0


def test_non_finite_outer_loss_names_the_step():
    learner = tiny_learner(method="metassl")
    learner.step(random_batch())
    bad = random_batch(seed=1)
    bad.support[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 2"):
        learner.step(bad)


def test_an_outer_lr_that_overflows_adam_is_a_floating_point_error():
    """lr 1e38: Adam's step size no longer fits fp32 (torch raises a RuntimeError about the
    overflow); the learner turns it into the FloatingPointError that names the step."""
    learner = tiny_learner(torch.float32, method="simclr", outer_lr=1e38, warmup_steps=0, clip_grad_norm=None)
    with pytest.raises(FloatingPointError, match="outer step 1: Adam's update overflowed"):
        learner.step(random_batch(dtype=torch.float32))


def test_a_non_finite_theta_after_the_update_names_the_step(monkeypatch):
    learner = tiny_learner(method="metassl")
    update = learner.optimizer.step

    def step_then_break():
        update()
        with torch.no_grad():
            next(learner.model.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(learner.optimizer, "step", step_then_break)
    with pytest.raises(FloatingPointError, match="outer step 1: θ is not finite after the Adam update"):
        learner.step(random_batch())


def test_shared_head_is_meta_learned():
    learner = tiny_learner(method="metassl", head="shared", ways=3)
    assert "head.weight" in learner.theta and not learner.theta["head.weight"].any()
    learner.step(random_batch())
    assert learner.theta["head.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="3 ways"):
        learner.step(random_batch(ways=4))


@pytest.mark.parametrize("field,value,message", [
    ("method", "maml", "method must be one of"),
    ("inner_steps", -1, "inner_steps must be an integer >= 0"),
    ("inner_steps", 1.5, "inner_steps"),
    ("order", 3, "order must be one of"),
    ("inner_lr", 0.0, "inner_lr must be a finite number > 0"),
    ("inner_lr", float("nan"), "inner_lr"),
    ("contrastive_weight", -1.0, "contrastive_weight"),
    ("contrastive_views", "query", "contrastive_views"),
    ("target_data", "query", "target_data"),
    ("kl_temperature", 0, "kl_temperature"),
    ("target_steps", 0, "target_steps >= 1"),
    ("head", "shared", "needs ways"),
    ("total_steps", 0, "total_steps"),
    ("clip_grad_norm", -1.0, "clip_grad_norm"),
    ("schedule", "step", "schedule"),
])
def test_bad_configs_raise_value_errors_naming_the_problem(field, value, message):
    with pytest.raises(ValueError, match=message):
        MetaConfig(**{field: value})


def test_configs_whose_meta_gradient_is_zero_are_refused():
    """bmssl with L = 0 and the zero head: w_L's logits are 0 for every θ, so the KL's gradient
    is exactly 0 (it trained nothing while reporting success); simclr with λ = 0 has no loss."""
    with pytest.raises(ValueError, match="inner_steps=0 and the zero head has a zero meta-gradient"):
        MetaConfig(method="bmssl", inner_steps=0)
    # the NT-Xent of θ is the only term that can learn at L = 0 with the zero head: without it, 0
    with pytest.raises(ValueError, match="task_loss_weight > 0 and contrastive_weight > 0"):
        MetaConfig(method="bmssl", inner_steps=0, task_loss_weight=1.0, contrastive_weight=0.0)
    with pytest.raises(ValueError, match="method='metassl' with inner_steps=0 and the zero head"):
        MetaConfig(method="metassl", inner_steps=0, contrastive_weight=0.0)
    with pytest.raises(ValueError, match="a weight of 0 leaves nothing to train"):
        MetaConfig(method="simclr", contrastive_weight=0.0)
    batch = random_batch()
    for options in (dict(head="shared", ways=3), dict(task_loss_weight=1.0)):  # these do learn at L = 0
        grads, _, _ = tiny_learner(method="bmssl", inner_steps=0, **options).meta_gradient(batch)
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    grads, _, _ = tiny_learner(method="metassl", inner_steps=0).meta_gradient(batch)  # λ·NT-Xent of θ
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("field", ["kl_temperature", "contrastive_temperature"])
def test_temperature_whose_inverse_overflows_float32_is_refused(field):
    """T = 1e-40 passed validation and failed at step 1 as 'the outer loss is nan'."""
    with pytest.raises(ValueError, match=f"{field} = 1e-40 is too small: 1/T overflows float32"):
        MetaConfig(**{field: 1e-40})
    MetaConfig(**{field: 1e-3})


def test_simclr_loss_is_scaled_by_the_contrastive_weight():
    batch = random_batch()
    _, one, _ = tiny_learner(method="simclr").meta_gradient(batch)
    _, five, _ = tiny_learner(method="simclr", contrastive_weight=5.0).meta_gradient(batch)
    assert float(five) == pytest.approx(5 * float(one), rel=1e-12)


@pytest.mark.parametrize("method", ["bmssl", "metassl"])
def test_checkpointed_inner_steps_without_the_contrastive_term(method):
    """λ = 0 leaves the projection head out of the inner loss: its gradient is 0, in the
    checkpointed step too (it raised 'appears to not have been used in the graph')."""
    batch = random_batch()
    plain = tiny_learner(method=method, contrastive_weight=0.0, task_batching="loop").meta_gradient(batch)
    checkpointed = tiny_learner(method=method, contrastive_weight=0.0, task_batching="loop",
                                checkpoint_inner_steps=True).meta_gradient(batch)
    assert float(checkpointed[1]) == pytest.approx(float(plain[1]), rel=1e-12)
    for name, grad in plain[0].items():
        torch.testing.assert_close(checkpointed[0][name], grad, rtol=1e-10, atol=1e-12)


def test_bad_batches_raise_value_errors():
    learner = tiny_learner()
    batch = random_batch()
    shuffled = batch._replace(support_labels=torch.stack([batch.support_labels[0], batch.support_labels[0].flip(0)]))
    with pytest.raises(ValueError, match="same support_labels"):
        learner.step(shuffled)
    with pytest.raises(ValueError, match="support_labels"):
        learner.step(batch._replace(support_labels=batch.support_labels[:, :-1]))
    with pytest.raises(ValueError, match="field 'support'"):
        learner.step(object())


def test_backbones_shapes_and_functional_call():
    conv = build_backbone("conv4", (1, 28, 28), seed=0)
    assert conv.feature_dim == 64 and conv(torch.rand(2, 1, 28, 28)).shape == (2, 64)
    assert build_backbone("conv4", (3, 84, 84), seed=0).feature_dim == 1600
    resnet = ResNet12((3, 32, 32), widths=(4, 8, 8, 16))
    assert resnet(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    resnet_learner = MetaLearner(MetaConfig(inner_steps=1, target_steps=1, projection_dim=4),
                                 build_backbone("resnet12", (1, 16, 16), widths=(2, 2, 4, 4), seed=0))
    before = {name: p.detach().clone() for name, p in resnet_learner.model.named_parameters()}
    metrics = resnet_learner.step(random_batch(tasks=2, size=16, dtype=torch.float32))  # 1-channel 16x16
    assert math.isfinite(metrics["outer_loss"]) and metrics["outer_loss"] > 0
    assert any(not torch.equal(before[name], p) for name, p in resnet_learner.model.named_parameters())
    # per-sample norm: an image's features do not depend on the rest of the batch
    images = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(conv(images)[:2], conv(images[:2]))
    batch_norm = ConvNet((1, 8, 8), hidden=4, depth=2, norm="batch")
    model = FewShotModel(batch_norm, projection_dim=4)
    params = model.task_parameters(model.meta_parameters(), ways=3)
    assert model.logits(params, model.features(params, torch.rand(6, 1, 8, 8))).shape == (6, 3)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("vit", (1, 28, 28))
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvNet((1, 8, 8), depth=2, norm="layer")
    with pytest.raises(ValueError, match="feature_dim"):
        FewShotModel(torch.nn.Linear(3, 3))


def test_task_loss_weight_adds_the_metassl_loss_to_the_kl():
    """bmssl with task_loss_weight w: outer = KL + w * (metassl outer loss), as a value and in
    its meta-gradient; w = 0 is paper eq. 3 alone; a negative weight is refused."""
    batch = random_batch(seed=3)
    results = {}
    for name, method, weight in (("kl", "bmssl", 0.0), ("task", "metassl", 0.0), ("both", "bmssl", 0.7)):
        learner = tiny_learner(method=method, task_loss_weight=weight, target_steps=2, inner_steps=2)
        theta = meta.detached(learner.model.meta_parameters())
        grads, loss, _ = meta.meta_gradient(learner.model, theta, learner._prepare(batch), learner.config)
        results[name] = (loss, grads)
    torch.testing.assert_close(results["both"][0], results["kl"][0] + 0.7 * results["task"][0])
    for key in results["both"][1]:
        torch.testing.assert_close(results["both"][1][key], results["kl"][1][key] + 0.7 * results["task"][1][key])
    with pytest.raises(ValueError, match="task_loss_weight"):
        MetaConfig(task_loss_weight=-1.0)
