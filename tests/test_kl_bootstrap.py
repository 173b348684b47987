"""kl_bootstrap: every backend against the twin, numerics at the edges, the op contract
(opcheck, gradcheck, gradgradcheck, torch.compile, torch.func) and bad input."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bmssl
from bmssl import backends, reference
from bmssl.ops.kl_bootstrap import SUPPORT
from tolerances import assert_close_to_oracle

CPU_BACKENDS = [b for b in ("cpu", "triton") if backends.input_reason(b, SUPPORT, torch.device("cpu"), torch.float32) is None]
GPU_BACKENDS = ["cuda", "triton"]


def naive_kl(student, target, temperature):
    """KL by its definition, one row at a time, in float64."""
    total = []
    for s_row, t_row in zip(student.double().reshape(-1, student.shape[-1]),
                            target.double().reshape(-1, target.shape[-1])):
        p = torch.softmax(s_row / temperature, 0)
        q = torch.softmax(t_row / temperature, 0)
        total.append(sum(float(qj) * math.log(float(qj) / float(pj)) for qj, pj in zip(q, p) if qj > 0))
    return sum(total) / len(total)


def test_cpu_backend_is_built():
    assert "cpu" in CPU_BACKENDS, backends.status()


@pytest.mark.triton_interpreter
def test_triton_interpreter_serves_cpu_tensors():
    assert "triton" in CPU_BACKENDS, backends.status()


def test_reference_matches_definition():
    s, t = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    assert reference.kl_bootstrap(s, t, 1.7).item() == pytest.approx(naive_kl(s, t, 1.7), rel=1e-12)


def loss_and_grad(fn, student, target, upstream):
    s = student.detach().requires_grad_()
    loss = fn(s, target)
    (grad,) = torch.autograd.grad(loss, s, upstream.to(loss.dtype))
    return loss, grad


def compare(backend, student, target, temperature, reduction="mean"):
    """Loss and gradient of `backend` against the fp64 oracle, within twice the error of the
    eager twin run in the input dtype."""
    dtype = student.dtype
    oracle_loss, oracle_grad = loss_and_grad(
        lambda s, t: reference.kl_bootstrap(s, t, temperature, reduction), student.double(),
        target.double(), upstream := torch.randn(student.shape[:-1] if reduction == "none" else (),
                                                 dtype=torch.float64, device=student.device))
    twin_loss, twin_grad = loss_and_grad(
        lambda s, t: reference.kl_bootstrap(s, t, temperature, reduction), student, target, upstream)
    loss, grad = loss_and_grad(
        lambda s, t: bmssl.kl_bootstrap(s, t, temperature, reduction, backend=backend),
        student, target, upstream)
    assert loss.dtype == dtype and loss.shape == oracle_loss.shape and grad.dtype == dtype
    scale = max(student.abs().max().item(), target.abs().max().item()) / temperature
    assert_close_to_oracle(loss, oracle_loss, twin_loss, dtype, f"{backend} loss", scale)
    assert_close_to_oracle(grad, oracle_grad, twin_grad, dtype, f"{backend} grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(lead=st.lists(st.integers(1, 9), min_size=0, max_size=2), classes=st.integers(1, 70),
       temperature=st.floats(0.05, 5.0), reduction=st.sampled_from(["mean", "sum", "none"]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference_fp32(backend, lead, classes, temperature, reduction, seed):
    torch.manual_seed(seed)
    shape = (*lead, 3, classes)
    student = torch.randn(shape) * 3
    target = torch.randn(shape) * 3
    compare(backend, student, target, temperature, reduction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_matches_reference_other_dtypes(backend, dtype):
    for rows, classes in [(1, 1), (31, 5), (257, 33)]:
        student = torch.randn(rows, classes).to(dtype)
        target = torch.randn(rows, classes).to(dtype)
        compare(backend, student, target, 0.7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)  # the twin is the reference: comparing it is empty
def test_non_contiguous_input(backend):
    student = torch.randn(9, 40)[:, ::2]
    target = torch.randn(40, 9).t()[:, 10:30]
    assert not student.is_contiguous() and not target.is_contiguous()
    compare(backend, student, target, 1.3)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("seed", range(3))
def test_large_logits_stay_finite(backend, seed):
    """Logits/T up to ~8e4: finite, and the kernels' gradient within the precision of the fp32
    log-sum-exp they store, ulp(|lse|), of the exact one. (The twin's softmax is exact to 1e-9
    here; the kernels' p = exp(a - lse) inherit lse's rounding: 5e-5 off in 8% of random draws,
    which compare()'s twin-relative tolerance failed, unseen while this test was unseeded.)"""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(64, 10, generator=generator) * 1e4
    target = torch.randn(64, 10, generator=generator) * 1e4
    s = student.clone().requires_grad_()
    loss = bmssl.kl_bootstrap(s, target, 0.5, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    exact = student.double().requires_grad_()
    (want,) = torch.autograd.grad(bmssl.kl_bootstrap(exact, target.double(), 0.5, backend="torch"), exact)
    largest_lse = max(student.abs().max(), target.abs().max()).item() / 0.5
    bound = 2 * torch.finfo(torch.float32).eps * largest_lse / (64 * 0.5)  # (p + q) ulp(lse) / (R T)
    assert (grad.double() - want).abs().max() <= bound


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_zero_probability_targets(backend):
    student = torch.randn(8, 6, dtype=torch.float64)
    target = torch.randn(8, 6, dtype=torch.float64)
    target[0, 2] = float("-inf")
    target[3, :5] = float("-inf")  # a one-hot target
    s = student.clone().requires_grad_()
    loss = bmssl.kl_bootstrap(s, target, 1.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(naive_kl(student, target, 1.0), rel=1e-10)
    if backend != "torch":  # the twin itself is the reference of compare()
        compare(backend, student, target, 1.0)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_a_target_row_without_a_finite_entry_gives_nan_not_zero(backend):
    """softmax of an all -inf row does not exist: the row's KL is NaN on every backend (the twin
    once gave 0 there, hiding the bad target), and the other rows are untouched."""
    student, target = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    target[2] = float("-inf")
    rows = bmssl.kl_bootstrap(student, target, 1.0, reduction="none", backend=backend)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    assert torch.allclose(rows[[0, 1, 3]], bmssl.kl_bootstrap(student[[0, 1, 3]], target[[0, 1, 3]], 1.0,
                                                              reduction="none", backend="torch"))
    assert torch.isnan(bmssl.kl_bootstrap(student, target, 1.0, backend=backend))


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
def test_the_second_derivative_of_a_row_without_a_target_softmax_is_nan(backend, bad):
    """A target row with no softmax: the loss and gradient are NaN, and so is the Hessian-vector
    product (the fused backward-of-backward once ignored the target there, giving numbers)."""
    target = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 2.0]])
    target[0] = {"nan": torch.tensor([float("nan"), 0.0, 1.0]), "+inf": torch.tensor([float("inf"), 0.0, 1.0]),
                 "all -inf": torch.full((3,), float("-inf"))}[bad]
    student = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]], requires_grad=True)
    rows = bmssl.kl_bootstrap(student, target, 1.0, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(rows.sum(), student, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.tensor([[-1.0, 0.0, 1.0]] * 2)).sum(), student)
    assert torch.isnan(rows[0]) and torch.isnan(grad[0]).all() and torch.isnan(hvp[0]).all()
    assert torch.isfinite(hvp[1]).all()  # the other row is untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 100.0, 1e4])
def test_fp32_value_near_the_target_has_no_cancellation(backend, offset):
    """The bootstrap regime: student ≈ target (+ a shift, which changes no softmax), logits around
    `offset`. The row KL is tiny; computing it as E_q[b - a] - lse(b) + lse(a) cancelled O(offset)
    terms (errors of 1e-3 at offset 1e4, negative KLs); the kernels are now as accurate as the
    fp32 twin (a few 1e-7)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(64, 200, dtype=torch.float64, generator=generator) * 3 + offset
    student = target + 1e-3 * torch.randn(64, 200, dtype=torch.float64, generator=generator) + 5.0
    exact = bmssl.kl_bootstrap(student, target, 1.0, reduction="none", backend="torch")
    twin = bmssl.kl_bootstrap(student.float(), target.float(), 1.0, reduction="none", backend="torch").double()
    got = bmssl.kl_bootstrap(student.float(), target.float(), 1.0, reduction="none", backend=backend).double()
    assert (got - exact).abs().max() <= max(4 * (twin - exact).abs().max(), 2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_identical_inputs_give_zero(backend):
    x = torch.randn(20, 7)
    assert bmssl.kl_bootstrap(x, x.clone(), 2.0, backend=backend).abs().item() < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_target_receives_no_gradient(backend):
    student = torch.randn(5, 4, requires_grad=True)
    target = torch.randn(5, 4, requires_grad=True)
    bmssl.kl_bootstrap(student, target, backend=backend).backward()
    assert target.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    student = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64)

    def loss(s):
        return bmssl.kl_bootstrap(s, target, 1.5, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, (student,))
    assert torch.autograd.gradgradcheck(loss, (student,))


def test_opcheck_cpp_ops():
    student = torch.randn(7, 5, requires_grad=True)
    target = torch.randn(7, 5)
    torch.library.opcheck(torch.ops.bmssl.kl_bootstrap_rows.default, (student, target, 1.5))
    _, row_lse = torch.ops.bmssl.kl_bootstrap_rows(student, target, 1.5)
    grad_row = torch.randn(7, requires_grad=True)
    torch.library.opcheck(torch.ops.bmssl.kl_bootstrap_rows_backward.default,
                          (grad_row, student, target, row_lse, 1.5))


@pytest.mark.triton_interpreter
def test_opcheck_triton_ops():
    student = torch.randn(5, 9, requires_grad=True)
    target = torch.randn(5, 9)
    torch.library.opcheck(torch.ops.bmssl.kl_bootstrap_rows_triton.default, (student, target, 0.9))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    student = torch.randn(12, 6, requires_grad=True)
    target = torch.randn(12, 6)

    @torch.compile(fullgraph=True)  # fullgraph: a graph break raises instead of falling back
    def compiled_loss(s, t):
        return bmssl.kl_bootstrap(s, t, 1.2, backend="cpu") * 2

    loss = compiled_loss(student, target) / 2
    (grad,) = torch.autograd.grad(loss, student)  # the backward AOTAutograd compiled
    expected = reference.kl_bootstrap(student, target, 1.2)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_func_grad_vmap_and_grad_of_grad(backend):
    """vmap over tasks of grad, and of a Hessian-vector product (grad of <grad, v>)."""
    student = torch.randn(4, 3, 6, dtype=torch.float64)
    target = torch.randn(4, 3, 6, dtype=torch.float64)
    direction = torch.randn(3, 6, dtype=torch.float64)

    def transforms(loss):
        grad = torch.func.grad(loss)
        hvp = torch.func.grad(lambda s, t: (grad(s, t) * direction).sum())
        return torch.func.vmap(grad), torch.func.vmap(hvp)

    fused = transforms(lambda s, t: bmssl.kl_bootstrap(s, t, 1.1, backend=backend))
    twin = transforms(lambda s, t: reference.kl_bootstrap(s, t, 1.1))
    for got, expected in zip(fused, twin):
        torch.testing.assert_close(got(student, target), expected(student, target))


def test_vmap_unbatched_target():
    student = torch.randn(5, 3, 4, dtype=torch.float64)
    target = torch.randn(3, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda s: bmssl.kl_bootstrap(s, target, backend="cpu"))(student)
    expected = torch.stack([reference.kl_bootstrap(s, target) for s in student])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bad, message", [
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 5)), "same shape"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4).double()), "float64"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4), 0.0), "temperature"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4), -1.0), "temperature"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4), float("nan")), "temperature"),
    # 1/T overflows float32: every logit would be inf (it failed later as a NaN loss)
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4), 1e-40), "1/T overflows float32"),
    (lambda: bmssl.ntxent(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), 1e-40), "1/T overflows float32"),
    (lambda: bmssl.kl_bootstrap(torch.randn(0, 4), torch.randn(0, 4)), "empty batch"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 0), torch.randn(3, 0)), "C >= 1"),
    (lambda: bmssl.kl_bootstrap(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)), "float"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4), reduction="avg"), "reduction"),
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), [1.0, 2.0]), "torch.Tensor"),
    # a learnable temperature would get no gradient (the target's softmax is a constant): refused
    (lambda: bmssl.kl_bootstrap(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(2.0, requires_grad=True)),
     "constant here and would get no gradient"),
])
def test_bad_input_raises_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_mixed_devices_raise():
    meta = torch.empty(3, 4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        bmssl.kl_bootstrap(torch.randn(3, 4), meta)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gpu_matches_reference(backend, dtype):
    for rows, classes in [(1, 1), (31, 5), (257, 33), (4099, 1000)]:
        student = (torch.randn(rows, classes, device="cuda") * 4).to(dtype)
        target = (torch.randn(rows, classes, device="cuda") * 4).to(dtype)
        compare(backend, student, target, 0.8)


@pytest.mark.gpu
def test_gpu_opcheck_and_zero_probability():
    student = torch.randn(33, 7, device="cuda", requires_grad=True)
    target = torch.randn(33, 7, device="cuda")
    torch.library.opcheck(torch.ops.bmssl.kl_bootstrap_rows.default, (student, target, 1.5))
    target[:, 1:] = float("-inf")
    loss = bmssl.kl_bootstrap(student, target, backend="cuda")
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    compare("cuda", student, target, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_gpu_value_near_the_target_has_no_cancellation_and_bad_target_rows_are_nan(backend, offset):
    """The CPU tests above, on the GPU kernels: the CUDA forward once kept online (max, sum)
    state and formed E_q[b - a] - lse(b) + lse(a), which cancelled O(offset) terms."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(64, 200, dtype=torch.float64, generator=generator) * 3 + offset
    student = target + 1e-3 * torch.randn(64, 200, dtype=torch.float64, generator=generator) + 5.0
    exact = bmssl.kl_bootstrap(student, target, 1.0, reduction="none", backend="torch")
    twin = bmssl.kl_bootstrap(student.float(), target.float(), 1.0, reduction="none", backend="torch").double()
    got = bmssl.kl_bootstrap(student.float().cuda(), target.float().cuda(), 1.0, reduction="none",
                             backend=backend).double().cpu()
    assert (got - exact).abs().max() <= max(4 * (twin - exact).abs().max(), 2e-6)
    target = torch.randn(4, 40, device="cuda")
    target[0, 3], target[1, 5], target[2] = float("nan"), float("inf"), float("-inf")
    rows = bmssl.kl_bootstrap(torch.randn(4, 40, device="cuda"), target, 1.0, reduction="none", backend=backend)
    assert torch.isnan(rows[:3]).all() and torch.isfinite(rows[3])
