"""bmssl.ops.ntxent: the fused multi-view NT-Xent (maths in csrc/ntxent.cpp).

The op family bmssl::ntxent_forward / ntxent_backward / ntxent_double_backward works on
L2-normalised rows u [T, B, d] and returns per-task losses; the normalisation (when asked) is
plain torch ops before it, chained with its own backward. The public function goes through
NTXentLoss, an autograd.Function with setup_context and a vmap rule (a vmapped dim folds into
the task dim T), so grad, grad-of-grad, torch.func and torch.compile all work. Twice
differentiable; a third derivative is not implemented.
"""
import functools

import torch
import torch.nn.functional as F

from bmssl import _extension, backends, reference
from bmssl import triton as bmssl_triton
from bmssl.ops._autocast import twin_context
from bmssl.ops._autograd import register_no_derivative
from bmssl.ops._fake import output_like
from bmssl.ops._vmap import fold_vmapped_dim
from bmssl.reference.kl_bootstrap import accumulation_dtype
from bmssl.validate import check_ntxent, check_ntxent_rect, check_views


def _triton_dim_reason(shape):
    """The Triton kernels hold a row's d columns in one tile, up to bmssl.triton.ntxent.MAX_DIM."""
    from bmssl.triton.ntxent import MAX_DIM

    if shape[-1] > MAX_DIM:
        return f"the triton kernels of ntxent take d <= {MAX_DIM}, got d = {shape[-1]}"
    return None


# Dynamic shared memory per block of the CUDA kernels' largest pass, the double backward's
# second (kernels/ntxent.cu, Shared<Tiles, E, Pass::kDoubleGrad>::kBytes; tests/test_build.py
# compiles that expression and checks these). Tiles sized for sm_80 (163 KB per block) and
# sm_90 (227 KB); sm_86 / sm_89 / sm_120 GPUs allow 99 KB, where fp16, bf16 and fp64 cannot launch.
CUDA_SHARED_BYTES = {torch.float32: 87296, torch.float64: 108800, torch.float16: 132608, torch.bfloat16: 132608}


def cuda_shared_memory_reason(dtype, bytes_per_block):
    """Why the CUDA kernels cannot launch in `dtype` on a GPU with `bytes_per_block` of opt-in
    shared memory per block, or None."""
    needed = CUDA_SHARED_BYTES[dtype]
    if bytes_per_block is not None and bytes_per_block < needed:
        return (f"the cuda kernels of ntxent in {dtype} need {needed} B of shared memory per block; this GPU "
                f"allows {bytes_per_block} B (they are sized for sm_80 / sm_90)")
    return None


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(index):
    """The opt-in shared memory per block of CUDA device `index` (asked once per device: auto
    checks it on every call)."""
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def _cuda_device_reason(device, dtype):
    index = torch.cuda.current_device() if device.index is None else device.index
    return cuda_shared_memory_reason(dtype, _shared_memory_per_block(index))


SUPPORT = backends.OpSupport(
    name="ntxent", backends=("cpu", "cuda", "triton"),
    # the Triton kernels keep fp32 statistics, so fp64 input would lose its precision there;
    # the C++ CPU and CUDA kernels accumulate fp64 input in fp64
    backend_dtypes=(("triton", (torch.float16, torch.bfloat16, torch.float32)),),
    shape_limits=(("triton", _triton_dim_reason),),  # past d = MAX_DIM auto takes the next backend
    device_limits=(("cuda", _cuda_device_reason),),  # auto takes Triton where these kernels cannot launch
    interpreter_wrong_dtypes=(torch.bfloat16,))

OPS = {}  # backend -> (forward, backward, double_backward)


def _fake_forward(u, labels, inv_tau, variant):
    acc = accumulation_dtype(u.dtype)
    tasks, batch = u.shape[0], u.shape[1]
    return u.new_empty(tasks, dtype=acc), u.new_empty(tasks, 2, batch, dtype=acc)


def _fake_backward(grad_task_loss, u, labels, row_stats, inv_tau, variant):
    return output_like(u)


def _fake_double_backward(grad_grad_u, grad_task_loss, u, labels, row_stats, inv_tau, variant):
    return output_like(grad_task_loss), output_like(u)


def _register_raw(forward, backward, double_backward):
    """Fake kernels and autograd for callers of the raw torch.ops.bmssl.ntxent_* ops."""

    def setup_forward(ctx, inputs, output):
        u, labels, inv_tau, variant = inputs
        ctx.save_for_backward(u, labels, output[1])
        ctx.args = (inv_tau, variant)
        ctx.mark_non_differentiable(output[1])

    def backward_forward(ctx, grad_task_loss, _grad_stats):
        u, labels, stats = ctx.saved_tensors
        return backward(grad_task_loss, u, labels, stats, *ctx.args), None, None, None

    def setup_backward(ctx, inputs, output):
        grad_task_loss, u, labels, stats, inv_tau, variant = inputs
        ctx.save_for_backward(grad_task_loss, u, labels, stats)
        ctx.args = (inv_tau, variant)

    def backward_backward(ctx, grad_grad_u):
        grad_task_loss, u, labels, stats = ctx.saved_tensors
        d_grad, d_u = double_backward(grad_grad_u, grad_task_loss, u, labels, stats, *ctx.args)
        return d_grad, d_u, None, None, None, None

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    torch.library.register_fake(double_backward)(_fake_double_backward)
    torch.library.register_autograd(forward, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(backward, backward_backward, setup_context=setup_backward)
    register_no_derivative(double_backward, "the third derivative of ntxent (its double backward is the last)")


if _extension.loaded():
    # one set of dispatcher ops: CPU tensors reach csrc/cpu/ntxent.cpp, CUDA tensors csrc/cuda/ntxent.cpp
    OPS["cpu"] = OPS["cuda"] = (torch.ops.bmssl.ntxent_forward.default,
                                torch.ops.bmssl.ntxent_backward.default,
                                torch.ops.bmssl.ntxent_double_backward.default)
    _register_raw(*OPS["cpu"])


RECT_SECOND_DERIVATIVE = "the second derivative of ntxent_rect (it is once differentiable)"
RECT_SUPPORT = backends.OpSupport(name="ntxent_rect", backends=("cpu",))
RECT_OPS = {}

if _extension.loaded():
    RECT_OPS["cpu"] = (torch.ops.bmssl.ntxent_rect_forward.default, torch.ops.bmssl.ntxent_rect_backward.default)

    @torch.library.register_fake("bmssl::ntxent_rect_forward")
    def _fake_rect_forward(u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau, variant):
        acc = accumulation_dtype(u_rows.dtype)
        return u_rows.new_empty((), dtype=acc), u_rows.new_empty(2, u_rows.shape[0], dtype=acc)

    @torch.library.register_fake("bmssl::ntxent_rect_backward")
    def _fake_rect_backward(grad_loss, u_rows, u_cols, labels_rows, labels_cols, stats, row_offset,
                            inv_tau, variant):
        return output_like(u_rows), output_like(u_cols)


class NTXentRect(torch.autograd.Function):
    """loss, stats = ntxent_rect_forward(u_rows, u_cols, ...); once differentiable."""

    @staticmethod
    def forward(u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau, variant, backend):
        return RECT_OPS[backend][0](u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau, variant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau, variant, backend = inputs
        ctx.save_for_backward(u_rows, u_cols, labels_rows, labels_cols, output[1])
        ctx.args = (row_offset, inv_tau, variant, backend)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        u_rows, u_cols, labels_rows, labels_cols, stats = ctx.saved_tensors
        row_offset, inv_tau, variant, backend = ctx.args
        grad_rows, grad_cols = NTXentRectBackward.apply(grad_loss, u_rows, u_cols, labels_rows, labels_cols,
                                                        stats, row_offset, inv_tau, variant, backend)
        return grad_rows, grad_cols, None, None, None, None, None, None


class NTXentRectBackward(torch.autograd.Function):
    """(grad_rows, grad_cols) = ntxent_rect_backward(...); differentiating it raises. A Function
    with setup_context, so torch.func.grad can run it: the raw op's register_autograd wrapper
    refused functorch transforms (torch.func.grad of ntxent_rect raised on the cpu backend)."""

    @staticmethod
    def forward(grad_loss, u_rows, u_cols, labels_rows, labels_cols, stats, row_offset, inv_tau, variant, backend):
        return RECT_OPS[backend][1](grad_loss, u_rows, u_cols, labels_rows, labels_cols, stats, row_offset,
                                    inv_tau, variant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"bmssl: {RECT_SECOND_DERIVATIVE} is not implemented")


def _setup_rect_raw(ctx, inputs, output):
    u_rows, u_cols, labels_rows, labels_cols, row_offset, inv_tau, variant = inputs
    ctx.save_for_backward(u_rows, u_cols, labels_rows, labels_cols, output[1])
    ctx.args = (row_offset, inv_tau, variant)


def _backward_rect_raw(ctx, grad_loss, _grad_stats):
    """The raw forward op (torch.ops.bmssl.ntxent_rect_forward called directly) differentiates
    too, once, as NTXentRect does."""
    u_rows, u_cols, labels_rows, labels_cols, stats = ctx.saved_tensors
    grad_rows, grad_cols = torch.ops.bmssl.ntxent_rect_backward(grad_loss, u_rows, u_cols, labels_rows,
                                                                labels_cols, stats, *ctx.args)
    return grad_rows, grad_cols, None, None, None, None, None


if "cpu" in RECT_OPS:
    torch.library.register_autograd(RECT_OPS["cpu"][0], _backward_rect_raw, setup_context=_setup_rect_raw)
    register_no_derivative(RECT_OPS["cpu"][1], RECT_SECOND_DERIVATIVE)


def ntxent_rect(z_rows, z_cols, labels_rows, labels_cols, row_offset, temperature=0.1, variant="in",
                normalize=True, backend=None):
    """Rectangular NT-Xent: anchors z_rows [R, d], which are the columns row_offset ..
    row_offset + R - 1 of z_cols [N, d], against all N columns (for negatives gathered across
    ranks: see bmssl.distributed). labels_* integers in [0, N). Mean over the R anchors; the
    gradient reaches z_rows and z_cols. Once differentiable."""
    tau = check_ntxent_rect(z_rows, z_cols, labels_rows, labels_cols, row_offset, temperature, variant)
    if tau is None or learnable(temperature):
        z_rows, z_cols = unit_rows(z_rows, normalize, temperature), unit_rows(z_cols, normalize, temperature)
        normalize, tau = False, 1.0
    name = backends.choose(RECT_SUPPORT, z_rows.device, z_rows.dtype, backend)
    if name == "torch":
        with twin_context(z_rows.device):
            return reference.ntxent_rect(z_rows, z_cols, labels_rows, labels_cols, row_offset, tau, variant, normalize)
    u_rows, u_cols = unit_rows(z_rows, normalize), unit_rows(z_cols, normalize)
    loss, _ = NTXentRect.apply(u_rows.contiguous(), u_cols.contiguous(), labels_rows.long().contiguous(),
                               labels_cols.long().contiguous(), int(row_offset), 1.0 / tau, variant, name)
    return loss.to(z_rows.dtype)


if bmssl_triton.triton is not None:
    from bmssl.triton import ntxent as _triton_kernels

    @torch.library.custom_op("bmssl::ntxent_forward_triton", mutates_args=())
    def ntxent_forward_triton(u: torch.Tensor, labels: torch.Tensor, inv_tau: float,
                              variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.forward(u, labels, inv_tau, variant)

    @torch.library.custom_op("bmssl::ntxent_backward_triton", mutates_args=())
    def ntxent_backward_triton(grad_task_loss: torch.Tensor, u: torch.Tensor, labels: torch.Tensor,
                               row_stats: torch.Tensor, inv_tau: float, variant: str) -> torch.Tensor:
        return _triton_kernels.backward(grad_task_loss, u, labels, row_stats, inv_tau, variant)

    @torch.library.custom_op("bmssl::ntxent_double_backward_triton", mutates_args=())
    def ntxent_double_backward_triton(grad_grad_u: torch.Tensor, grad_task_loss: torch.Tensor,
                                      u: torch.Tensor, labels: torch.Tensor, row_stats: torch.Tensor,
                                      inv_tau: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.double_backward(grad_grad_u, grad_task_loss, u, labels, row_stats,
                                               inv_tau, variant)

    OPS["triton"] = (ntxent_forward_triton, ntxent_backward_triton, ntxent_double_backward_triton)
    _register_raw(*OPS["triton"])


class NTXentLoss(torch.autograd.Function):
    """task_loss [T], row_stats = ntxent_forward(u [T, B, d], labels [T, B], inv_tau, variant)."""

    @staticmethod
    def forward(u, labels, inv_tau, variant, backend):
        return OPS[backend][0](u, labels, inv_tau, variant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, labels, inv_tau, variant, backend = inputs
        ctx.save_for_backward(u, labels, output[1])
        ctx.args = (inv_tau, variant, backend)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_task_loss, _grad_stats):
        u, labels, stats = ctx.saved_tensors
        grad_u = NTXentBackward.apply(grad_task_loss, u, labels, stats, *ctx.args)
        return grad_u, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, u, labels, inv_tau, variant, backend):
        u, labels = fold_vmapped_dim((u, labels), in_dims[:2], info.batch_size)
        task_loss, stats = NTXentLoss.apply(u, labels, inv_tau, variant, backend)
        return ((task_loss.reshape(info.batch_size, -1),
                 stats.reshape(info.batch_size, -1, *stats.shape[1:])), (0, 0))


class NTXentBackward(torch.autograd.Function):
    """grad_u = ntxent_backward(grad_task_loss, u, labels, row_stats, ...); its backward is the
    fused double backward (a tiled Hessian-vector product)."""

    @staticmethod
    def forward(grad_task_loss, u, labels, stats, inv_tau, variant, backend):
        return OPS[backend][1](grad_task_loss, u, labels, stats, inv_tau, variant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_task_loss, u, labels, stats, inv_tau, variant, backend = inputs
        ctx.save_for_backward(grad_task_loss, u, labels, stats)
        ctx.args = (inv_tau, variant, backend)

    @staticmethod
    def backward(ctx, grad_grad_u):
        grad_task_loss, u, labels, stats = ctx.saved_tensors
        d_grad, d_u = NTXentDoubleBackward.apply(grad_grad_u, grad_task_loss, u, labels, stats, *ctx.args)
        return d_grad, d_u, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad_task_loss, u, labels, stats, inv_tau, variant, backend):
        args = fold_vmapped_dim((grad_task_loss, u, labels, stats), in_dims[:4], info.batch_size)
        grad_u = NTXentBackward.apply(*args, inv_tau, variant, backend)
        return grad_u.reshape(info.batch_size, -1, *grad_u.shape[1:]), 0


class NTXentDoubleBackward(torch.autograd.Function):
    """(d grad_task_loss, d u) = ntxent_double_backward(...); differentiating it raises."""

    @staticmethod
    def forward(grad_grad_u, grad_task_loss, u, labels, stats, inv_tau, variant, backend):
        return OPS[backend][2](grad_grad_u, grad_task_loss, u, labels, stats, inv_tau, variant)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("ntxent is twice differentiable; a third derivative is not implemented")

    @staticmethod
    def vmap(info, in_dims, grad_grad_u, grad_task_loss, u, labels, stats, inv_tau, variant, backend):
        args = fold_vmapped_dim((grad_grad_u, grad_task_loss, u, labels, stats), in_dims[:5], info.batch_size)
        d_grad, d_u = NTXentDoubleBackward.apply(*args, inv_tau, variant, backend)
        return ((d_grad.reshape(info.batch_size, -1), d_u.reshape(info.batch_size, -1, *d_u.shape[1:])),
                (0, 0))


def ntxent(z, labels, temperature=0.1, variant="in", normalize=True, backend=None):
    """Multi-view NT-Xent. z: [B, d] or [T, B, d] embeddings (fp16/bf16/fp32/fp64).
    labels: [B] or [T, B] integers in [0, B); every label must occur at least twice.
    variant: "in" (SimCLR / paper eq. 1) or "out" (SupCon L_out). normalize: L2-normalise z
    first. Returns the mean over anchors (and tasks) in z's dtype, accumulated in fp32 (fp64 for
    fp64). temperature: a number, or a one-element tensor; one that requires grad gets its
    gradient (the rows are scaled by temperature^-1/2 in torch ops before the kernels, which then
    run at temperature 1; so is any tensor temperature under torch.compile, where its value cannot
    be read). backend: see bmssl.backends (default: BMSSL_BACKEND or "auto")."""
    tau = check_ntxent(z, labels, temperature, variant)
    if tau is None or learnable(temperature):  # T applied in the graph (learnable, or compiled)
        z, normalize, tau = unit_rows(z, normalize, temperature), False, 1.0
    name = backends.choose(SUPPORT, z.device, z.dtype, backend, shape=z.shape)
    if name == "torch":
        with twin_context(z.device):
            return reference.ntxent(z, labels, tau, variant, normalize)
    tasks_z = z if z.dim() == 3 else z.unsqueeze(0)
    tasks_labels = (labels if labels.dim() == 2 else labels.unsqueeze(0)).long()
    u = unit_rows(tasks_z, normalize)
    task_loss, _ = NTXentLoss.apply(u.contiguous(), tasks_labels.contiguous(), 1.0 / tau, variant, name)
    return task_loss.mean().to(z.dtype)


def learnable(temperature) -> bool:
    """A temperature tensor that requires grad (a learnable temperature, as in CLIP)."""
    return isinstance(temperature, torch.Tensor) and temperature.requires_grad


def unit_rows(z, normalize, temperature=None):
    """z's rows L2-normalised (when `normalize`), then divided by sqrt(temperature) (when given:
    u_i·u_j / T = (u_i / √T)·(u_j / √T), so the kernels run at T = 1 and autograd reaches T), in
    z's dtype. The norm is taken in the accumulation dtype: in fp16 F.normalize's eps (1e-12)
    rounds to 0, so a zero row gave 0/0 = NaN, and a row norm past 65504 overflowed to inf."""
    if not normalize and temperature is None:
        return z
    u = z.to(accumulation_dtype(z.dtype))
    if normalize:
        u = F.normalize(u, dim=-1)
    if temperature is not None:
        u = u * temperature.reshape(()).to(device=u.device, dtype=u.dtype).rsqrt()
    return u.to(z.dtype)


def ntxent_views(views, temperature=0.1, variant="in", normalize=True, backend=None):
    """NT-Xent over a views layout [N, M, d] (or [T, N, M, d]): the M views of image j are
    positives of each other."""
    check_views(views)
    z, labels = reference.views_to_batch(views)
    return ntxent(z, labels, temperature, variant, normalize, backend)
