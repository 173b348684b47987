"""bmssl.ops.kl_bootstrap: the bootstrapped-target loss, on every backend.

    loss = mean_rows KL(softmax(target/T) || softmax(student/T)),   d/d student = (p - q)/(n T)

The target is a stop-gradient: it is detached, as the bootstrapped target of the paper is.
Ops: bmssl::kl_bootstrap_rows(_backward) (C++ CPU and CUDA, csrc/) and
bmssl::kl_bootstrap_rows_triton(_backward) (bmssl/triton/kl_bootstrap.py). Both pairs get the
same fake kernels and autograd formulas here; the backward is differentiable again.
"""
import torch

from bmssl import _extension, backends, reference
from bmssl import triton as bmssl_triton
from bmssl.reference.kl_bootstrap import accumulation_dtype
from bmssl.validate import check_kl_bootstrap

SUPPORT = backends.OpSupport(name="kl_bootstrap", backends=("cpu", "cuda", "triton"))


def _fake_rows(student, target, temperature):
    acc = accumulation_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty(rows, dtype=acc), student.new_empty(rows, 2, dtype=acc)


def _fake_rows_backward(grad_row_kl, student, target, row_lse, temperature):
    return torch.empty_like(student)


def _register_autograd(rows_op, backward_op):
    """Forward: d row_kl / d student = (p - q)/T via backward_op. Backward of the backward:
    with g = grad_row_kl and v the incoming gradient of grad_student,
        d/dg_r      = sum_j v_rj (p_rj - q_rj) / T
        d/dstudent  = g_r / T^2 * p_r * (v_r - <p_r, v_r>)
    written in torch ops (softmax recomputed), so it is differentiable in turn."""

    def setup_rows(ctx, inputs, output):
        student, target, temperature = inputs
        ctx.save_for_backward(student, target, output[1])
        ctx.temperature = temperature
        ctx.mark_non_differentiable(output[1])

    def backward_rows(ctx, grad_row_kl, _grad_row_lse):
        student, target, row_lse = ctx.saved_tensors
        grad = backward_op(grad_row_kl, student, target, row_lse, ctx.temperature)
        return grad, None, None

    def setup_backward(ctx, inputs, output):
        grad_row_kl, student, target, _row_lse, temperature = inputs
        ctx.save_for_backward(grad_row_kl, student, target)
        ctx.temperature = temperature

    def backward_backward(ctx, upstream):
        grad_row_kl, student, target = ctx.saved_tensors
        t = ctx.temperature
        acc = accumulation_dtype(student.dtype)
        p = torch.softmax(student.to(acc) / t, dim=-1)
        q = torch.softmax(target.to(acc) / t, dim=-1)
        v = upstream.to(acc)
        d_grad = ((v * (p - q)).sum(-1) / t).to(grad_row_kl.dtype)
        inner = (v * p).sum(-1, keepdim=True)
        d_student = (grad_row_kl.to(acc)[:, None] / (t * t) * p * (v - inner)).to(student.dtype)
        return d_grad, d_student, None, None, None

    torch.library.register_fake(rows_op)(_fake_rows)
    torch.library.register_fake(backward_op)(_fake_rows_backward)
    torch.library.register_autograd(rows_op, backward_rows, setup_context=setup_rows)
    torch.library.register_autograd(backward_op, backward_backward, setup_context=setup_backward)


ROW_OPS = {}  # backend name -> the row op that serves it

if _extension.loaded():
    _register_autograd(torch.ops.bmssl.kl_bootstrap_rows.default,
                       torch.ops.bmssl.kl_bootstrap_rows_backward.default)
    ROW_OPS["cpu"] = ROW_OPS["cuda"] = torch.ops.bmssl.kl_bootstrap_rows

if bmssl_triton.triton is not None:
    from bmssl.triton import kl_bootstrap as _triton_kernels

    @torch.library.custom_op("bmssl::kl_bootstrap_rows_triton", mutates_args=())
    def kl_bootstrap_rows_triton(student: torch.Tensor, target: torch.Tensor,
                                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.forward(student, target, temperature)

    @torch.library.custom_op("bmssl::kl_bootstrap_rows_triton_backward", mutates_args=())
    def kl_bootstrap_rows_triton_backward(grad_row_kl: torch.Tensor, student: torch.Tensor,
                                          target: torch.Tensor, row_lse: torch.Tensor,
                                          temperature: float) -> torch.Tensor:
        return _triton_kernels.backward(grad_row_kl, student, target, row_lse, temperature)

    _register_autograd(kl_bootstrap_rows_triton, kl_bootstrap_rows_triton_backward)
    ROW_OPS["triton"] = kl_bootstrap_rows_triton


def kl_bootstrap(student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                 reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(student/T)) over the last dim.

    student, target: [..., C] logits of the same shape, dtype and device (the target is
    detached). reduction: "mean" over all rows (the paper's average over query rows and tasks),
    "sum", or "none" for per-row values of shape [...]. Returns student's dtype, accumulated in
    fp32 (fp64 for fp64). backend: see bmssl.backends (default: BMSSL_BACKEND or "auto").
    """
    temperature = check_kl_bootstrap(student, target, temperature, reduction)
    name = backends.choose(SUPPORT, student.device, student.dtype, backend)
    if name == "torch":
        return reference.kl_bootstrap(student, target, temperature, reduction)
    classes = student.shape[-1]
    row_kl, _ = ROW_OPS[name](student.reshape(-1, classes), target.detach().reshape(-1, classes),
                              temperature)
    row_kl = row_kl.reshape(student.shape[:-1])
    return reference.reduce_rows(row_kl, reduction).to(student.dtype)
