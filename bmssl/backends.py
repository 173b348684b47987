"""Which backend runs an op, chosen out loud.

Backends: "cuda" (CUDA C++ in kernels/), "triton" (bmssl/triton/), "cpu" (C++ in csrc/cpu/),
"torch" (the pure-PyTorch twin in bmssl/reference/). BMSSL_BACKEND or a `backend=` argument
picks one; "auto" (the default) takes the first that can serve the input from the op's
priority list. A backend can refuse an input for its device, its dtype or its shape (an op's
`shape_limits`, e.g. a tile that holds at most d columns). An explicit request that cannot be
served raises BackendUnavailableError, which lists the reason for every backend.
"""
import os
from dataclasses import dataclass

import torch

from bmssl import _extension
from bmssl import triton as bmssl_triton

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "BMSSL_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve this input; the message says why, per backend."""


@dataclass(frozen=True)
class OpSupport:
    """What one op offers: its compiled backends and the dtypes they take."""

    name: str
    backends: tuple  # compiled backends that implement the op, besides "torch"
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    backend_dtypes: tuple = ()  # ((backend, dtypes), ...) where a backend takes fewer dtypes
    auto_cuda: tuple = ("cuda", "triton", "torch")  # auto's order for CUDA tensors
    auto_cpu: tuple = ("cpu", "torch")  # the Triton interpreter is never chosen by auto
    # ((backend, reason(shape) -> str or None), ...): shapes a backend's kernels cannot take
    shape_limits: tuple = ()
    # ((backend, reason(device, dtype) -> str or None), ...): devices a backend's kernels cannot
    # launch on (asked only once the backend takes the dtype and the device's type)
    device_limits: tuple = ()
    # dtypes the Triton interpreter computes wrongly for this op (its bf16 tl.dot gives wrong
    # numbers without an error): refused there rather than served
    interpreter_wrong_dtypes: tuple = ()


def requested(backend=None) -> str:
    choice = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in BACKENDS + ("auto",):
        source = "backend=" if backend else f"{ENV_VAR}="
        raise ValueError(f"{source}{choice!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS + ('auto',))}")
    return choice


def machine_reason(name: str):
    """Why backend `name` cannot run on this machine at all, or None if it can."""
    if name == "torch":
        return None
    if name in ("cpu", "cuda") and not _extension.loaded():
        return _extension.LOAD_ERROR
    if name == "cuda":
        if not _extension.has_cuda_kernels():
            why = _extension.build_config().get("cuda_reason", "unknown")
            return f"bmssl._C was built without CUDA kernels ({why})"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
    if name == "triton" and bmssl_triton.mode() is None:
        return bmssl_triton.unavailable_reason()
    return None


def input_reason(name: str, op: OpSupport, device: torch.device, dtype: torch.dtype, shape=None):
    """Why backend `name` cannot serve this input of `op` (of this shape, when given), or None."""
    if name == "torch":
        return None
    if name not in op.backends:
        return f"no {name} kernel for {op.name} yet"
    reason = machine_reason(name)
    if reason:
        return reason
    dtypes = dict(op.backend_dtypes).get(name, op.dtypes)
    if dtype not in dtypes:
        return f"the {name} kernels of {op.name} take {', '.join(str(d) for d in dtypes)}, not {dtype}"
    if name == "cpu" and device.type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, these are on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, these are on {device}"
    if name == "triton" and device.type == "cpu" and bmssl_triton.mode() != "interpreter":
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
    if name == "triton" and device.type not in ("cpu", "cuda"):
        return f"Triton takes CUDA tensors, these are on {device}"
    if name == "triton" and device.type == "cpu" and dtype in op.interpreter_wrong_dtypes:
        return (f"Triton's interpreter computes {op.name} in {dtype} wrongly (its {dtype} tl.dot gives wrong "
                "numbers); use another dtype there, or a GPU")
    device_limit = dict(op.device_limits).get(name)
    if device_limit is not None:
        reason = device_limit(device, dtype)
        if reason:
            return reason
    limit = dict(op.shape_limits).get(name)
    if limit is not None and shape is not None:
        return limit(tuple(shape))
    return None


def choose(op: OpSupport, device: torch.device, dtype: torch.dtype, backend=None, shape=None) -> str:
    """The backend that runs `op` on this input (`shape`: the input's shape, checked against the
    op's shape_limits); raises with every backend's reason if the requested one cannot."""
    choice = requested(backend)
    if choice != "auto":
        reason = input_reason(choice, op, device, dtype, shape)
        if reason is None:
            return choice
        lines = [f"  {name}: {input_reason(name, op, device, dtype, shape) or 'can serve it'}"
                 for name in BACKENDS]
        raise BackendUnavailableError(
            f"backend {choice!r} cannot run {op.name} on {dtype} tensors on {device}: {reason}\n"
            + "\n".join(lines))
    order = op.auto_cuda if device.type == "cuda" else op.auto_cpu
    for name in order:
        if input_reason(name, op, device, dtype, shape) is None:
            return name
    return "torch"


def status() -> dict:
    """Each backend's state on this machine: 'ok', 'ok (interpreter)' or the reason it is not."""
    result = {}
    for name in BACKENDS:
        reason = machine_reason(name)
        if reason:
            result[name] = reason
        elif name == "triton" and bmssl_triton.mode() == "interpreter":
            result[name] = "ok (interpreter, CPU)"
        else:
            result[name] = "ok"
    return result


def available() -> list:
    """The backends built and usable on this machine, in priority order."""
    return [name for name, state in status().items() if state.startswith("ok")]
