"""Input checks shared by every backend of an op. Each raises ValueError naming the problem."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VARIANTS = ("in", "out")
REDUCTIONS = ("mean", "sum", "none")


def check_temperature(op: str, temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"{op}: temperature must be a number, got a tensor of shape "
                             f"{tuple(temperature.shape)}")
        temperature = temperature.item()
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise ValueError(f"{op}: temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_float_tensor(op: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_kl_bootstrap(student, target, temperature, reduction) -> float:
    op = "kl_bootstrap"
    check_float_tensor(op, "student", student)
    check_float_tensor(op, "target", target)
    if student.shape != target.shape:
        raise ValueError(f"{op}: student {tuple(student.shape)} and target {tuple(target.shape)} "
                         "must have the same shape")
    if student.dtype != target.dtype:
        raise ValueError(f"{op}: student is {student.dtype} but target is {target.dtype}")
    if student.device != target.device:
        raise ValueError(f"{op}: student is on {student.device} but target is on {target.device}")
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"{op}: inputs must be [..., C] with C >= 1 classes, got {tuple(student.shape)}")
    if student.numel() == 0:
        raise ValueError(f"{op}: empty batch (shape {tuple(student.shape)})")
    check_choice(op, "reduction", reduction, REDUCTIONS)
    return check_temperature(op, temperature)


def check_ntxent(z, labels, temperature, variant) -> float:
    """z [B, d] or [T, B, d]; labels [B] or [T, B], integers in [0, B), each with a positive."""
    op = "ntxent"
    check_float_tensor(op, "z", z)
    if z.dim() not in (2, 3):
        raise ValueError(f"{op}: z must be [B, d] or [T, B, d], got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"{op}: empty batch (z has shape {tuple(z.shape)})")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != z.shape[:-1]:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must match z's leading dims "
                         f"{tuple(z.shape[:-1])}")
    if labels.device != z.device:
        raise ValueError(f"{op}: z is on {z.device} but labels are on {labels.device}")
    check_choice(op, "variant", variant, VARIANTS)
    if torch.compiler.is_compiling():
        # Reading label values would break the graph; the compiled kernels check them instead
        # (RuntimeError from the op: labels out of range, or an anchor with no positive).
        return check_temperature(op, temperature)
    batch = z.shape[-2]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= batch:
        raise ValueError(f"{op}: labels must lie in [0, B) = [0, {batch}), got values in [{low}, {high}]")
    tasks = labels.reshape(-1, batch).long()
    offset = torch.arange(tasks.shape[0], device=tasks.device)[:, None] * batch
    counts = torch.bincount((tasks + offset).flatten(), minlength=tasks.numel())
    lonely = (counts[tasks + offset] < 2).flatten().nonzero()
    if lonely.numel():
        task, anchor = divmod(int(lonely[0]), batch)
        where = f"anchor {anchor}" + (f" of task {task}" if z.dim() == 3 else "")
        raise ValueError(f"{op}: {where} (label {int(tasks[task, anchor])}) has no positive: every "
                         f"label must occur at least twice ({lonely.numel()} anchors have none)")
    return check_temperature(op, temperature)
