"""The captured outer step (bmssl.cuda_graph) against the eager one.

On CPU: the engine's step reads no tensor value on the host once the TaskShape is given (what a
CUDA graph capture needs), shown by running it with every value read made to raise; the checks
skip their value reads while a capture runs; CPU tensors get a clear error. On a GPU (`gpu`
marker): the replayed meta-gradient equals the eager one, on the captured inputs and on new θ
and images copied in, and a changed task layout is refused."""
import contextlib
import copy
import dataclasses

import pytest
import torch

from bmssl import validate
from bmssl.cuda_graph import CapturedMetaGradient
from bmssl.meta import (EXECUTION_FIELDS, MetaConfig, MetaLearner, check_task_batch, detached, meta_gradient,
                        meta_gradient_tensors)
from test_unroll import tiny_problem

VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def value_reads_raise(monkeypatch):
    """Every host read of a tensor's values raises, as it would fail inside a CUDA capture."""
    def forbidden(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value on the host")
        return read

    with monkeypatch.context() as patch:
        for name in VALUE_READS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        patch.setattr(torch, "bincount", forbidden("bincount"))
        patch.setattr(torch, "equal", forbidden("equal"))
        yield


def test_value_reads_raise_catches_a_read(monkeypatch):
    labels = torch.arange(3)
    with value_reads_raise(monkeypatch), pytest.raises(AssertionError, match="read a value"):
        int(labels.max())


@pytest.mark.parametrize("method", ["bmssl", "metassl", "simclr"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("batched", [False, True])
def test_step_reads_no_values_given_the_task_shape(method, backend, batched, monkeypatch):
    model, theta, batch, config = tiny_problem(method, 2, 2, 1 if method == "bmssl" else 0)
    monkeypatch.setenv("BMSSL_BACKEND", backend)
    expected, expected_loss, expected_aux = meta_gradient(model, detached(theta), batch, config, batched)
    shape = check_task_batch(batch)
    # what validate.values_readable says inside a capture
    monkeypatch.setattr(validate, "values_readable", lambda: False)
    with value_reads_raise(monkeypatch):
        grads, loss, aux = meta_gradient_tensors(model, detached(theta), batch, config, batched, shape=shape)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert {name: value.item() for name, value in aux.items()} == pytest.approx(expected_aux, rel=1e-12)


def test_without_the_task_shape_the_step_reads_labels(monkeypatch):
    """The control of the test above: the same step without `shape` does read values."""
    model, theta, batch, config = tiny_problem("bmssl", 2, 1, 1)
    with value_reads_raise(monkeypatch), pytest.raises(AssertionError, match="read a value"):
        meta_gradient_tensors(model, detached(theta), batch, config)


def test_values_readable_is_false_while_compiling_or_capturing(monkeypatch):
    assert validate.values_readable()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not validate.values_readable()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not validate.values_readable()


def test_cpu_tensors_are_refused_with_a_clear_error():
    model, theta, batch, config = tiny_problem("bmssl", 2, 1, 1)
    with pytest.raises(ValueError, match="every tensor must be on a CUDA device"):
        CapturedMetaGradient(model, detached(theta), batch, config)


def test_meta_config_checks_cuda_graph():
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        MetaConfig(cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph and checkpoint_inner_steps do not combine"):
        MetaConfig(cuda_graph=True, checkpoint_inner_steps=True)
    assert "cuda_graph" in EXECUTION_FIELDS  # how the step runs, not what it computes


def test_a_learner_with_cuda_graph_on_cpu_says_it_needs_cuda():
    model, theta, batch, config = tiny_problem("bmssl", 2, 1, 1)
    learner = MetaLearner(dataclasses.replace(config, cuda_graph=True), model.backbone)
    with pytest.raises(ValueError, match="every tensor must be on a CUDA device"):
        learner.step(batch)


def cuda_problem(method, dtype):
    model, theta, batch, config = tiny_problem(method, 2, 2, 2 if method == "bmssl" else 0)
    device = torch.device("cuda")
    model = model.to(device, dtype)
    theta = {n: v.detach().to(device, dtype).requires_grad_() for n, v in theta.items()}
    batch = type(batch)(batch.support.to(device, dtype), batch.support_labels.to(device),
                        batch.query.to(device, dtype), batch.query_labels.to(device), batch.image_index.to(device))
    return model, theta, batch, config


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["bmssl", "metassl"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_replay_equals_the_eager_meta_gradient(method, dtype, tolerance):
    model, theta, batch, config = cuda_problem(method, dtype)
    captured = CapturedMetaGradient(model, detached(theta), batch, config)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for step in range(3):  # the captured inputs, then new θ and images copied in
        if step:
            theta = {n: (v + 0.01 * torch.randn(v.shape, generator=generator, device="cuda", dtype=dtype)).detach()
                     for n, v in theta.items()}
            batch = type(batch)(torch.rand(batch.support.shape, generator=generator, device="cuda", dtype=dtype),
                                batch.support_labels, torch.rand(batch.query.shape, generator=generator,
                                                                 device="cuda", dtype=dtype),
                                batch.query_labels, batch.image_index)
        expected, expected_loss, _ = meta_gradient(model, detached(theta), batch, config)
        grads, loss, _ = captured(theta, batch)
        torch.testing.assert_close(loss, expected_loss, rtol=tolerance, atol=tolerance)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.gpu
def test_learner_steps_with_cuda_graph_equal_eager_steps():
    """Three outer steps (Adam updates between them), then a batch with another task layout,
    which is captured anew: the same losses and gradient norms as the eager learner's."""
    model, _, batch, config = tiny_problem("bmssl", 2, 2, 2)
    flipped = type(batch)(batch.support.flip(1), batch.support_labels.flip(-1), batch.query, batch.query_labels,
                          batch.image_index)
    runs = {}
    for cuda_graph in (False, True):
        learner = MetaLearner(dataclasses.replace(config, cuda_graph=cuda_graph), copy.deepcopy(model.backbone))
        learner.model.to("cuda", torch.float64)
        runs[cuda_graph] = [learner.step(batch) for _ in range(3)]
        captured = learner._captured
        runs[cuda_graph].append(learner.step(flipped))
        assert (learner._captured is not captured) == cuda_graph  # recaptured for the new layout
    for eager, replayed in zip(runs[False], runs[True]):
        assert replayed["outer_loss"] == pytest.approx(eager["outer_loss"], rel=1e-9)
        assert replayed["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-9)


@pytest.mark.gpu
def test_replay_refuses_another_task_layout_or_shape():
    model, theta, batch, config = cuda_problem("bmssl", torch.float32)
    captured = CapturedMetaGradient(model, detached(theta), batch, config)
    flipped = type(batch)(batch.support, batch.support_labels.flip(-1), batch.query, batch.query_labels,
                          batch.image_index)
    with pytest.raises(ValueError, match="support_labels differ"):
        captured(theta, flipped)
    smaller = {n: v[:1] if n == next(iter(theta)) else v for n, v in theta.items()}
    with pytest.raises(ValueError, match="the captured step has"):
        captured(smaller, batch)
