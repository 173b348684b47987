"""Input checks shared by every backend of an op. Each raises ValueError naming the problem."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VARIANTS = ("in", "out")
REDUCTIONS = ("mean", "sum", "none")
MIN_TEMPERATURE = 1 / torch.finfo(torch.float32).max  # below it, 1/T overflows float32


def values_readable() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured. Checks that read a
    tensor's values (labels in range, each anchor with a positive) would break the compiled
    graph, or wait on the GPU inside a capture (not allowed); they are skipped then, and the
    kernels (which flag bad labels themselves) or the eager call made before the capture
    (bmssl.cuda_graph) check them instead."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def batched_by_vmap(tensor) -> bool:
    """True for a tensor that torch.func.vmap batches, at any level of functorch wrapping (a
    grad-tracking tensor around a batched one too): its values cannot be read (.item() raises)."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is None or not isinstance(tensor, torch.Tensor):
        return False
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def check_temperature(op: str, temperature) -> float | None:
    """The temperature as a float; None for a tensor whose value cannot be read here (under
    torch.compile or a CUDA graph capture), which the op then applies in the graph (its rows
    scaled by T^-1/2, or its logits divided by T). Compiled, T > 0 is asserted in the graph:
    a RuntimeError when it runs."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dtype.is_complex or temperature.dtype == torch.bool:
            raise ValueError(f"{op}: temperature must be a number, got a {temperature.dtype} tensor of shape "
                             f"{tuple(temperature.shape)}")
        if not values_readable():
            if torch.compiler.is_compiling():
                value = temperature.detach().reshape(())
                torch._assert_async(torch.isfinite(value) & (value > 0),
                                    f"{op}: temperature must be finite and > 0")
            return None
        temperature = temperature.detach().item()
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise ValueError(f"{op}: temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"{op}: temperature {temperature} is too small: 1/T overflows float32 (T must be >= "
                         f"{MIN_TEMPERATURE:.3g})")
    return float(temperature)


def check_constant_temperature(op: str, temperature) -> None:
    """For ops whose temperature is a constant of the kernel: a tensor that requires grad would
    silently get no gradient, so it is refused."""
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError(f"{op}: the temperature is a constant here and would get no gradient; pass a number "
                         "or a tensor that does not require grad")


def check_integer_labels(op: str, name: str, labels) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor, got {labels.dtype}")


def check_views(views) -> None:
    """views [N, M, d] or [T, N, M, d] (ntxent_views)."""
    op = "ntxent_views"
    check_float_input(op, "views", views, (3, 4), "[N, M, d] or [T, N, M, d]")
    if views.shape[-2] < 2:
        raise ValueError(f"{op}: each image needs M >= 2 views to have a positive, got M = {views.shape[-2]}")


def check_float_input(op: str, name: str, x, ranks: tuple, layout: str) -> None:
    """A non-empty float tensor with one of `ranks` dims (`layout` names them)."""
    check_float_tensor(op, name, x)
    if x.dim() not in ranks:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: empty batch ({name} has shape {tuple(x.shape)})")


def check_float_tensor(op: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_kl_bootstrap(student, target, temperature, reduction) -> float | None:
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
    check_constant_temperature(op, temperature)
    return check_temperature(op, temperature)


def check_ntxent(z, labels, temperature, variant) -> float | None:
    """z [B, d] or [T, B, d]; labels [B] or [T, B], integers in [0, B), each with a positive."""
    op = "ntxent"
    check_float_input(op, "z", z, (2, 3), "[B, d] or [T, B, d]")
    check_integer_labels(op, "labels", labels)
    if labels.shape != z.shape[:-1]:
        raise ValueError(f"{op}: labels {tuple(labels.shape)} must match z's leading dims "
                         f"{tuple(z.shape[:-1])}")
    if labels.device != z.device:
        raise ValueError(f"{op}: z is on {z.device} but labels are on {labels.device}")
    check_choice(op, "variant", variant, VARIANTS)
    if not values_readable() or z.device.type == "meta" or batched_by_vmap(labels):
        # compiled, captured or labels batched by vmap: the kernels check the labels instead
        # (RuntimeError from the op: labels out of range, or an anchor with no positive); meta
        # tensors have no values
        return check_temperature(op, temperature)
    batch = z.shape[-2]
    labels = labels.long()  # torch has no min / max for uint16, uint32, uint64
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


def check_ntxent_rect(z_rows, z_cols, labels_rows, labels_cols, row_offset, temperature, variant) -> float | None:
    """z_rows [R, d] are columns row_offset .. row_offset + R - 1 of z_cols [N, d]; integer labels
    in [0, N); every row needs a positive among the columns other than itself."""
    op = "ntxent_rect"
    check_float_tensor(op, "z_rows", z_rows)
    check_float_tensor(op, "z_cols", z_cols)
    if z_rows.dim() != 2 or z_cols.dim() != 2 or z_rows.shape[1] != z_cols.shape[1]:
        raise ValueError(f"{op}: z_rows [R, d] and z_cols [N, d] must share d, got "
                         f"{tuple(z_rows.shape)} and {tuple(z_cols.shape)}")
    if z_rows.dtype != z_cols.dtype or z_rows.device != z_cols.device:
        raise ValueError(f"{op}: z_rows and z_cols must share dtype and device")
    if z_rows.numel() == 0:
        raise ValueError(f"{op}: empty batch")
    if isinstance(row_offset, bool) or not isinstance(row_offset, numbers.Integral):
        raise ValueError(f"{op}: row_offset must be an integer, got {row_offset!r}")
    if not 0 <= row_offset <= z_cols.shape[0] - z_rows.shape[0]:
        raise ValueError(f"{op}: row_offset {row_offset} does not place {z_rows.shape[0]} rows inside "
                         f"{z_cols.shape[0]} columns")
    for name, labels, size in (("labels_rows", labels_rows, z_rows.shape[0]), ("labels_cols", labels_cols, z_cols.shape[0])):
        check_integer_labels(op, name, labels)
        if labels.shape != (size,):
            raise ValueError(f"{op}: {name} must have shape ({size},), got {tuple(labels.shape)}")
        if labels.device != z_rows.device:
            raise ValueError(f"{op}: {name} are on {labels.device}, z on {z_rows.device}")
    check_choice(op, "variant", variant, VARIANTS)
    if values_readable() and z_rows.device.type != "meta":
        columns = z_cols.shape[0]
        labels_rows, labels_cols = labels_rows.long(), labels_cols.long()  # no min / max for uint16..64
        if int(labels_cols.min()) < 0 or int(labels_cols.max()) >= columns:
            raise ValueError(f"{op}: labels must lie in [0, N) = [0, {columns})")
        if not torch.equal(labels_cols[row_offset:row_offset + z_rows.shape[0]], labels_rows):
            raise ValueError(f"{op}: labels_rows must equal labels_cols[row_offset:row_offset + R]")
        counts = torch.bincount(labels_cols.long(), minlength=columns)
        lonely = (counts[labels_rows.long()] < 2).nonzero()
        if lonely.numel():
            raise ValueError(f"{op}: row {int(lonely[0])} has no positive among the columns")
        if not torch.equal(z_cols[row_offset:row_offset + z_rows.shape[0]], z_rows):
            raise ValueError(f"{op}: z_rows must equal z_cols[row_offset:row_offset + R] (the anchors are "
                             "columns too; bmssl.distributed.ntxent_gathered builds them so)")
    return check_temperature(op, temperature)


def check_group_norm(x, weight, bias, groups, eps, pool) -> tuple:
    """x [N, C, H, W]; weight, bias [C] of x's dtype and device; groups divides C; eps > 0.
    Returns (groups, eps) as int and float."""
    op = "group_norm"
    check_float_tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: empty input (x has shape {tuple(x.shape)})")
    channels = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        check_float_tensor(op, name, p)
        if p.shape != (channels,):
            raise ValueError(f"{op}: {name} must be [C] = [{channels}], got {tuple(p.shape)}")
        if p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"{op}: {name} is {p.dtype} on {p.device} but x is {x.dtype} on {x.device}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or channels % groups:
        raise ValueError(f"{op}: groups must be a positive integer dividing C = {channels}, got {groups!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")
    if pool and min(x.shape[2], x.shape[3]) < 2:
        raise ValueError(f"{op}: the 2x2 pool needs H, W >= 2, got {x.shape[2]}x{x.shape[3]}")
    return int(groups), float(eps)


# ---- configuration fields (MetaConfig, TrainConfig): `label` is how the message names the
# field (the field name, or its command-line flag) ---------------------------------------------


def field_choice(label: str, value, choices) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{label} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def field_integer(label: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")


def _finite_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def field_temperature(label: str, value) -> None:
    """A temperature field: finite, > 0, and 1/T finite in float32 (else every logit is inf)."""
    field_positive(label, value)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{label} = {value!r} is too small: 1/T overflows float32 (T must be >= "
                         f"{MIN_TEMPERATURE:.3g})")


def field_positive(label: str, value) -> None:
    if not (_finite_real(value) and value > 0):
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}")


def field_non_negative(label: str, value) -> None:
    if not (_finite_real(value) and value >= 0):
        raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")


def field_in_interval(label: str, value, low, high, open_ends: bool = False) -> None:
    inside = _finite_real(value) and ((low < value < high) if open_ends else (low <= value <= high))
    if not inside:
        interval = f"({low}, {high})" if open_ends else f"[{low}, {high}]"
        raise ValueError(f"{label} must lie in {interval}, got {value!r}")
