"""torch.autocast and the ops. The kernels compute in their inputs' dtype (accumulating in fp32),
whatever autocast says; the twins run with autocast off so they do the same (autocast would run
their matmuls in bf16 / fp16 and give a different loss for the same input)."""
import contextlib

import torch


def autocast_enabled(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def twin_context(device: torch.device):
    """A context in which a twin computes in its inputs' dtype: autocast off on `device`."""
    return torch.autocast(device.type, enabled=False) if autocast_enabled(device) else contextlib.nullcontext()
