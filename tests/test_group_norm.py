"""The fused GroupNorm (+ ReLU) (+ 2x2 max-pool) op against its twin (F.group_norm, relu,
max_pool2d): output, gradient and Hessian-vector product on hypothesis-drawn shapes (odd sizes,
one group, one sample), the op contract (opcheck, gradcheck, gradgradcheck, vmap over tasks with
per-task affine, torch.compile) and the edges (bad input, NaN and overflow)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bmssl
from bmssl import backends, reference
from bmssl.ops.group_norm import SUPPORT
from tolerances import assert_close_to_oracle

CPU = torch.device("cpu")
FLAGS = [(False, False), (True, False), (False, True), (True, True)]


def test_cpu_backend_serves_fp32_and_fp64_only():
    for dtype in (torch.float32, torch.float64):
        assert backends.input_reason("cpu", SUPPORT, CPU, dtype) is None, backends.status()
    assert "take" in backends.input_reason("cpu", SUPPORT, CPU, torch.float16)
    assert backends.choose(SUPPORT, CPU, torch.float16) == "torch"


def inputs(n, c, h, w, dtype, generator):
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(c, generator=generator, dtype=torch.float64)
    bias = torch.randn(c, generator=generator, dtype=torch.float64)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def value_grad_hvp(fn, tensors, upstream, directions):
    """y, the gradients of <y, upstream> and the Hessian-vector product along `directions`."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    y = fn(*tensors)
    grads = torch.autograd.grad(y, tensors, upstream.to(y.dtype), create_graph=True)
    inner = sum((g * d.to(g.dtype)).sum() for g, d in zip(grads, directions))
    hvps = torch.autograd.grad(inner, tensors, allow_unused=True)
    hvps = [torch.zeros_like(t) if h is None else h for h, t in zip(hvps, tensors)]
    return [y, *grads, *hvps]


def compare(x, weight, bias, groups, relu, pool, generator):
    dtype = x.dtype

    def fused(*t):
        return bmssl.ops.group_norm(*t, groups, 1e-5, relu, pool, backend="cpu")

    def twin(*t):
        return reference.group_norm(*t, groups, 1e-5, relu, pool)

    out_shape = twin(x, weight, bias).shape
    upstream = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (x, weight, bias)]
    oracle = value_grad_hvp(twin, [t.double() for t in (x, weight, bias)], upstream, directions)
    twin_low = value_grad_hvp(twin, [x, weight, bias], upstream, directions)
    got = value_grad_hvp(fused, [x, weight, bias], upstream, directions)
    names = ["y", "grad x", "grad weight", "grad bias", "hvp x", "hvp weight", "hvp bias"]
    # sums over a group of m values: an fp32 result carries m-fold rounding of its terms
    scale = float(x.shape[1] // groups * x.shape[2] * x.shape[3]) ** 0.5
    for name, g, o, t in zip(names, got, oracle, twin_low):
        assert g.dtype == dtype and g.shape == o.shape, name
        assert_close_to_oracle(g, o, t, dtype, f"relu={relu} pool={pool} {name}", scale)


@given(n=st.integers(1, 3), group_channels=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]),
       h=st.integers(2, 9), w=st.integers(2, 9), flags=st.sampled_from(FLAGS),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_twin_on_drawn_shapes(n, group_channels, groups, h, w, flags, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x, weight, bias = inputs(n, group_channels * groups, h, w, dtype, generator)
    compare(x, weight, bias, groups, *flags, generator)


@pytest.mark.parametrize("relu,pool", FLAGS)
def test_conv4_sized_layer_in_fp32(relu, pool):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = inputs(5, 16, 21, 21, torch.float32, generator)
    compare(x, weight, bias, 8, relu, pool, generator)


@pytest.mark.parametrize("relu,pool", FLAGS)
def test_gradcheck_and_gradgradcheck(relu, pool):
    generator = torch.Generator().manual_seed(2)
    tensors = [t.requires_grad_() for t in inputs(2, 4, 5, 3, torch.float64, generator)]

    def fn(*t):
        return bmssl.ops.group_norm(*t, 2, 1e-5, relu, pool, backend="cpu")

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


def test_non_contiguous_input():
    generator = torch.Generator().manual_seed(3)
    x, weight, bias = inputs(3, 4, 6, 8, torch.float64, generator)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_t.is_contiguous()
    torch.testing.assert_close(bmssl.ops.group_norm(x_t, weight, bias, 2, relu=True, pool=True, backend="cpu"),
                               reference.group_norm(x, weight, bias, 2, relu=True, pool=True))


@pytest.mark.parametrize("relu,pool", [(False, False), (True, True)])
def test_opcheck_raw_ops(relu, pool):
    generator = torch.Generator().manual_seed(4)
    x, weight, bias = inputs(2, 4, 6, 5, torch.float32, generator)
    x, weight, bias = x[None].requires_grad_(), weight[None].requires_grad_(), bias[None].requires_grad_()
    ops = torch.ops.bmssl
    torch.library.opcheck(ops.group_norm_forward.default, (x, weight, bias, 2, 1e-5, relu, pool))
    y, stats = ops.group_norm_forward(x, weight, bias, 2, 1e-5, relu, pool)
    grad_y = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(ops.group_norm_backward.default, (grad_y, x, weight, bias, stats, 2, relu, pool))
    gg = (torch.randn_like(x), torch.randn_like(weight), torch.randn_like(bias))
    torch.library.opcheck(ops.group_norm_double_backward.default,
                          (*gg, grad_y.detach(), x.detach(), weight.detach(), bias.detach(), stats, 2, relu, pool))


def test_vmap_over_tasks_with_per_task_affine_equals_a_loop():
    """The engine's pattern: vmap over tasks of a grad and of a grad-of-grad, each task with its
    own affine (the inner loop's fast weights)."""
    generator = torch.Generator().manual_seed(5)
    tasks = [inputs(3, 4, 6, 6, torch.float64, generator) for _ in range(3)]
    xs, weights, biases = (torch.stack(column) for column in zip(*tasks))

    def loss(x, weight, bias, backend):
        y = bmssl.ops.group_norm(x, weight, bias, 2, relu=True, pool=True, backend=backend)
        return (y.sin() * y).sum()

    def grad_norm(x, weight, bias, backend):
        grads = torch.func.grad(loss, argnums=(0, 1, 2))(x, weight, bias, backend)
        return sum(g.square().sum() for g in grads)

    for fn in (loss, grad_norm):
        second = torch.func.grad(fn, argnums=(0, 1, 2))
        batched = torch.func.vmap(second, in_dims=(0, 0, 0, None))(xs, weights, biases, "cpu")
        looped = [second(x, w, b, "torch") for x, w, b in tasks]
        for got, expected in zip(batched, zip(*looped)):
            torch.testing.assert_close(got, torch.stack(expected))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(6)
    x, weight, bias = (t.requires_grad_() for t in inputs(2, 4, 6, 6, torch.float32, generator))

    @torch.compile(fullgraph=True)
    def compiled(x, weight, bias):
        return bmssl.ops.group_norm(x, weight, bias, 2, relu=True, pool=True, backend="cpu").square().sum()

    value = compiled(x, weight, bias)
    expected = reference.group_norm(x, weight, bias, 2, relu=True, pool=True).square().sum()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(torch.autograd.grad(value, x)[0], torch.autograd.grad(expected, x)[0])


def test_third_derivative_raises_clearly():
    generator = torch.Generator().manual_seed(7)
    x, weight, bias = (t.requires_grad_() for t in inputs(2, 4, 4, 4, torch.float64, generator))
    y = bmssl.ops.group_norm(x, weight, bias, 2, relu=True, backend="cpu")
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice differentiable"):
        torch.autograd.grad(hvp.sum(), x)


def test_non_finite_input_or_overflowing_variance_gives_nan_not_a_finite_value():
    generator = torch.Generator().manual_seed(8)
    x, weight, bias = inputs(2, 4, 4, 4, torch.float32, generator)
    x[0, 0, 1, 1] = float("nan")
    x[1, 3, 0, 0] = 3e19  # (x - mean)^2 passes fp32's range: the variance overflows
    y = bmssl.ops.group_norm(x, weight, bias, 2, relu=True, pool=True, backend="cpu")
    assert y[0, :2].isnan().all() and y[1, 2:].isnan().all()  # the groups holding them
    assert y[0, 2:].isfinite().all() and y[1, :2].isfinite().all()  # the others are untouched


@pytest.mark.parametrize("case,message", [
    (lambda x, w, b: (x[0], w, b, 2), "must be \\[N, C, H, W\\]"),
    (lambda x, w, b: (x, w[:3], b, 2), "weight must be \\[C\\]"),
    (lambda x, w, b: (x, w, b.double(), 2), "bias is torch.float64"),
    (lambda x, w, b: (x, w, b, 3), "groups must be a positive integer dividing C"),
    (lambda x, w, b: (x, w, b, 0), "groups must be"),
    (lambda x, w, b: (x.int(), w, b, 2), "x must be float16"),
    (lambda x, w, b: (x[:0], w, b, 2), "empty input"),
])
def test_bad_input_raises_value_error(case, message):
    generator = torch.Generator().manual_seed(9)
    x, weight, bias = inputs(2, 4, 4, 4, torch.float32, generator)
    with pytest.raises(ValueError, match=message):
        bmssl.ops.group_norm(*case(x, weight, bias))


def test_bad_eps_and_a_pool_too_small_raise():
    generator = torch.Generator().manual_seed(10)
    x, weight, bias = inputs(2, 4, 1, 4, torch.float32, generator)
    with pytest.raises(ValueError, match="eps must be"):
        bmssl.ops.group_norm(x, weight, bias, 2, eps=0.0)
    with pytest.raises(ValueError, match="pool needs H, W >= 2"):
        bmssl.ops.group_norm(x, weight, bias, 2, pool=True)


def test_explicit_cpu_backend_for_fp16_says_why():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float16)
    with pytest.raises(bmssl.ops.BackendUnavailableError, match="cpu kernels of group_norm take"):
        bmssl.ops.group_norm(x, torch.ones(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16), 2,
                             backend="cpu")
