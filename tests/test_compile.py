"""torch.compile(fullgraph=True) and opcheck on the inputs that trip a custom op's fake kernel or
its value checks: channels_last and transposed inputs (the kernels return contiguous outputs, so
must the fakes), tensor temperatures and learning rates (their values cannot be read while
tracing), and calls where no gradient is wanted. Each compiled result is compared with eager."""
import pytest
import torch
from torch.library import opcheck

import bmssl
from bmssl import backends
from bmssl.ops import group_norm, kl_bootstrap, ntxent, sgd_unroll_step
from bmssl.ops.sgd import SUPPORT as SGD_SUPPORT

CPU = torch.device("cpu")
HAS_CPP = backends.input_reason("cpu", SGD_SUPPORT, CPU, torch.float32) is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="bmssl._C (the C++ CPU backend) is not built")
FAKE_CHECKS = ("test_schema", "test_faketensor")


@pytest.fixture(autouse=True)
def fresh_compiles():
    """No compiled code from an earlier run: the caches key on the graph, not on the fake kernels."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def compiled_equals_eager(fn, leaves):
    """fn(*leaves) -> scalar; the compiled value and gradients equal eager's."""
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(fn, fullgraph=True)(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride() or got.is_contiguous()


@needs_cpp
def test_raw_ops_fake_strides_match_the_kernels_on_strided_inputs():
    ops = torch.ops.bmssl
    p, g = channels_last(torch.randn(2, 3, 4, 5)), channels_last(torch.randn(2, 3, 4, 5))
    opcheck(ops.sgd_unroll_step.default, ([p, torch.randn(5, 4).t()], [g, torch.randn(5, 4).t()], 0.1),
            test_utils=FAKE_CHECKS)
    student, target = torch.randn(6, 4).t(), torch.randn(6, 4).t()
    _, row_lse = ops.kl_bootstrap_rows(student, target, 1.0)
    opcheck(ops.kl_bootstrap_rows_backward.default, (torch.ones(4), student, target, row_lse, 1.0),
            test_utils=FAKE_CHECKS)
    x = torch.randn(1, 2, 4, 6, 6).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    weight, bias = torch.randn(1, 4), torch.randn(1, 4)
    y, stats = ops.group_norm_forward(x, weight, bias, 2, 1e-5, True, True)
    grad_y = torch.randn(1, 2, 4, 3, 3).transpose(3, 4)
    opcheck(ops.group_norm_backward.default, (grad_y, x, weight, bias, stats, 2, True, True), test_utils=FAKE_CHECKS)
    opcheck(ops.group_norm_double_backward.default,
            (torch.randn_like(x), weight, bias, grad_y, x, weight, bias, stats, 2, True, True), test_utils=FAKE_CHECKS)
    u = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1).t().unsqueeze(0)
    labels = torch.arange(4).repeat_interleave(2)[None]
    _, stats = ops.ntxent_forward(u, labels, 2.0, "in")
    opcheck(ops.ntxent_backward.default, (torch.ones(1), u, labels, stats, 2.0, "in"), test_utils=FAKE_CHECKS)
    opcheck(ops.ntxent_double_backward.default, (torch.randn(1, 16, 8).transpose(1, 2), torch.ones(1).expand(1),
                                                 u, labels, stats, 2.0, "in"), test_utils=FAKE_CHECKS)


@needs_cpp
def test_compiled_group_norm_of_a_channels_last_input():
    x = channels_last(torch.randn(2, 4, 6, 6)).requires_grad_()
    weight, bias = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    probe = torch.randn(2, 4, 3, 3)
    compiled_equals_eager(lambda x, w, b: (group_norm(x, w, b, 2, relu=True, pool=True, backend="cpu") * probe).sum(),
                          [x, weight, bias])


@needs_cpp
def test_compiled_kl_bootstrap_of_a_transposed_student():
    student, target = torch.randn(6, 4).t().requires_grad_(), torch.randn(4, 6)
    compiled_equals_eager(lambda s: kl_bootstrap(s, target, 2.0, backend="cpu"), [student])


@needs_cpp
def test_compiled_sgd_step_of_channels_last_params_and_without_grad():
    param, grad = channels_last(torch.randn(2, 3, 4, 5)).requires_grad_(), torch.randn(2, 3, 4, 5)
    probe = torch.randn(2, 3, 4, 5)
    compiled_equals_eager(lambda p: (sgd_unroll_step([p], [grad], 0.1, backend="cpu")[0] * probe).sum(), [param])
    step = torch.compile(lambda p, g: sgd_unroll_step([p], [g], 0.1, backend="cpu")[0], fullgraph=True)
    plain = torch.randn(7)
    torch.testing.assert_close(step(plain, grad.flatten()[:7]), plain - 0.1 * grad.flatten()[:7])
    with torch.no_grad():
        leaf = plain.clone().requires_grad_()
        torch.testing.assert_close(step(leaf, grad.flatten()[:7]), plain - 0.1 * grad.flatten()[:7])


@needs_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
def test_compiled_tensor_temperature_and_lr(requires_grad):
    z = torch.randn(8, 16, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2)
    temperature = torch.tensor(0.5, requires_grad=requires_grad)
    leaves = [z, temperature] if requires_grad else [z]
    compiled_equals_eager(lambda z, *t: ntxent(z, labels, t[0] if t else temperature, backend="cpu"), leaves)
    lr = torch.tensor(0.3, requires_grad=requires_grad)
    param, grad = torch.randn(5, requires_grad=True), torch.randn(5)
    compiled_equals_eager(lambda p, *r: sgd_unroll_step([p], [grad], r[0] if r else lr, backend="cpu")[0].square().sum(),
                          [param, lr] if requires_grad else [param])
    if not requires_grad:
        student, target = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
        compiled_equals_eager(lambda s: kl_bootstrap(s, target, torch.tensor(1.7), backend="cpu"), [student])


@needs_cpp
def test_compiled_bad_tensor_temperature_fails_when_run():
    z, labels = torch.randn(8, 16), torch.arange(4).repeat_interleave(2)
    loss = torch.compile(lambda z, t: ntxent(z, labels, t, backend="cpu"), fullgraph=True)
    assert torch.isfinite(loss(z, torch.tensor(0.5)))
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        loss(z, torch.tensor(-0.5))
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        ntxent(z, labels, torch.tensor(0.0), backend="cpu")  # eager: the ValueError, as for a number
    assert bmssl.ntxent is ntxent
