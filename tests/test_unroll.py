"""The fused unroll against the plain baseline (bench/unroll_baseline.py): the outer gradient on
θ of (b) the vmap engine with the twins and (c) the engine with the fused kernels equals (a)'s,
for order 1 and 2 and both objectives, within a tolerance scaled by the number of steps."""
import sys
from pathlib import Path

import pytest
import torch

from bmssl.meta import MetaConfig, detached, meta_gradient
from bmssl.models import FewShotModel, build_backbone
from bmssl.tasks import TaskBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import unroll_baseline  # noqa: E402


def tiny_problem(method, order, inner, target, tasks=3, ways=3, support_views=1, query_views=3, seed=0):
    shape = (1, 8, 8)
    config = MetaConfig(method=method, inner_steps=inner, target_steps=target, order=order, inner_lr=0.3,
                        projection_dim=8, seed=seed)
    backbone = build_backbone("conv4", shape, seed=seed, hidden=4, depth=2).double()
    model = FewShotModel(backbone, config.projection_dim).double()
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(tasks, ways * support_views, *shape, generator=generator, dtype=torch.float64)
    query = torch.rand(tasks, ways * query_views, *shape, generator=generator, dtype=torch.float64)
    labels = lambda views: torch.arange(ways).repeat_interleave(views).expand(tasks, -1)  # noqa: E731
    batch = TaskBatch(support, labels(support_views), query, labels(query_views),
                      torch.arange(tasks * ways).view(tasks, ways))
    theta = {n: v.detach().requires_grad_() for n, v in model.meta_parameters().items()}
    return model, theta, batch, config


@pytest.mark.parametrize("method", ["bmssl", "metassl"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_engine_outer_gradient_equals_baseline(method, order, backend, monkeypatch):
    inner, target = 3, 2
    model, theta, batch, config = tiny_problem(method, order, inner, target)
    monkeypatch.setenv("BMSSL_BACKEND", "torch")
    expected, expected_loss = unroll_baseline.outer_gradient(model, theta, batch, config)
    monkeypatch.setenv("BMSSL_BACKEND", backend)
    got, loss, _ = meta_gradient(model, detached(theta), batch, config)
    tolerance = 1e-10 * (inner + target + 1)  # step-scaled (STYLE.md §6)
    torch.testing.assert_close(loss, expected_loss, atol=tolerance, rtol=tolerance)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=tolerance, rtol=1e-8, msg=name)


def test_orders_differ():
    model, theta, batch, config = tiny_problem("bmssl", 2, 3, 2)
    second = unroll_baseline.outer_gradient(model, theta, batch, config)[0]
    model, theta, batch, config = tiny_problem("bmssl", 1, 3, 2)
    first = unroll_baseline.outer_gradient(model, theta, batch, config)[0]
    assert any((second[n] - first[n]).abs().max() > 1e-6 for n in second)


@pytest.mark.parametrize("method", ["bmssl", "metassl"])
def test_checkpointed_inner_steps_give_the_same_outer_gradient(method):
    """checkpoint_inner_steps recomputes each inner step in the backward (torch.utils.checkpoint)
    instead of keeping its activations: the same numbers, less memory (bench/bench_unroll.py
    --memory-vs-steps measures how much)."""
    import dataclasses

    inner, target = 3, 2
    model, theta, batch, config = tiny_problem(method, 2, inner, target)
    expected, expected_loss = unroll_baseline.outer_gradient(model, theta, batch, config)
    config = dataclasses.replace(config, checkpoint_inner_steps=True)
    got, loss, _ = meta_gradient(model, detached(theta), batch, config)
    tolerance = 1e-10 * (inner + target + 1)
    torch.testing.assert_close(loss, expected_loss, atol=tolerance, rtol=tolerance)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=tolerance, rtol=1e-8, msg=name)


def test_checkpointing_with_vmap_is_refused_clearly():
    with pytest.raises(ValueError, match="torch.func.vmap cannot trace"):
        MetaConfig(checkpoint_inner_steps=True, task_batching="vmap")
    model, theta, batch, config = tiny_problem("bmssl", 2, 2, 1)
    import dataclasses

    config = dataclasses.replace(config, checkpoint_inner_steps=True)
    with pytest.raises(ValueError, match="needs the loop over tasks"):
        meta_gradient(model, detached(theta), batch, config, batched=True)


@pytest.mark.parametrize("task_batching", ["vmap", "loop"])
def test_both_task_batchings_give_the_baseline_gradient(task_batching):
    import dataclasses

    model, theta, batch, config = tiny_problem("bmssl", 2, 2, 2)
    expected, _ = unroll_baseline.outer_gradient(model, theta, batch, config)
    config = dataclasses.replace(config, task_batching=task_batching)
    got, _, _ = meta_gradient(model, detached(theta), batch, config)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=5e-10, rtol=1e-8, msg=name)
