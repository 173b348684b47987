"""bmssl.ops.kl_bootstrap: the bootstrapped-target loss, on every backend.

    loss = mean_rows KL(softmax(target/T) || softmax(student/T)),   d/d student = (p - q)/(n T)

The target is a stop-gradient: it is detached, as the bootstrapped target of the paper is.
Ops: bmssl::kl_bootstrap_rows(_backward) (C++ CPU and CUDA, csrc/) and
bmssl::kl_bootstrap_rows_triton(_backward) (bmssl/triton/kl_bootstrap.py). Both pairs get the
same fake kernels and autograd formulas here; the backward is differentiable again. The public
function goes through KLRows, an autograd.Function with setup_context and a vmap rule, so that
torch.func.grad and vmap (the engine's inner loop) work on every backend.
"""
import torch

from bmssl import _extension, backends, reference
from bmssl import triton as bmssl_triton
from bmssl.ops._autocast import twin_context
from bmssl.ops._fake import output_like
from bmssl.ops._vmap import fold_vmapped_dim
from bmssl.reference.kl_bootstrap import accumulation_dtype
from bmssl.validate import check_kl_bootstrap

SUPPORT = backends.OpSupport(name="kl_bootstrap", backends=("cpu", "cuda", "triton"))


def _fake_rows(student, target, temperature):
    acc = accumulation_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty(rows, dtype=acc), student.new_empty(rows, 2, dtype=acc)


def _fake_rows_backward(grad_row_kl, student, target, row_lse, temperature):
    return output_like(student)


def student_grad_of_grad(grad_row_kl, student, target, temperature, upstream):
    """Backward of the backward. With g = grad_row_kl and v = upstream (the gradient arriving
    at grad_student), p = softmax(student/T), q = softmax(target/T):
        d/dg_r      = sum_j v_rj (p_rj - q_rj) / T
        d/dstudent  = g_r / T^2 * p_r * (v_r - <p_r, v_r>)
    Written in torch ops with p recomputed, so it is differentiable in turn."""
    acc = accumulation_dtype(student.dtype)
    p = torch.softmax(student.to(acc) / temperature, dim=-1)
    q = torch.softmax(target.to(acc) / temperature, dim=-1)
    v = upstream.to(acc)
    d_grad = ((v * (p - q)).sum(-1) / temperature).to(grad_row_kl.dtype)
    inner = (v * p).sum(-1, keepdim=True)
    d_student = grad_row_kl.to(acc)[..., None] / temperature**2 * p * (v - inner)
    # q does not enter d/dstudent, but a target row without a softmax (NaN, +inf or all -inf
    # entries) must give NaN here too, as the loss and its gradient do: + 0 · sum(q) (0 when finite)
    d_student = d_student + 0.0 * q.sum(-1, keepdim=True)
    return d_grad, d_student.to(student.dtype)


def _register_autograd(rows_op, backward_op):
    """Autograd of the raw ops, for callers of torch.ops.bmssl.* (torch.func goes through
    KLRows below, because register_autograd's Function does not support functorch)."""

    def setup_rows(ctx, inputs, output):
        student, target, temperature = inputs
        ctx.save_for_backward(student, target, output[1])
        ctx.temperature = temperature
        ctx.mark_non_differentiable(output[1])

    def backward_rows(ctx, grad_row_kl, _grad_row_lse):
        student, target, row_lse = ctx.saved_tensors
        return backward_op(grad_row_kl, student, target, row_lse, ctx.temperature), None, None

    def setup_backward(ctx, inputs, output):
        grad_row_kl, student, target, _row_lse, temperature = inputs
        ctx.save_for_backward(grad_row_kl, student, target)
        ctx.temperature = temperature

    def backward_backward(ctx, upstream):
        grad_row_kl, student, target = ctx.saved_tensors
        d_grad, d_student = student_grad_of_grad(grad_row_kl, student, target, ctx.temperature, upstream)
        return d_grad, d_student, None, None, None

    torch.library.register_fake(rows_op)(_fake_rows)
    torch.library.register_fake(backward_op)(_fake_rows_backward)
    torch.library.register_autograd(rows_op, backward_rows, setup_context=setup_rows)
    torch.library.register_autograd(backward_op, backward_backward, setup_context=setup_backward)


class KLRows(torch.autograd.Function):
    """(row_kl, row_lse) = rows_op(student [R, C], target [R, C], T), for autograd and torch.func."""

    @staticmethod
    def forward(student, target, temperature, backend):
        return ROW_OPS[backend][0](student, target, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, target, temperature, backend = inputs
        ctx.save_for_backward(student, target, output[1])
        ctx.temperature, ctx.backend = temperature, backend
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_row_kl, _grad_row_lse):
        student, target, row_lse = ctx.saved_tensors
        grad = KLRowsBackward.apply(grad_row_kl, student, target, row_lse, ctx.temperature, ctx.backend)
        return grad, None, None, None

    @staticmethod
    def vmap(info, in_dims, student, target, temperature, backend):
        s, t = fold_vmapped_dim((student, target), in_dims[:2], info.batch_size)
        row_kl, row_lse = KLRows.apply(s, t, temperature, backend)
        return (row_kl.reshape(info.batch_size, -1), row_lse.reshape(info.batch_size, -1, 2)), (0, 0)


class KLRowsBackward(torch.autograd.Function):
    """grad_student = backward_op(grad_row_kl, student, target, row_lse, T); differentiable."""

    @staticmethod
    def forward(grad_row_kl, student, target, row_lse, temperature, backend):
        return ROW_OPS[backend][1](grad_row_kl, student, target, row_lse, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_row_kl, student, target, _row_lse, temperature, _backend = inputs
        ctx.save_for_backward(grad_row_kl, student, target)
        ctx.temperature = temperature

    @staticmethod
    def backward(ctx, upstream):
        grad_row_kl, student, target = ctx.saved_tensors
        d_grad, d_student = student_grad_of_grad(grad_row_kl, student, target, ctx.temperature, upstream)
        return d_grad, d_student, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad_row_kl, student, target, row_lse, temperature, backend):
        args = fold_vmapped_dim((grad_row_kl, student, target, row_lse), in_dims[:4], info.batch_size)
        grad = KLRowsBackward.apply(*args, temperature, backend)
        return grad.reshape(info.batch_size, -1, grad.shape[-1]), 0


ROW_OPS = {}  # backend name -> (rows op, its backward op)

if _extension.loaded():
    _register_autograd(torch.ops.bmssl.kl_bootstrap_rows.default,
                       torch.ops.bmssl.kl_bootstrap_rows_backward.default)
    ROW_OPS["cpu"] = ROW_OPS["cuda"] = (torch.ops.bmssl.kl_bootstrap_rows.default,
                                        torch.ops.bmssl.kl_bootstrap_rows_backward.default)

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
    ROW_OPS["triton"] = (kl_bootstrap_rows_triton, kl_bootstrap_rows_triton_backward)


def kl_bootstrap(student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                 reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(student/T)) over the last dim.

    student, target: [..., C] logits of the same shape, dtype and device (the target is
    detached). reduction: "mean" over all rows (the paper's average over query rows and tasks),
    "sum", or "none" for per-row values of shape [...]. Returns student's dtype, accumulated in
    fp32 (fp64 for fp64). backend: see bmssl.backends (default: BMSSL_BACKEND or "auto").
    """
    tau = check_kl_bootstrap(student, target, temperature, reduction)
    if tau is None:  # a tensor T under torch.compile: KL of (student / T, target / T) at T = 1
        scale = temperature.detach().reshape(()).to(student.device, accumulation_dtype(student.dtype))
        student = (student.to(scale.dtype) / scale).to(student.dtype)
        target = (target.to(scale.dtype) / scale).to(target.dtype)
        tau = 1.0
    temperature = tau
    name = backends.choose(SUPPORT, student.device, student.dtype, backend)
    if name == "torch":
        with twin_context(student.device):
            return reference.kl_bootstrap(student, target, temperature, reduction)
    classes = student.shape[-1]
    row_kl, _ = KLRows.apply(student.reshape(-1, classes), target.detach().reshape(-1, classes),
                             temperature, name)
    row_kl = row_kl.reshape(student.shape[:-1])
    return reference.reduce_rows(row_kl, reduction).to(student.dtype)
