"""The fused GroupNorm (+ ReLU) (+ 2x2 max-pool) op against its twin (F.group_norm, relu,
max_pool2d): output, gradient and Hessian-vector product on hypothesis-drawn shapes (odd sizes,
one group, one sample), the op contract (opcheck, gradcheck, gradgradcheck, vmap over tasks with
per-task affine, torch.compile) and the edges (bad input, NaN and overflow, tied windows). The
C++ CPU backend is checked in fp32 / fp64; the Triton backend in its interpreter on small shapes
in fp32 / fp16 / bf16 (the compiled kernels and Conv4-sized layers on a GPU)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bmssl
from bmssl import backends, reference
from bmssl.ops.group_norm import SUPPORT
from tolerances import assert_close_to_oracle

CPU = torch.device("cpu")
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
# the Triton interpreter serves CPU tensors unless BMSSL_TEST_TRITON_GPU=1 compiles for a GPU
TRITON_ON_CPU = backends.input_reason("triton", SUPPORT, CPU, torch.float32) is None
CPU_BACKENDS = ["cpu"] + ["triton"] * TRITON_ON_CPU
needs_triton_on_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs on the GPU here, not in its "
                                         "interpreter: see the gpu tests")


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
    """y, the gradients of <y, upstream> and the Hessian-vector product along `directions`:
    the gradient of <grads, directions> with respect to the inputs and to `upstream` (that one
    is d grad_y of the double backward; a meta-gradient needs it where grad_y depends on later
    layers' weights)."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    upstream = upstream.detach().to(tensors[0].dtype).requires_grad_()
    y = fn(*tensors)
    grads = torch.autograd.grad(y, tensors, upstream, create_graph=True)
    inner = sum((g * d.to(g.dtype)).sum() for g, d in zip(grads, directions))
    hvps = torch.autograd.grad(inner, [*tensors, upstream], allow_unused=True)
    hvps = [torch.zeros_like(t) if h is None else h for h, t in zip(hvps, [*tensors, upstream])]
    return [y, *grads, *hvps]


def compare(x, weight, bias, groups, relu, pool, generator, backend="cpu", twin_sets_tolerance=True):
    """Value, gradient and HVP of `backend` against the fp64 twin, within twice the error of
    the twin in x's dtype (or, with twin_sets_tolerance=False, within the dtype's floor alone)."""
    dtype = x.dtype

    def fused(*t):
        return bmssl.ops.group_norm(*t, groups, 1e-5, relu, pool, backend=backend)

    def twin(*t):
        return reference.group_norm(*t, groups, 1e-5, relu, pool)

    out_shape = twin(x, weight, bias).shape
    upstream = torch.randn(out_shape, generator=generator, dtype=torch.float64).to(x.device)
    directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(x.device)
                  for t in (x, weight, bias)]
    oracle = value_grad_hvp(twin, [t.double() for t in (x, weight, bias)], upstream, directions)
    twin_low = value_grad_hvp(twin, [x, weight, bias], upstream, directions) if twin_sets_tolerance else oracle
    got = value_grad_hvp(fused, [x, weight, bias], upstream, directions)
    names = ["y", "grad x", "grad weight", "grad bias", "hvp x", "hvp weight", "hvp bias", "hvp grad_y"]
    # the weight and bias terms are sums over n, h, w: an fp32 sum of k terms carries about
    # sqrt(k) roundings of them; the others are per element (their group means are exact enough)
    channel_sum = float(x.shape[0] * x.shape[2] * x.shape[3]) ** 0.5
    for name, g, o, t in zip(names, got, oracle, twin_low):
        assert g.dtype == dtype and g.shape == o.shape, name
        scale = channel_sum if ("weight" in name or "bias" in name) else 1.0
        assert_close_to_oracle(g, o, t, dtype, f"{backend} relu={relu} pool={pool} {name}", scale)


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


# (backend, dtype, assert_close tolerances): each backend in its most exact dtype
EXACT = [("cpu", torch.float64, {})] + [("triton", torch.float32, dict(atol=1e-4, rtol=1e-4))] * TRITON_ON_CPU


@pytest.mark.parametrize("backend,dtype,tolerance", EXACT)
def test_non_contiguous_input(backend, dtype, tolerance):
    generator = torch.Generator().manual_seed(3)
    x, weight, bias = inputs(3, 4, 6, 8, dtype, generator)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_t.is_contiguous()
    torch.testing.assert_close(bmssl.ops.group_norm(x_t, weight, bias, 2, relu=True, pool=True, backend=backend),
                               reference.group_norm(x, weight, bias, 2, relu=True, pool=True), **tolerance)


def opcheck_ops(forward, backward, double_backward, relu, pool, device="cpu"):
    """torch.library.opcheck of one backend's three raw ops on a small [1, 2, 4, 6, 5] input."""
    generator = torch.Generator().manual_seed(4)
    x, weight, bias = (t.to(device) for t in inputs(2, 4, 6, 5, torch.float32, generator))
    x, weight, bias = x[None].requires_grad_(), weight[None].requires_grad_(), bias[None].requires_grad_()
    torch.library.opcheck(forward, (x, weight, bias, 2, 1e-5, relu, pool))
    y, stats = forward(x, weight, bias, 2, 1e-5, relu, pool)
    grad_y = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(backward, (grad_y, x, weight, bias, stats, 2, relu, pool))
    gg = (torch.randn_like(x), torch.randn_like(weight), torch.randn_like(bias))
    torch.library.opcheck(double_backward,
                          (*gg, grad_y.detach(), x.detach(), weight.detach(), bias.detach(), stats, 2, relu, pool))


@pytest.mark.parametrize("relu,pool", [(False, False), (True, True)])
def test_opcheck_raw_ops(relu, pool):
    ops = torch.ops.bmssl
    opcheck_ops(ops.group_norm_forward.default, ops.group_norm_backward.default,
                ops.group_norm_double_backward.default, relu, pool)


@pytest.mark.parametrize("backend,dtype,tolerance", EXACT)
def test_vmap_over_tasks_with_per_task_affine_equals_a_loop(backend, dtype, tolerance):
    """The engine's pattern: vmap over tasks of a grad and of a grad-of-grad, each task with its
    own affine (the inner loop's fast weights)."""
    generator = torch.Generator().manual_seed(5)
    count, batch = (3, 3) if backend == "cpu" else (2, 2)  # the Triton interpreter is slow
    tasks = [inputs(batch, 4, 6, 6, dtype, generator) for _ in range(count)]
    xs, weights, biases = (torch.stack(column) for column in zip(*tasks))

    def loss(x, weight, bias, backend):
        y = bmssl.ops.group_norm(x, weight, bias, 2, relu=True, pool=True, backend=backend)
        return (y.sin() * y).sum()

    def grad_norm(x, weight, bias, backend):
        grads = torch.func.grad(loss, argnums=(0, 1, 2))(x, weight, bias, backend)
        return sum(g.square().sum() for g in grads)

    for fn in (loss, grad_norm):
        second = torch.func.grad(fn, argnums=(0, 1, 2))
        batched = torch.func.vmap(second, in_dims=(0, 0, 0, None))(xs, weights, biases, backend)
        looped = [second(x, w, b, "torch") for x, w, b in tasks]
        for got, expected in zip(batched, zip(*looped)):
            torch.testing.assert_close(got, torch.stack(expected), **tolerance)


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
    with pytest.raises(NotImplementedError, match="twice differentiable"):
        torch.autograd.grad(hvp.sum(), x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_non_finite_input_gives_nan_not_a_finite_value(backend):
    generator = torch.Generator().manual_seed(8)
    x, weight, bias = inputs(2, 4, 4, 4, torch.float32, generator)
    x[0, 0, 1, 1] = float("nan")
    x[1, 3, 0, 0] = float("inf")
    y = bmssl.ops.group_norm(x, weight, bias, 2, relu=True, pool=True, backend=backend)
    assert y[0, :2].isnan().all() and y[1, 2:].isnan().all()  # the groups holding them
    assert y[0, 2:].isfinite().all() and y[1, :2].isfinite().all()  # the others are untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_inf_gradient_at_an_output_relu_zeroed_leaves_no_nan(backend):
    """d sqrt(y)/dy is Inf where relu made y = 0: those outputs depend on nothing, so grad_x and
    the double backward stay finite, as the twin's are (the CPU pooled routing once stored
    0 * Inf = NaN over such a window, and the double backward spread it over the group)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 4, generator=generator, dtype=torch.float64).to(torch.float32 if backend == "triton"
                                                                             else torch.float64)
    weight, bias = torch.ones(2, dtype=x.dtype), torch.full((2,), -0.5, dtype=x.dtype)
    x.requires_grad_(), weight.requires_grad_()
    y = bmssl.ops.group_norm(x, weight, bias, 1, relu=True, pool=True, backend=backend)
    assert (y == 0).any() and (y > 0).any()
    grad_y = torch.where(y.detach() == 0, float("inf"), 1.0)
    grad_x, grad_w = torch.autograd.grad(y, (x, weight), grad_y, create_graph=True)
    hvp_x, hvp_w = torch.autograd.grad((grad_x * torch.randn(grad_x.shape, generator=generator, dtype=x.dtype)).sum()
                                       + grad_w.sum(), (x, weight))
    for t in (grad_x, grad_w, hvp_x, hvp_w):
        assert t.isfinite().all()


@pytest.mark.parametrize("side", [1024])
def test_a_large_plane_keeps_fp32_accuracy(side):
    """One fp32 sum per plane lost accuracy in proportion to its size: at 1024x1024 the CPU
    kernel's y was off by 1.8e-5 (torch's fp32 GroupNorm: 6e-7); now by chunks of 512 in fp32,
    added in fp64."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, side, side, generator=generator, dtype=torch.float64) + 1.0
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    exact = reference.group_norm(x, one, zero, 1)
    twin = reference.group_norm(x.float(), one.float(), zero.float(), 1).double()
    got = bmssl.ops.group_norm(x.float(), one.float(), zero.float(), 1, backend="cpu").double()
    assert (got - exact).abs().max() <= max(3 * (twin - exact).abs().max(), 2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_a_mean_that_overflows_fp32_sums_is_still_found(backend):
    """Finite fp32 x near fp32's max (+-2e38): the sums of x - x_0 overflow, and so did the
    plain sum of x taken instead. Summing x / m keeps the mean finite; the output equals the
    fp64 twin's, where torch's fp32 GroupNorm gives NaN."""
    generator = torch.Generator().manual_seed(5)
    x = torch.cat([torch.full((8,), 2e38), torch.full((8,), -2e38)]).double()
    x = (x + torch.randn(16, generator=generator, dtype=torch.float64) * 1e37).reshape(1, 1, 4, 4)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    exact = reference.group_norm(x, one, zero, 1)
    got = bmssl.ops.group_norm(x.float(), one.float(), zero.float(), 1, backend=backend)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@needs_triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_groups_far_from_zero_keep_their_accuracy(dtype):
    """A group whose mean (100) is large beside its spread (1): stats rounded to x's dtype put
    the mean off by up to half an ulp (0.25 in bf16 at 100), far past the tolerances (bf16
    error 0.39 where the twin's is 0.008); the stats are fp32 now."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64) + 100.0).to(dtype)
    weight = torch.randn(4, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(4, generator=generator, dtype=torch.float64).to(dtype)
    compare(x, weight, bias, 2, False, False, generator, backend="triton")
    _, stats = torch.ops.bmssl.group_norm_forward_triton(x[None], weight[None], bias[None], 2, 1e-5, False, False)
    assert stats.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eps", [1e-5, 1e-10])
def test_a_constant_group_normalises_to_exactly_zero(backend, eps):
    """A constant group has mean = its value and variance 0: x̂ = 0 exactly, and y = (x - mean)·scale
    + b = b (weight 1, bias 0). Summing x itself in fp32 missed the mean by a few ulps, which
    1/sqrt(eps) turned into |y| ~ 2e-4 (eps 1e-5) and 5e-2 (eps 1e-10); the folded affine
    x·scale + (b - mean·scale) left, under fma, the rounding error of mean·scale."""
    generator = torch.Generator().manual_seed(10)
    x, weight, bias = inputs(2, 4, 28, 28, torch.float32, generator)
    x[1, :2] = 0.3
    weight[:2], bias[:2] = 1.0, 0.0
    y = bmssl.ops.group_norm(x, weight, bias, 2, eps=eps, backend=backend)
    assert torch.equal(y[1, :2], torch.zeros(2, 28, 28))
    exact = bmssl.reference.group_norm(x.double(), weight.double(), bias.double(), 2, eps=eps)
    torch.testing.assert_close(y, exact.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("relu, pool", [(True, True), (True, False), (False, True)])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_a_nan_affine_entry_gives_a_nan_channel(backend, which, relu, pool):
    """relu(NaN) is NaN, and so is a pooled window of NaN: with relu and pool together the mask
    `not (max > 0)` once turned that channel into zeros."""
    generator = torch.Generator().manual_seed(9)
    x, weight, bias = inputs(1, 4, 4, 4, torch.float32, generator)
    (weight if which == "weight" else bias)[0] = float("nan")
    y = bmssl.ops.group_norm(x, weight, bias, 2, relu=relu, pool=pool, backend=backend)
    assert y[0, 0].isnan().all() and y[0, 1:].isfinite().all()
    twin = bmssl.reference.group_norm(x, weight, bias, 2, relu=relu, pool=pool)
    assert twin[0, 0].isnan().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spike", [3e19, -1e30, 3e38])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_a_variance_past_fp32s_range_is_normalised_like_fp64(backend, spike):
    """(x - mean)^2 overflows fp32 past |x - mean| = 1.8e19; the variance (up to ~1e76) is then
    summed scaled by max |x - mean|, and the group comes out as fp64's, forward and backward."""
    generator = torch.Generator().manual_seed(8)
    x, weight, bias = inputs(2, 4, 4, 4, torch.float32, generator)
    x[1, 3, 0, 0] = spike
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    y = bmssl.ops.group_norm(x, weight, bias, 2, relu=True, backend=backend)
    exact = bmssl.reference.group_norm(*(t.double() for t in (x, weight, bias)), 2, relu=True)
    torch.testing.assert_close(y, exact.float(), rtol=1e-5, atol=1e-5)
    grad_y = torch.randn(y.shape, generator=generator)
    got = torch.autograd.grad(y, (x, weight, bias), grad_y)
    want = torch.autograd.grad(exact, (x, weight, bias), grad_y.double())
    for g, w in zip(got, want):
        assert g.isfinite().all()
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4 * w.abs().max().item())


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu,pool", [(False, True), (True, True)])
def test_tied_windows_route_to_the_first_maximum(backend, relu, pool):
    """Windows whose maximum repeats (x0 == x1 and x2 == x3, or all four equal) route the
    gradient to the first, as max_pool2d does. Judged against the fp64 twin with the floor
    alone: a twin that routed elsewhere in fp32 would widen its own tolerance."""
    generator = torch.Generator().manual_seed(13)
    x, weight, bias = inputs(2, 4, 3, 3, torch.float32, generator)
    for tied in (x.repeat_interleave(2, 3), x.repeat_interleave(2, 2).repeat_interleave(2, 3)):
        compare(tied, weight, bias, 2, relu, pool, generator, backend, twin_sets_tolerance=False)


# ---- the Triton backend in its interpreter: small shapes, the interpreter is slow ----------

@needs_triton_on_cpu
def test_triton_backend_serves_fp16_bf16_fp32_but_not_fp64():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert backends.input_reason("triton", SUPPORT, CPU, dtype) is None, backends.status()
    with pytest.raises(bmssl.ops.BackendUnavailableError, match="triton kernels of group_norm take"):
        x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
        bmssl.ops.group_norm(x, torch.ones(4, dtype=x.dtype), torch.zeros(4, dtype=x.dtype), 2, backend="triton")


TRITON_SHAPES = [(2, 4, 5, 7, 2), (1, 3, 7, 4, 3), (3, 6, 4, 5, 1)]  # (n, c, h, w, groups): groups = C, 1


@needs_triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 is exact here
@pytest.mark.parametrize("relu,pool", FLAGS)
def test_triton_matches_twin(relu, pool, dtype):
    generator = torch.Generator().manual_seed(11)
    for n, c, h, w, groups in TRITON_SHAPES:
        x, weight, bias = inputs(n, c, h, w, dtype, generator)
        compare(x, weight, bias, groups, relu, pool, generator, backend="triton")


@needs_triton_on_cpu
@pytest.mark.parametrize("relu,pool", FLAGS)
def test_triton_walks_a_plane_larger_than_its_block(relu, pool):
    """A 33 x 35 plane > BLOCK = 1024: every loop takes two blocks, the last one partial."""
    generator = torch.Generator().manual_seed(14)
    x, weight, bias = inputs(1, 2, 33, 35, torch.float32, generator)
    compare(x, weight, bias, 1, relu, pool, generator, backend="triton")


@needs_triton_on_cpu
@settings(max_examples=8)
@given(n=st.integers(1, 2), group_channels=st.integers(1, 3), groups=st.sampled_from([1, 2]),
       h=st.integers(2, 9), w=st.integers(2, 9), flags=st.sampled_from(FLAGS), seed=st.integers(0, 2**16))
def test_triton_matches_twin_on_drawn_shapes(n, group_channels, groups, h, w, flags, seed):
    generator = torch.Generator().manual_seed(seed)
    x, weight, bias = inputs(n, group_channels * groups, h, w, torch.float32, generator)
    compare(x, weight, bias, groups, *flags, generator, backend="triton")


@needs_triton_on_cpu
@pytest.mark.parametrize("relu,pool", [(False, False), (True, True)])
def test_opcheck_triton_ops(relu, pool):
    ops = torch.ops.bmssl
    opcheck_ops(ops.group_norm_forward_triton.default, ops.group_norm_backward_triton.default,
                ops.group_norm_double_backward_triton.default, relu, pool)


# ---- on a GPU: the compiled Triton kernels, bf16 included, and Conv4-sized layers ------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("relu,pool", FLAGS)
def test_gpu_triton_matches_twin(relu, pool, dtype):
    generator = torch.Generator().manual_seed(12)
    for n, c, h, w, groups in [*TRITON_SHAPES, (5, 16, 21, 21, 8), (2, 32, 42, 42, 16), (2, 8, 84, 84, 4)]:
        x, weight, bias = (t.cuda() for t in inputs(n, c, h, w, dtype, generator))
        compare(x, weight, bias, groups, relu, pool, generator, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("relu,pool", [(False, False), (True, True)])
def test_gpu_opcheck_triton_ops_and_non_finite_groups(relu, pool):
    ops = torch.ops.bmssl
    opcheck_ops(ops.group_norm_forward_triton.default, ops.group_norm_backward_triton.default,
                ops.group_norm_double_backward_triton.default, relu, pool, device="cuda")
    x = torch.randn(2, 4, 4, 4, device="cuda")
    x[0, 0, 1, 1] = float("nan")
    x[1, 3, 0, 0] = float("inf")  # (3e19 here once, before overflowing squares were rescaled: now finite)
    y = bmssl.ops.group_norm(x, torch.ones(4, device="cuda"), torch.zeros(4, device="cuda"), 2, relu=relu,
                             pool=pool, backend="triton")
    assert y[0, :2].isnan().all() and y[1, 2:].isnan().all()
    assert y[0, 2:].isfinite().all() and y[1, :2].isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("eps", [1e-5, 1e-10])
def test_gpu_triton_normalises_a_constant_group_to_exactly_zero(eps):
    """The compiled kernels round with a real fma: (x - mean)·scale + b is exactly b at x = mean,
    where x·scale + (b - mean·scale) kept mean·scale's rounding error (the interpreter does not fuse)."""
    generator = torch.Generator().manual_seed(10)
    x, weight, bias = (t.cuda() for t in inputs(2, 4, 28, 28, torch.float32, generator))
    x[1, :2] = 0.3
    weight[:2], bias[:2] = 1.0, 0.0
    y = bmssl.ops.group_norm(x, weight, bias, 2, eps=eps, backend="triton")
    assert torch.equal(y[1, :2], torch.zeros(2, 28, 28, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_half_precision_groups_far_from_zero(dtype):
    """fp32 stats on the GPU too: groups with mean 100 and spread 1, Conv4-sized."""
    generator = torch.Generator().manual_seed(13)
    x, weight, bias = inputs(4, 32, 42, 42, torch.float64, generator)
    x, weight, bias = ((x + 100.0).to(dtype).cuda(), weight.to(dtype).cuda(), bias.to(dtype).cuda())
    for relu, pool in FLAGS:
        compare(x, weight, bias, 8, relu, pool, generator, backend="triton")
