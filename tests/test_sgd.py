"""bmssl.ops.sgd_unroll_step: every backend against the twin, its trivial linear backward
(including second order through an unroll), torch.func, opcheck and bad input."""
import pytest
import torch

import bmssl
from bmssl import backends
from bmssl.ops.sgd import SUPPORT

CPU = torch.device("cpu")
BACKENDS = [b for b in ("cpu", "triton", "torch") if backends.input_reason(b, SUPPORT, CPU, torch.float32) is None]
SHAPES = [(3, 4), (7,), (1,), (2, 3, 5), (257,)]
# p - lr g from the input dtype's values: within an ulp or two of the correctly rounded result
STEP_TOLERANCE = {torch.float64: (1e-15, 1e-15), torch.float32: (1e-7, 2.5e-7),
                  torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 8e-3)}


def make(dtype=torch.float32, requires_grad=False):
    params = [torch.randn(s).to(dtype).requires_grad_(requires_grad) for s in SHAPES]
    grads = [torch.randn(s).to(dtype).requires_grad_(requires_grad) for s in SHAPES]
    return params, grads


def test_cpu_backend_is_there():
    assert "cpu" in BACKENDS, backends.status()


@pytest.mark.triton_interpreter
def test_triton_interpreter_serves_cpu_tensors():
    assert "triton" in BACKENDS, backends.status()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_twin(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(bmssl.ops.BackendUnavailableError, match="triton kernels of sgd_unroll_step take"):
            bmssl.ops.sgd_unroll_step(*make(dtype), 0.3, backend=backend)
        return
    params, grads = make(dtype)
    got = bmssl.ops.sgd_unroll_step(params, grads, 0.3, backend=backend)
    for out, p, g in zip(got, params, grads):
        expected = (p.double() - 0.3 * g.double()).to(dtype)
        assert out.dtype == dtype and out.shape == p.shape
        atol, rtol = STEP_TOLERANCE[dtype]
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_one_launch_per_tensor_while_a_cuda_graph_is_captured(dtype, monkeypatch):
    """Inside a capture the pointer tables cannot be copied in: each tensor gets its own launch
    (bmssl/triton/sgd_unroll_step.py). That path, forced here, gives the same step, and builds no
    table (torch.tensor is not called)."""
    from bmssl.triton import sgd_unroll_step as kernels

    params, grads = make(dtype)
    expected = bmssl.ops.sgd_unroll_step(params, grads, 0.3, backend="triton")
    monkeypatch.setattr(kernels, "capturing", lambda device: True)
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("built a pointer table while capturing"))
    got = kernels.sgd_unroll_step(params, grads, 0.3)
    for out, want in zip(got, expected):
        assert out.dtype == dtype
        torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_identity_and_minus_lr(backend):
    params, grads = make(requires_grad=True)
    outs = bmssl.ops.sgd_unroll_step(params, grads, 0.25, backend=backend)
    upstream = [torch.randn_like(o) for o in outs]
    d = torch.autograd.grad(outs, params + grads, upstream)
    for k, u in enumerate(upstream):
        torch.testing.assert_close(d[k], u)
        torch.testing.assert_close(d[len(SHAPES) + k], -0.25 * u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_through_an_unroll(backend):
    """Three inner steps of w <- w - a grad f(w) with f(w) = sum(w^4)/4 (so grad f = w^3): the
    derivative of the final loss w.r.t. w0 must match the twin's (second order flows through)."""
    dtype = torch.float64 if backend != "triton" else torch.float32

    def unroll(w0, step):
        w = [w0]
        for _ in range(3):
            (g,) = torch.autograd.grad((w[0] ** 4).sum() / 4, w[0], create_graph=True)
            w = step(w, [g])
        return (w[0] ** 2).sum()

    w0 = torch.randn(6, dtype=dtype, requires_grad=True) * 0.5
    fused = torch.autograd.grad(unroll(w0, lambda w, g: bmssl.ops.sgd_unroll_step(w, g, 0.1, backend=backend)), w0)
    twin = torch.autograd.grad(unroll(w0, lambda w, g: [w[0] - 0.1 * g[0]]), w0)
    torch.testing.assert_close(fused[0], twin[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_and_dicts(backend):
    params = {"w": torch.randn(4, 3, 2), "b": torch.randn(4, 2)}  # 4 tasks
    grads = {"w": torch.randn(4, 3, 2), "b": torch.randn(4, 2)}

    def step(p, g):
        return bmssl.ops.sgd_unroll_step(p, g, 0.5, backend=backend)

    got = torch.func.vmap(step)(params, grads)
    for k in params:
        torch.testing.assert_close(got[k], params[k] - 0.5 * grads[k])
    shared = torch.func.vmap(step, in_dims=(None, 0))({k: v[0] for k, v in params.items()}, grads)
    torch.testing.assert_close(shared["b"], params["b"][0] - 0.5 * grads["b"])


def test_opcheck_cpp_op():
    params, grads = make(requires_grad=True)
    torch.library.opcheck(torch.ops.bmssl.sgd_unroll_step.default, (params, grads, 0.1))


def test_empty_list():
    assert bmssl.ops.sgd_unroll_step([], [], 0.1) == []


@pytest.mark.parametrize("params, grads, message", [
    ([torch.randn(2)], [torch.randn(3)], "one shape"),
    ([torch.randn(2)], [], "1 params but 0 grads"),
    ([torch.randn(2), torch.randn(2).double()], [torch.randn(2), torch.randn(2).double()], "one dtype"),
    ([torch.ones(2, dtype=torch.long)], [torch.ones(2, dtype=torch.long)], "floating point"),
    ({"a": torch.randn(2)}, {"b": torch.randn(2)}, "same keys"),
])
def test_bad_input(params, grads, message):
    with pytest.raises(ValueError, match=message):
        bmssl.ops.sgd_unroll_step(params, grads, 0.1)


@pytest.mark.parametrize("lr, message", [
    (float("nan"), "lr must be finite"),
    (float("inf"), "lr must be finite"),
    ("0.1", "lr must be a number, got str"),
    (True, "lr must be a number, got bool"),
    (None, "lr must be a number, got NoneType"),
    (torch.tensor([0.1, 0.2]), "one-element float tensor"),
    (torch.tensor(1), "one-element float tensor"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lr(backend, lr, message):
    with pytest.raises(ValueError, match=message):
        bmssl.ops.sgd_unroll_step([torch.randn(3)], [torch.randn(3)], lr, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_learnable_lr_gets_its_gradient_to_second_order(backend):
    """A tensor lr that requires grad: d out / d lr = -g and d² out / d lr d g = -1, on every
    backend as on the twin (the fused ops take lr as a number, so this used to drop it)."""
    lr = torch.tensor(0.1, requires_grad=True)
    p, g = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    out = bmssl.ops.sgd_unroll_step([p], [g], lr, backend=backend)[0]
    torch.testing.assert_close(out, p - 0.1 * g)
    d_lr, d_g = torch.autograd.grad(out.sum(), (lr, g), create_graph=True)
    torch.testing.assert_close(d_lr, -g.sum())
    torch.testing.assert_close(d_g, -lr.expand(5))
    (mixed,) = torch.autograd.grad(d_lr, g)
    torch.testing.assert_close(mixed, -torch.ones(5))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_raw_op_is_differentiable(backend):
    """The registered op itself (not only bmssl.ops.sgd_unroll_step) carries the backward:
    first and second order equal the formula's, and autograd raises no 'not registered' warning."""
    import warnings

    from bmssl.ops.sgd import STEP_OPS

    dtype = torch.float32 if backend == "triton" else torch.float64  # the Triton kernels take no fp64
    params, grads = make(dtype, requires_grad=True)
    weights = [torch.randn(s, dtype=dtype) for s in SHAPES]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = STEP_OPS[backend](params, grads, 0.3)
        loss = sum(((o ** 2) * w).sum() for o, w in zip(outs, weights))
        d_params = torch.autograd.grad(loss, params + grads, create_graph=True)
        second = torch.autograd.grad(sum(g.sum() for g in d_params[:len(params)]), grads)
    for k, (p, g, w) in enumerate(zip(params, grads, weights)):
        out = (p - 0.3 * g).detach()
        torch.testing.assert_close(d_params[k], 2 * out * w)  # d loss / d params = 2 out w
        torch.testing.assert_close(d_params[len(params) + k], -0.3 * 2 * out * w)
        torch.testing.assert_close(second[k], -0.3 * 2 * w)  # d/d grads of sum(2 out w)


# ---- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype", [("cuda", torch.float64)] + [
    (backend, dtype) for backend in ("cuda", "triton") for dtype in (torch.float32, torch.float16, torch.bfloat16)])
def test_gpu_matches_the_exact_step(backend, dtype):
    """Empty, one-element, odd, strided and transposed tensors, one of 2^20 + 3 elements, and
    more than 64 tensors (the CUDA kernel's table holds 64 per launch). The Triton kernel takes
    fp16 / bf16 / fp32 only."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(0,), (1,), (3, 4), (257,), (0, 5), ((1 << 20) + 3,)] + [(i % 7 + 1, 33) for i in range(70)]
    params = [torch.randn(s, generator=generator).to(dtype).cuda() for s in shapes]
    grads = [torch.randn(s, generator=generator).to(dtype).cuda() for s in shapes]
    params[2] = torch.randn(4, 3, generator=generator).to(dtype).cuda().t()
    grads[3] = torch.randn(2 * 257, generator=generator).to(dtype).cuda()[::2]
    outs = bmssl.ops.sgd_unroll_step(params, grads, 0.3, backend=backend)
    atol, rtol = STEP_TOLERANCE[dtype]
    for k, (out, p, g) in enumerate(zip(outs, params, grads)):
        assert out.shape == p.shape and out.dtype == dtype, k
        torch.testing.assert_close(out, (p.double() - 0.3 * g.double()).to(dtype), atol=atol, rtol=rtol, msg=str(k))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_capture_replays_the_step_on_new_values(backend):
    params = [torch.randn(1000, device="cuda") for _ in range(3)]
    grads = [torch.randn(1000, device="cuda") for _ in range(3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bmssl.ops.sgd_unroll_step(params, grads, 0.1, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = bmssl.ops.sgd_unroll_step(params, grads, 0.1, backend=backend)
    for t in params + grads:
        t.copy_(torch.randn_like(t))
    graph.replay()
    for out, p, g in zip(outs, params, grads):
        torch.testing.assert_close(out, p - 0.1 * g)


@pytest.mark.gpu
def test_gpu_triton_takes_a_tensor_past_65535_blocks():
    """The blocks of a tensor run on grid axis 0: on axis 1 (capped at 65535) a tensor of more
    than 67M elements could not launch."""
    params, grads = [torch.ones(65536 * 1024 + 5, device="cuda")], [torch.ones(65536 * 1024 + 5, device="cuda")]
    (out,) = bmssl.ops.sgd_unroll_step(params, grads, 0.25, backend="triton")
    assert bool((out == 0.75).all())
