"""The fused NT-Xent on every backend that serves it, against the twin: loss, gradient and
Hessian-vector product on hypothesis-drawn shapes, the op contract (opcheck, gradcheck,
gradgradcheck, torch.func, torch.compile) and the numerics at the edges."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import bmssl
from bmssl import backends, reference
from bmssl.ops.ntxent import SUPPORT
from tolerances import assert_close_to_oracle

CPU = torch.device("cpu")
CPU_BACKENDS = [b for b in SUPPORT.backends if backends.input_reason(b, SUPPORT, CPU, torch.float32) is None]


def random_labels(tasks, batch, classes, generator):
    """[T, B] labels in [0, B), each label present at least twice."""
    classes = max(1, min(classes, batch // 2))
    rows = []
    for _ in range(tasks):
        labels = torch.cat([torch.arange(classes), torch.arange(classes),
                            torch.randint(0, classes, (batch - 2 * classes,), generator=generator)])
        rows.append(labels[torch.randperm(batch, generator=generator)])
    return torch.stack(rows)


def value_grad_hvp(loss_fn, z, upstream, direction):
    """loss, d loss / dz . upstream, and the Hessian-vector product H direction."""
    z = z.detach().requires_grad_()
    loss = loss_fn(z)
    (grad,) = torch.autograd.grad(loss, z, upstream.to(loss.dtype), create_graph=True)
    (hvp,) = torch.autograd.grad(grad, z, direction.to(grad.dtype))
    return loss, grad, hvp


def compare(backend, z, labels, temperature, variant, normalize=True):
    dtype = z.dtype
    upstream = torch.randn((), dtype=torch.float64, device=z.device)
    direction = torch.randn(z.shape, dtype=torch.float64, device=z.device)

    def fused(x):
        return bmssl.ntxent(x, labels, temperature, variant, normalize, backend=backend)

    def twin(x):
        return reference.ntxent(x, labels, temperature, variant, normalize)

    oracle = value_grad_hvp(twin, z.double(), upstream, direction)
    twin_low = value_grad_hvp(twin, z, upstream, direction)
    got = value_grad_hvp(fused, z, upstream, direction)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    scale = 1.0 / temperature
    for name, g, o, t in zip(("loss", "grad", "hvp"), got, oracle, twin_low):
        assert_close_to_oracle(g, o, t, dtype, f"{backend} {variant} {name}", scale)


@pytest.mark.triton_interpreter
def test_cpu_and_triton_backends_serve_ntxent():
    assert {"cpu", "triton"} <= set(CPU_BACKENDS), backends.status()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(tasks=st.sampled_from([0, 1, 3]), batch=st.integers(2, 75), dim=st.integers(1, 40),
       classes=st.integers(1, 40), temperature=st.floats(0.05, 2.0),
       variant=st.sampled_from(["in", "out"]), normalize=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_twin_fp32(backend, tasks, batch, dim, classes, temperature, variant, normalize, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = random_labels(max(tasks, 1), batch, classes, generator)
    z = torch.randn(max(tasks, 1), batch, dim, generator=generator)
    if tasks == 0:  # the [B, d] form
        z, labels = z[0], labels[0]
    compare(backend, z, labels, temperature, variant, normalize)


# Triton's interpreter computes bf16 dots wrongly (DEVELOPERS.md), and libdevice fp64 is
# unavailable there: on CPU the Triton kernels are checked in fp32 and fp16; bf16 runs on the GPU.
OTHER_DTYPES = [(b, d) for b in CPU_BACKENDS for d in (torch.float64, torch.float16, torch.bfloat16)
                if not (b == "triton" and d in (torch.bfloat16, torch.float64))]


def test_triton_refuses_fp64_with_a_reason():
    with pytest.raises(bmssl.ops.BackendUnavailableError, match="triton kernels of ntxent take"):
        bmssl.ntxent(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), backend="triton")


@pytest.mark.parametrize("backend, dtype", OTHER_DTYPES)
@pytest.mark.parametrize("variant", ["in", "out"])
def test_matches_twin_other_dtypes(backend, dtype, variant):
    generator = torch.Generator().manual_seed(1)
    for batch, dim in [(2, 1), (31, 7), (257, 33)]:
        labels = random_labels(1, batch, batch // 3 + 1, generator)[0]
        z = torch.randn(batch, dim, generator=generator).to(dtype)
        compare(backend, z, labels, 0.2, variant)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["in", "out"])
def test_views_layout_and_two_views(backend, variant):
    views = torch.randn(40, 2, 16)  # M = 2: both variants are plain NT-Xent
    got = bmssl.ntxent_views(views, 0.1, variant, backend=backend)
    expected = reference.ntxent(*reference.views_to_batch(views), 0.1, variant)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def check_low_temperature_near_identical_rows(backend, dtype, device="cpu"):
    """tau = 0.02 with rows that differ by 1e-3: logits near 50 and huge ratios, no NaN/Inf, and
    loss, gradient and HVP as close to the fp64 oracle as compare() demands."""
    base = torch.randn(1, 32, device=device)
    z = (base + 1e-3 * torch.randn(64, 32, device=device)).to(dtype).requires_grad_()
    labels = torch.arange(32, device=device).repeat(2)
    for variant in ("in", "out"):
        loss = bmssl.ntxent(z, labels, 0.02, variant, backend=backend)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (variant, loss)
        compare(backend, z.detach(), labels, 0.02, variant)


LOW_PRECISION = [(b, d) for b in CPU_BACKENDS for d in (torch.float16, torch.bfloat16, torch.float32)
                 if not (b == "triton" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend, dtype", LOW_PRECISION)
def test_low_temperature_near_identical_rows_stay_finite(backend, dtype):
    check_low_temperature_near_identical_rows(backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(backend):
    z = torch.randn(16, 40)[:, ::2]
    labels = torch.arange(8).repeat(2)
    compare(backend, z, labels, 0.5, "in")


@pytest.mark.parametrize("backend", ["cpu"])  # fp64: the C++ kernels (Triton runs fp32 stats)
@pytest.mark.parametrize("variant", ["in", "out"])
def test_gradcheck_and_gradgradcheck(backend, variant):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 9, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = random_labels(2, 9, 3, generator)

    def loss(x):
        return bmssl.ntxent(x, labels, 0.4, variant, backend=backend)

    assert torch.autograd.gradcheck(loss, (z,))
    assert torch.autograd.gradgradcheck(loss, (z,))


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("variant", ["in", "out"])
def test_opcheck_triton_ops(variant):
    generator = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(2, 10, 6, generator=generator), dim=-1).requires_grad_()
    labels = random_labels(2, 10, 4, generator)
    torch.library.opcheck(torch.ops.bmssl.ntxent_forward_triton.default, (u, labels, 3.0, variant))


@pytest.mark.parametrize("variant", ["in", "out"])
def test_opcheck_cpp_ops(variant):
    generator = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(2, 10, 6, generator=generator), dim=-1).requires_grad_()
    labels = random_labels(2, 10, 4, generator)
    torch.library.opcheck(torch.ops.bmssl.ntxent_forward.default, (u, labels, 3.0, variant))
    _, stats = torch.ops.bmssl.ntxent_forward(u, labels, 3.0, variant)
    grad = torch.randn(2, requires_grad=True)
    torch.library.opcheck(torch.ops.bmssl.ntxent_backward.default, (grad, u, labels, stats, 3.0, variant))
    torch.library.opcheck(torch.ops.bmssl.ntxent_double_backward.default,
                          (torch.randn_like(u), grad.detach(), u.detach(), labels, stats, 3.0, variant))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    z = torch.randn(24, 8, requires_grad=True)
    labels = torch.arange(12).repeat(2)

    @torch.compile(fullgraph=True)
    def compiled(x):
        return bmssl.ntxent(x, labels, 0.3, backend="cpu") * 3

    loss = compiled(z) / 3
    (grad,) = torch.autograd.grad(loss, z)
    expected = reference.ntxent(z, labels, 0.3)
    (expected_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_vmap_grad_and_hvp(backend):
    """The engine's pattern: vmap over tasks of grad and of a grad-of-grad, labels unbatched."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    z = torch.randn(3, 12, 5, dtype=dtype)
    labels = torch.arange(6).repeat(2)
    direction = torch.randn(12, 5, dtype=dtype)

    def transforms(loss):
        grad = torch.func.grad(loss)
        hvp = torch.func.grad(lambda x: (grad(x) * direction).sum())
        return torch.func.vmap(grad), torch.func.vmap(hvp)

    fused = transforms(lambda x: bmssl.ntxent(x, labels, 0.3, backend=backend))
    twin = transforms(lambda x: reference.ntxent(x, labels, 0.3))
    atol, rtol = (1e-11, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for got, expected in zip(fused, twin):
        torch.testing.assert_close(got(z), expected(z), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_with_batched_labels_equals_a_loop_over_tasks(backend):
    """Labels batched by vmap: the value checks called .item() and raised under vmap. Now they
    are left to the kernel, as under torch.compile (RuntimeError for an anchor without a positive)."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    z = torch.randn(3, 8, 4, dtype=dtype)
    labels = torch.stack([torch.arange(8) // 2, torch.arange(8) % 4, torch.arange(8) // 4])
    loss = lambda x, y: bmssl.ntxent(x, y, 0.5, backend=backend)  # noqa: E731
    grad = torch.func.grad(loss)
    torch.testing.assert_close(torch.func.vmap(loss)(z, labels), torch.stack([loss(*t) for t in zip(z, labels)]))
    torch.testing.assert_close(torch.func.vmap(grad)(z, labels), torch.stack([grad(*t) for t in zip(z, labels)]))
    if backend == "cpu":
        lonely = labels.clone()
        lonely[1, 0] = 7
        with pytest.raises(RuntimeError, match="anchor 0 of task 1 \\(label 7\\) has no positive"):
            torch.func.vmap(loss)(z, lonely)


def test_third_derivative_is_refused():
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = bmssl.ntxent(z, labels, 0.5, backend="cpu")
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.sum(), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivative"):
        torch.autograd.grad(hvp.sum(), z)


def test_raw_op_rejects_bad_labels_without_crashing():
    u = F.normalize(torch.randn(1, 4, 3), dim=-1)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.bmssl.ntxent_forward(u, torch.tensor([[0, 0, 9, 9]]), 1.0, "in")
    with pytest.raises(RuntimeError, match="has no positive"):
        torch.ops.bmssl.ntxent_forward(u, torch.tensor([[0, 0, 1, 2]]), 1.0, "in")


GPU_BACKENDS = ["cuda", "triton"]
# fp64 on CUDA: the CUDA kernels (Triton keeps fp32 statistics and refuses fp64)
GPU_CASES = [(b, d) for b in GPU_BACKENDS for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
             if not (b == "triton" and d == torch.float64)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype", GPU_CASES)
@pytest.mark.parametrize("variant", ["in", "out"])
def test_gpu_matches_twin(backend, dtype, variant):
    """Loss, gradient and Hessian-vector product (the double backward) against the fp64 twin.
    d = 200 and d = 130 pass one tile depth (128; 64 for the fp64 CUDA kernels), d = 33 is not a
    multiple of 8 (no 16-byte loads), B = 257 and 130 are not multiples of the row tiles."""
    generator = torch.Generator().manual_seed(2)
    for tasks, batch, dim in [(1, 2, 1), (1, 257, 33), (3, 100, 128), (1, 1000, 64), (2, 130, 200),
                              (1, 70, 130)]:
        labels = random_labels(tasks, batch, batch // 3 + 1, generator).cuda()
        z = torch.randn(tasks, batch, dim, generator=generator).cuda().to(dtype)
        compare(backend, z, labels, 0.2, variant)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_low_temperature_near_identical_rows(backend, dtype):
    check_low_temperature_near_identical_rows(backend, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_int64_offsets_when_b_squared_passes_2_31(backend):
    """B = 50,000 rows: B*B > 2^31, so 32-bit index arithmetic would wrap. The twin (which
    builds the 10 GB matrix) is the oracle of the loss and the gradient; the Hessian-vector
    product is checked against a central difference of the twin's gradient along the direction."""
    batch, eps = 50_000, 1e-3
    generator = torch.Generator(device="cuda").manual_seed(3)
    z = torch.randn(batch, 16, device="cuda", generator=generator)
    direction = torch.randn(batch, 16, device="cuda", generator=generator)
    labels = torch.arange(batch // 2, device="cuda").repeat_interleave(2)

    def twin(x):
        return reference.ntxent(x, labels, 0.1)

    def twin_grad(x):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(twin(x), x)[0]

    loss, grad, hvp = value_grad_hvp(lambda x: bmssl.ntxent(x, labels, 0.1, backend=backend), z,
                                     torch.ones((), device="cuda"), direction)
    x = z.clone().requires_grad_()
    expected_loss = twin(x)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(grad.detach(), expected_grad, atol=1e-5, rtol=1e-3)
    difference = (twin_grad(z + eps * direction) - twin_grad(z - eps * direction)) / (2 * eps)
    error = (hvp - difference).norm() / difference.norm()
    assert error < 2e-2, f"{backend}: Hessian-vector product off by {error:.3g} (relative norm)"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["in", "out"])
def test_gpu_cuda_raw_ops_opcheck(variant):
    generator = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(2, 70, 24, generator=generator), dim=-1).cuda().requires_grad_()
    labels = random_labels(2, 70, 20, generator).cuda()
    torch.library.opcheck(torch.ops.bmssl.ntxent_forward.default, (u, labels, 3.0, variant))
    _, stats = torch.ops.bmssl.ntxent_forward(u, labels, 3.0, variant)
    assert stats.dtype == torch.float32 and stats.shape == (2, 2, 70)
    grad = torch.randn(2, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.bmssl.ntxent_backward.default, (grad, u, labels, stats, 3.0, variant))
    torch.library.opcheck(torch.ops.bmssl.ntxent_double_backward.default,
                          (torch.randn_like(u), grad.detach(), u.detach(), labels, stats, 3.0, variant))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_misaligned_rows_take_the_scalar_loads(dtype):
    """A contiguous u whose data starts 2 bytes past an aligned address cannot take 16-byte
    loads; the result must not change."""
    generator = torch.Generator().manual_seed(4)
    u = F.normalize(torch.randn(1, 90, 64, generator=generator), dim=-1).to(dtype).cuda()
    labels = random_labels(1, 90, 30, generator).cuda()
    storage = torch.empty(u.numel() + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view_as(u)
    shifted.copy_(u)
    assert shifted.data_ptr() % 16 != 0
    for variant in ("in", "out"):
        aligned = torch.ops.bmssl.ntxent_forward(u, labels, 5.0, variant)
        got = torch.ops.bmssl.ntxent_forward(shifted, labels, 5.0, variant)
        torch.testing.assert_close(got, aligned, atol=0, rtol=0)
        grad = torch.ones(1, device="cuda")
        torch.testing.assert_close(torch.ops.bmssl.ntxent_backward(grad, shifted, labels, got[1], 5.0, variant),
                                   torch.ops.bmssl.ntxent_backward(grad, u, labels, aligned[1], 5.0, variant),
                                   atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_cuda_takes_every_dtype_on_this_gpu_and_matches_cpu_at_infinite_and_nan_scores():
    """auto's shared-memory check passes on an sm_80 / sm_90 GPU. Raw forward on rows whose
    similarities reach -inf (unnormalised +-3e19: -9e38 overflows fp32) and a NaN row: the
    statistics equal the CPU kernel's, NaN where it has NaN (the online log-sum-exp once gave
    NaN for a -inf term while its max was -inf, and dropped a NaN when every lane's max was)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert backends.input_reason("cuda", SUPPORT, torch.device("cuda"), dtype) is None
    generator = torch.Generator().manual_seed(0)
    with_infinite = torch.randn(1, 40, 8, generator=generator)
    with_infinite[0, 0], with_infinite[0, 1] = 0.0, 0.0
    with_infinite[0, 0, 0], with_infinite[0, 1, 0] = 3e19, -3e19  # s_01 = -9e38: -inf, the only one
    with_nan = torch.randn(1, 40, 8, generator=generator)
    with_nan[0, 5, 3] = float("nan")
    labels = torch.arange(40).remainder(20)[None]
    for u in (with_infinite, with_nan):
        for variant in ("in", "out"):
            want = torch.ops.bmssl.ntxent_forward(u, labels, 1.0, variant)
            got = torch.ops.bmssl.ntxent_forward(u.cuda(), labels.cuda(), 1.0, variant)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.cpu(), w, equal_nan=True)


@pytest.mark.gpu
def test_gpu_cuda_raw_op_rejects_bad_labels():
    u = F.normalize(torch.randn(1, 4, 3, device="cuda"), dim=-1)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.bmssl.ntxent_forward(u, torch.tensor([[0, 0, 9, 9]], device="cuda"), 1.0, "in")
    with pytest.raises(RuntimeError, match=r"anchor 2 of task 0 \(label 1\) has no positive"):
        torch.ops.bmssl.ntxent_forward(u, torch.tensor([[0, 0, 1, 2]], device="cuda"), 1.0, "in")


@pytest.mark.triton_interpreter
def test_triton_refuses_d_past_its_tile():
    from bmssl.triton.ntxent import MAX_DIM

    z, labels = torch.randn(8, MAX_DIM + 1), torch.arange(4).repeat(2)
    with pytest.raises(bmssl.ops.BackendUnavailableError, match=f"d <= {MAX_DIM}, got d = {MAX_DIM + 1}"):
        bmssl.ntxent(z, labels, 0.5, backend="triton")
    small = torch.randn(8, MAX_DIM)
    torch.testing.assert_close(bmssl.ntxent(small, labels, 0.5, backend="triton"),
                               bmssl.ntxent(small, labels, 0.5, backend="torch"))


def test_auto_serves_d_past_the_triton_tile():
    """In auto's CUDA order Triton serves d <= MAX_DIM and is skipped past it (the choice needs
    no GPU: without one the cuda backend is refused for its device, Triton for its shape)."""
    from bmssl.triton.ntxent import MAX_DIM

    cuda = torch.device("cuda")
    if backends.input_reason("cuda", SUPPORT, cuda, torch.float32) is None:
        pytest.skip("the CUDA kernels serve this machine's GPU first, so auto never reaches Triton")
    assert backends.choose(SUPPORT, cuda, torch.float32, shape=(8, MAX_DIM)) == "triton"
    assert backends.choose(SUPPORT, cuda, torch.float32, shape=(8, MAX_DIM + 1)) == "torch"
    z, labels = torch.randn(8, MAX_DIM + 1), torch.arange(4).repeat(2)
    torch.testing.assert_close(bmssl.ntxent(z, labels, 0.5), bmssl.ntxent(z, labels, 0.5, backend="torch"))


def test_gpu_tiles_cover_every_d_up_to_max_dim():
    """Each kernel's GPU tile table ends at MAX_DIM, in rising order, with power-of-two blocks
    (bmssl.triton.aot compiles exactly these; test_triton_aot.py checks their registers)."""
    from bmssl.triton.ntxent import GPU_TILES, MAX_DIM

    assert {kernel for kernel, _ in GPU_TILES} == {"forward", "backward", "double_pass1", "double_pass2"}
    for key, rows in GPU_TILES.items():
        limits = [row[0] for row in rows]
        assert limits == sorted(limits) and limits[-1] == MAX_DIM, key
        for _, block, warps, stages in rows:
            assert block >= 16 and block & (block - 1) == 0 and warps in (1, 2, 4, 8, 16) and stages >= 1, key


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("normalize", [True, False])
def test_learnable_temperature_gets_its_gradient(backend, normalize):
    """A temperature tensor that requires grad is not detached: loss, d/dT and d/dz equal the
    plain formula's with T in the autograd graph (before, T was read with .item() and got no
    gradient, silently). The Triton interpreter runs fp32, the others fp64."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    z = torch.randn(10, 6, dtype=dtype, requires_grad=True)
    labels = torch.arange(5).repeat(2)
    tau = torch.tensor(0.4, dtype=dtype, requires_grad=True)
    loss = bmssl.ntxent(z, labels, tau, "in", normalize, backend=backend)
    got = torch.autograd.grad(loss, (tau, z))
    u = F.normalize(z, dim=-1) if normalize else z
    sim = u @ u.T / tau
    eye = torch.eye(10, dtype=torch.bool)
    positive = (labels[:, None] == labels[None]) & ~eye
    expected_loss = (torch.logsumexp(sim.masked_fill(eye, -torch.inf), 1)
                     - torch.logsumexp(sim.masked_fill(~positive, -torch.inf), 1)).mean()
    expected = torch.autograd.grad(expected_loss, (tau, z))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_zero_rows_and_huge_rows_normalise_like_the_twin(backend):
    """F.normalize in fp16 (eps 1e-12 rounds to 0) made a zero row 0/0 = NaN, and a row whose
    norm passes 65504 (finite entries) inf, so u = 0; the norm is now taken in fp32."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    zero_row = torch.randn(6, 8).half()
    zero_row[0] = 0
    huge = (torch.randn(6, 16).clamp(-2, 2) * 2e4).half()
    for z in (zero_row, huge):
        got = bmssl.ntxent(z, labels, 0.1, backend=backend)
        expected = reference.ntxent(z.double(), labels, 0.1)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.triton_interpreter
def test_triton_interpreter_refuses_bf16_rather_than_computing_it_wrongly():
    with pytest.raises(bmssl.ops.BackendUnavailableError, match="interpreter computes ntxent in torch.bfloat16"):
        bmssl.ntxent(torch.randn(6, 8).bfloat16(), torch.tensor([0, 0, 1, 1, 2, 2]), backend="triton")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                                   torch.uint64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_integer_label_dtype_gives_the_int64_loss(dtype, backend):
    z = torch.randn(8, 6, dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    want = bmssl.ntxent(z, labels, 0.5, backend=backend)
    torch.testing.assert_close(bmssl.ntxent(z, labels.to(dtype), 0.5, backend=backend), want)
    rect = bmssl.ops.ntxent_rect(z[2:6], z, labels[2:6].to(dtype), labels.to(dtype), 2, 0.5)
    torch.testing.assert_close(rect, bmssl.ops.ntxent_rect(z[2:6], z, labels[2:6], labels, 2, 0.5))
    with pytest.raises(ValueError, match="labels must lie in"):
        bmssl.ntxent(z, torch.full((8,), 9).to(dtype), 0.5, backend=backend)
