"""Triton kernel of bmssl::sgd_unroll_step: out_k = params_k - lr * grads_k, every k in one launch.

The tensors' addresses go in int64 tables; program (b, k) casts entry k to a pointer and
updates block b of tensor k (blocks on grid axis 0, which allows 2^31 - 1 of them; axis 1 stops
at 65535, 67M elements of 1024). The tables and sizes travel in one pinned host buffer, copied
without blocking the host. All tensors share one dtype; fp16/bf16 compute in fp32.
While a CUDA graph is being captured the tables cannot be built (they are copied from host
memory, which a capture forbids), and launches cost nothing on replay: then each tensor gets
its own launch of the one-tensor kernel.
"""
import torch

from bmssl.triton import jit, triton

if triton is not None:
    import triton.language as tl

    @jit
    def _sgd_kernel(param_table, grad_table, out_table, numels, lr, BLOCK: tl.constexpr,
                    DTYPE: tl.constexpr):
        k = tl.program_id(1)
        n = tl.load(numels + k)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if tl.program_id(0).to(tl.int64) * BLOCK < n:
            mask = offsets < n
            p = tl.load(param_table + k).to(tl.pointer_type(DTYPE))
            g = tl.load(grad_table + k).to(tl.pointer_type(DTYPE))
            out = tl.load(out_table + k).to(tl.pointer_type(DTYPE))
            value = tl.load(p + offsets, mask=mask).to(tl.float32) - lr * tl.load(g + offsets, mask=mask).to(tl.float32)
            tl.store(out + offsets, value.to(DTYPE), mask=mask)

    @jit
    def _sgd_one_kernel(param, grad, out, n, lr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        value = tl.load(param + offsets, mask=mask).to(tl.float32) - lr * tl.load(grad + offsets, mask=mask).to(tl.float32)
        tl.store(out + offsets, value.to(out.dtype.element_ty), mask=mask)


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sgd_unroll_step(params, grads, lr):
    if not params:
        return []
    params = [p.contiguous() for p in params]
    grads = [g.contiguous() for g in grads]
    outs = [torch.empty_like(p) for p in params]
    device = params[0].device
    block = 1024
    if capturing(device):
        for p, g, out in zip(params, grads, outs):
            _sgd_one_kernel[(max(1, triton.cdiv(p.numel(), block)),)](p, g, out, p.numel(), lr, BLOCK=block)
        return outs

    host = torch.tensor([t.data_ptr() for t in (*params, *grads, *outs)] + [p.numel() for p in params],
                        dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    param_table, grad_table, out_table, numels = host.to(device, non_blocking=True).chunk(4)
    blocks = max(1, triton.cdiv(max(p.numel() for p in params), block))
    dtype = getattr(tl, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[_DTYPES[params[0].dtype]])
    _sgd_kernel[(blocks, len(params))](param_table, grad_table, out_table, numels, lr, BLOCK=block, DTYPE=dtype)
    return outs


def capturing(device) -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
