"""bmssl.ops.group_norm: the Conv4 block's GroupNorm (+ ReLU) (+ 2x2 max-pool) as one op
(maths in csrc/group_norm.cpp).

The op family bmssl::group_norm_forward / group_norm_backward / group_norm_double_backward
works on x [T, N, C, H, W] with a per-task affine [T, C]; the public function adds T = 1, and
the vmap rule folds a vmapped dim (the tasks of the meta-learner) into T. Unfused, the second-
order meta-gradient differentiates torch's composite GroupNorm backward: some twenty full-size
temporaries per layer and step, where this op writes only its outputs. Twice differentiable; a
third derivative is not implemented.

Backends: "cpu", the C++ kernels (csrc/cpu/group_norm.cpp, fp32 / fp64), and "triton",
bmssl::group_norm_*_triton (bmssl/triton/group_norm.py, fp16 / bf16 / fp32; on CPU tensors only
in Triton's interpreter); both get the same fake kernels and autograd here. Everything else
takes the twin (bmssl/reference/group_norm.py).
"""
import torch

from bmssl import _extension, backends, reference
from bmssl import triton as bmssl_triton
from bmssl.ops._autocast import autocast_enabled
from bmssl.ops._autograd import register_no_derivative
from bmssl.ops._fake import output_like
from bmssl.ops._vmap import fold_vmapped_dim
from bmssl.reference.kl_bootstrap import accumulation_dtype
from bmssl.validate import check_group_norm

# auto leaves the Triton kernels out on CUDA until they have run on a GPU (so far they have run
# only in the interpreter); backend="triton" or BMSSL_BACKEND=triton selects them.
SUPPORT = backends.OpSupport(name="group_norm", backends=("cpu", "triton"),
                             backend_dtypes=(("cpu", (torch.float32, torch.float64)),
                                             ("triton", (torch.float16, torch.bfloat16, torch.float32))),
                             auto_cuda=("torch",))

OPS = {}  # backend -> (forward, backward, double_backward)


def _fake_forward(x, weight, bias, groups, eps, relu, pool):
    tasks, batch, channels, height, width = x.shape
    out = (height // 2, width // 2) if pool else (height, width)
    # the (mean, rstd) statistics: fp32 (fp64 for fp64 x); half-precision stats lose the
    # normalisation of a group whose mean is large beside its spread
    stats = x.new_empty(tasks, batch, groups, 2, dtype=accumulation_dtype(x.dtype))
    return x.new_empty(tasks, batch, channels, *out), stats


def _fake_backward(grad_y, x, weight, bias, stats, groups, relu, pool):
    return output_like(x), output_like(weight), output_like(bias)


def _fake_double_backward(gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, groups, relu, pool):
    return output_like(grad_y, x.dtype), output_like(x), output_like(weight)


def _register_raw(forward, backward, double_backward):
    """Fake kernels and autograd for callers of the raw torch.ops.bmssl.group_norm_* ops."""

    def setup_forward(ctx, inputs, output):
        x, weight, bias, groups, eps, relu, pool = inputs
        ctx.save_for_backward(x, weight, bias, output[1])
        ctx.args = (groups, relu, pool)
        ctx.mark_non_differentiable(output[1])

    def backward_forward(ctx, grad_y, _grad_stats):
        grads = backward(grad_y, *ctx.saved_tensors, *ctx.args)
        return (*grads, None, None, None, None)

    def setup_backward(ctx, inputs, output):
        grad_y, x, weight, bias, stats, groups, relu, pool = inputs
        ctx.save_for_backward(grad_y, x, weight, bias, stats)
        ctx.args = (groups, relu, pool)

    def backward_backward(ctx, gg_x, gg_weight, gg_bias):
        saved = ctx.saved_tensors
        gg = _materialize((gg_x, gg_weight, gg_bias), saved[1:4])
        d_grad_y, d_x, d_weight = double_backward(*gg, *saved, *ctx.args)
        return d_grad_y, d_x, d_weight, None, None, None, None, None

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    torch.library.register_fake(double_backward)(_fake_double_backward)
    torch.library.register_autograd(forward, backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(backward, backward_backward, setup_context=setup_backward)
    register_no_derivative(double_backward, "the third derivative of group_norm (its double backward is the last)")


def _materialize(grads, likes):
    return tuple(torch.zeros_like(like) if g is None else g for g, like in zip(grads, likes))


if _extension.loaded():
    OPS["cpu"] = (torch.ops.bmssl.group_norm_forward.default, torch.ops.bmssl.group_norm_backward.default,
                  torch.ops.bmssl.group_norm_double_backward.default)
    _register_raw(*OPS["cpu"])

if bmssl_triton.triton is not None:
    from bmssl.triton import group_norm as _triton_kernels

    @torch.library.custom_op("bmssl::group_norm_forward_triton", mutates_args=())
    def group_norm_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                                  eps: float, relu: bool, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.forward(x, weight, bias, groups, eps, relu, pool)

    @torch.library.custom_op("bmssl::group_norm_backward_triton", mutates_args=())
    def group_norm_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                   stats: torch.Tensor, groups: int, relu: bool,
                                   pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_kernels.backward(grad_y, x, weight, bias, stats, groups, relu, pool)

    @torch.library.custom_op("bmssl::group_norm_double_backward_triton", mutates_args=())
    def group_norm_double_backward_triton(gg_x: torch.Tensor, gg_weight: torch.Tensor, gg_bias: torch.Tensor,
                                          grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                          bias: torch.Tensor, stats: torch.Tensor, groups: int, relu: bool,
                                          pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_kernels.double_backward(gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, groups,
                                               relu, pool)

    OPS["triton"] = (group_norm_forward_triton, group_norm_backward_triton, group_norm_double_backward_triton)
    _register_raw(*OPS["triton"])


def _unfold(tensors, batch_size):
    return tuple(t.reshape(batch_size, -1, *t.shape[1:]) for t in tensors)


class GroupNormBlock(torch.autograd.Function):
    """y, stats = group_norm_forward(x [T, N, C, H, W], weight [T, C], bias [T, C], ...)."""

    @staticmethod
    def forward(x, weight, bias, groups, eps, relu, pool, backend):
        return OPS[backend][0](x, weight, bias, groups, eps, relu, pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, groups, eps, relu, pool, backend = inputs
        ctx.save_for_backward(x, weight, bias, output[1])
        ctx.args = (groups, relu, pool, backend)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        grads = GroupNormBackward.apply(grad_y, *ctx.saved_tensors, *ctx.args)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, groups, eps, relu, pool, backend):
        folded = fold_vmapped_dim((x, weight, bias), in_dims[:3], info.batch_size)
        y, stats = GroupNormBlock.apply(*folded, groups, eps, relu, pool, backend)
        return _unfold((y, stats), info.batch_size), (0, 0)


class GroupNormBackward(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) = group_norm_backward(grad_y, x, weight, bias, stats, ...);
    its backward is the fused double backward."""

    @staticmethod
    def forward(grad_y, x, weight, bias, stats, groups, relu, pool, backend):
        return OPS[backend][1](grad_y, x, weight, bias, stats, groups, relu, pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, bias, stats, groups, relu, pool, backend = inputs
        ctx.save_for_backward(grad_y, x, weight, bias, stats)
        ctx.args = (groups, relu, pool, backend)

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        saved = ctx.saved_tensors
        gg = _materialize((gg_x, gg_weight, gg_bias), saved[1:4])
        d_grad_y, d_x, d_weight = GroupNormDoubleBackward.apply(*gg, *saved, *ctx.args)
        # bias reaches the backward only through the relu mask and the pool's argmax, which
        # are piecewise constant: its gradient is zero
        return d_grad_y, d_x, d_weight, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad_y, x, weight, bias, stats, groups, relu, pool, backend):
        folded = fold_vmapped_dim((grad_y, x, weight, bias, stats), in_dims[:5], info.batch_size)
        grads = GroupNormBackward.apply(*folded, groups, relu, pool, backend)
        return _unfold(grads, info.batch_size), (0, 0, 0)


class GroupNormDoubleBackward(torch.autograd.Function):
    """(d grad_y, d x, d weight) = group_norm_double_backward(...); differentiating it raises."""

    @staticmethod
    def forward(gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, groups, relu, pool, backend):
        return OPS[backend][2](gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, groups, relu, pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("group_norm is twice differentiable; a third derivative is not implemented")

    @staticmethod
    def vmap(info, in_dims, gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats, groups, relu, pool, backend):
        folded = fold_vmapped_dim((gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, stats), in_dims[:8],
                                  info.batch_size)
        outs = GroupNormDoubleBackward.apply(*folded, groups, relu, pool, backend)
        return _unfold(outs, info.batch_size), (0, 0, 0)


def group_norm(x, weight, bias, groups, eps=1e-5, relu=False, pool=False, backend=None):
    """GroupNorm of x [N, C, H, W] with `groups` groups and affine weight, bias [C] (biased
    variance, as F.group_norm), then ReLU if `relu`, then a 2x2 stride-2 max-pool (floor) if
    `pool`. One fused op (twice differentiable, vmap over tasks with per-task affine) on the C++
    CPU backend (fp32/fp64) and the Triton backend (fp16/bf16/fp32); other inputs take the twin.
    backend: see bmssl.backends. Under torch.autocast, weight and bias are cast to x's dtype (a
    bf16 conv output with fp32 parameters, as F.group_norm takes it on CPU)."""
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and autocast_enabled(x.device):
        weight = weight.to(x.dtype) if isinstance(weight, torch.Tensor) else weight
        bias = bias.to(x.dtype) if isinstance(bias, torch.Tensor) else bias
    groups, eps = check_group_norm(x, weight, bias, groups, eps, pool)
    name = backends.choose(SUPPORT, x.device, x.dtype, backend)
    if name == "torch":
        return reference.group_norm(x, weight, bias, groups, eps, relu, pool)
    y, _ = GroupNormBlock.apply(x.unsqueeze(0), weight.unsqueeze(0), bias.unsqueeze(0), groups, eps,
                                bool(relu), bool(pool), name)
    return y.squeeze(0)
