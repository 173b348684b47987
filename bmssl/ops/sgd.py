"""bmssl.ops.sgd_unroll_step: one inner-loop SGD step for every parameter tensor at once.

    out_k = params_k - lr * grads_k;   d params_k = d out_k,   d grads_k = -lr d out_k

Linear, so second-order gradients flow through it (the backward is differentiable). The public
function goes through SGDStep, an autograd.Function with setup_context and a vmap rule, so it
works under torch.func (vmap over tasks) as well as plain autograd and torch.compile.
"""
import math
import numbers

import torch

from bmssl import _extension, backends
from bmssl import triton as bmssl_triton
from bmssl.ops._fake import output_like
from bmssl.reference import sgd as reference_sgd
from bmssl.validate import values_readable

SUPPORT = backends.OpSupport(
    name="sgd_unroll_step", backends=("cpu", "cuda", "triton"),
    backend_dtypes=(("triton", (torch.float16, torch.bfloat16, torch.float32)),))

STEP_OPS = {}  # backend -> op taking (list params, list grads, lr)

if _extension.loaded():
    STEP_OPS["cpu"] = STEP_OPS["cuda"] = torch.ops.bmssl.sgd_unroll_step.default

    @torch.library.register_fake("bmssl::sgd_unroll_step")
    def _fake(params, grads, lr):
        return [output_like(p) for p in params]

if bmssl_triton.triton is not None:
    from bmssl.triton import sgd_unroll_step as _triton_sgd

    @torch.library.custom_op("bmssl::sgd_unroll_step_triton", mutates_args=())
    def sgd_unroll_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
        return _triton_sgd.sgd_unroll_step(params, grads, lr)

    @sgd_unroll_step_triton.register_fake
    def _fake_triton(params, grads, lr):
        return [output_like(p) for p in params]

    STEP_OPS["triton"] = sgd_unroll_step_triton


def _setup_raw(ctx, inputs, output):
    ctx.lr = inputs[2]


def _backward_raw(ctx, grad_outs):
    """The raw ops are differentiable too (torch.ops.bmssl.sgd_unroll_step called directly):
    d params = d out, d grads = -lr d out; written in torch ops, so it has its own backward."""
    return list(grad_outs), [-ctx.lr * g for g in grad_outs], None


def _vmap_rule(op):
    """vmap of a raw op: the vmapped dim of every tensor moved to the front (a tensor that vmap
    does not batch is expanded), then one launch for the whole batch."""

    def rule(info, in_dims, params, grads, lr):
        def batched(tensors, dims):
            return [x.movedim(d, 0) if d is not None else x.expand(info.batch_size, *x.shape)
                    for x, d in zip(tensors, dims)]

        outs = op(batched(params, in_dims[0]), batched(grads, in_dims[1]), lr)
        return outs, [0] * len(outs)

    return rule


for _op in {id(op): op for op in STEP_OPS.values()}.values():
    torch.library.register_autograd(_op, _backward_raw, setup_context=_setup_raw)
    torch.library.register_vmap(_op, _vmap_rule(_op))


class SGDStep(torch.autograd.Function):
    """apply(lr, backend, *params, *grads) -> tuple of updated params."""

    @staticmethod
    def forward(lr, backend, *tensors):
        half = len(tensors) // 2
        return tuple(STEP_OPS[backend](list(tensors[:half]), list(tensors[half:]), lr))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.lr = inputs[0]

    @staticmethod
    def backward(ctx, *grad_outs):
        return (None, None, *grad_outs, *[-ctx.lr * g for g in grad_outs])

    @staticmethod
    def vmap(info, in_dims, lr, backend, *tensors):
        moved = [x.movedim(d, 0) if d is not None else x.expand(info.batch_size, *x.shape)
                 for x, d in zip(tensors, in_dims[2:])]
        return SGDStep.apply(lr, backend, *moved), tuple(0 for _ in range(len(tensors) // 2))


def sgd_unroll_step(params, grads, lr, backend=None):
    """params - lr * grads for every tensor in one launch. params, grads: matching lists (or
    dicts with the same keys) of tensors with one dtype and device; returns the same kind."""
    keys = None
    if isinstance(params, dict):
        if not isinstance(grads, dict) or set(grads) != set(params):
            raise ValueError("sgd_unroll_step: params and grads must be dicts with the same keys")
        keys = list(params)
        params, grads = [params[k] for k in keys], [grads[k] for k in keys]
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"sgd_unroll_step: {len(params)} params but {len(grads)} grads")
    for index, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor) or p.shape != g.shape:
            raise ValueError(f"sgd_unroll_step: params[{index}] and grads[{index}] must be tensors of one shape")
        if p.dtype != params[0].dtype or g.dtype != params[0].dtype or p.device != params[0].device \
                or g.device != params[0].device:
            raise ValueError("sgd_unroll_step: every tensor must share one dtype and one device")
        if not p.dtype.is_floating_point:
            raise ValueError(f"sgd_unroll_step: tensors must be floating point, got {p.dtype}")
    lr_value = check_lr(lr)
    if not params:
        return {} if keys is not None else []
    name = backends.choose(SUPPORT, params[0].device, params[0].dtype, backend)
    if name == "torch" or lr_value is None:  # None: a tensor lr under torch.compile, applied in the graph
        outs = reference_sgd.sgd_unroll_step(params, grads, lr)
    else:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*params, *grads)):
            outs = list(SGDStep.apply(lr_value, name, *params, *grads))
        else:  # no gradient wanted: the raw op (torch.compile misbinds SGDStep's arguments then)
            outs = list(STEP_OPS[name](params, grads, lr_value))
        if isinstance(lr, torch.Tensor) and lr.requires_grad:
            # a learnable lr: out = p - c·g + (c - lr)·g with c = lr's value as a constant. The
            # added term is 0 but carries d out / d lr = -g (and the mixed second derivative),
            # so every order of derivative equals that of p - lr·g.
            rate = lr.reshape(())
            outs = [out + (rate.detach() - rate).to(out.dtype) * g for out, g in zip(outs, grads)]
    return dict(zip(keys, outs)) if keys is not None else outs


def check_lr(lr) -> float | None:
    """lr: a finite real number or a one-element real tensor (which may require grad). Returns
    its value, or None for a tensor under torch.compile or a CUDA graph capture, whose value
    cannot be read there (compiled, finiteness is asserted in the graph: a RuntimeError)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise ValueError(f"sgd_unroll_step: lr must be a number or a one-element float tensor, got a "
                             f"{lr.dtype} tensor of shape {tuple(lr.shape)}")
        if not values_readable():
            if torch.compiler.is_compiling():
                torch._assert_async(torch.isfinite(lr.detach().reshape(())), "sgd_unroll_step: lr must be finite")
            return None
        value = float(lr.detach())
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise ValueError(f"sgd_unroll_step: lr must be a number, got {type(lr).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"sgd_unroll_step: lr must be finite, got {value}")
    return value
