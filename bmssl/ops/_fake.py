"""Shapes and strides of kernel outputs, for the fake (meta) kernels that torch.compile and
opcheck trace with."""
import torch


def output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The empty tensor a bmssl kernel returns for an input like t: every kernel (C++, CUDA C++
    and Triton) makes its inputs contiguous and allocates empty_like of that, so a channels_last
    or transposed input still gets a contiguous output. torch.empty_like(t) alone would keep t's
    strides, and a compiled graph would then assert on the kernel's real ones."""
    return torch.empty_like(t.contiguous(), dtype=dtype)
