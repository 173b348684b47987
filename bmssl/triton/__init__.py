"""Triton kernels of bmssl, one file per op.

With a CUDA GPU they compile with triton.jit. Without one, Triton can only run in its
interpreter, on CPU tensors (slow: for tests and debugging; BMSSL_BACKEND=auto never picks it).
The interpreter must be switched on before triton is first imported, because triton's own
library functions are jitted at import. So on a machine with no CUDA device, if triton has not
been imported yet, bmssl sets TRITON_INTERPRET=1 itself. Without a GPU no Triton kernel could run
any other way, so this changes nothing that worked before. On a GPU machine, TRITON_INTERPRET=1
set by the user still forces the interpreter. BMSSL_TRITON_AOT=1 (set by bmssl.triton.aot for
its own process) leaves the interpreter off: the kernels are compiled for a GPU target, not run.
"""
import os
import sys

import torch


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


_SETUP_ERROR = None
COMPILE_ONLY = os.environ.get("BMSSL_TRITON_AOT", "").strip() == "1"  # python -m bmssl.triton.aot
if COMPILE_ONLY:
    os.environ.pop("TRITON_INTERPRET", None)
    _SETUP_ERROR = ("BMSSL_TRITON_AOT=1: this process compiles the Triton kernels for a GPU target "
                    "(bmssl.triton.aot) and runs none")
elif not torch.cuda.is_available() and not _interpret_env():
    if "triton" in sys.modules:
        _SETUP_ERROR = ("there is no CUDA device, and triton was imported before bmssl without "
                        "TRITON_INTERPRET=1, so its interpreter cannot run; set TRITON_INTERPRET=1 "
                        "before importing triton")
    else:
        os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton
    import triton.language as tl  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as error:
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({error})"


def mode():
    """'gpu', 'interpreter', or None when Triton cannot run here (see unavailable_reason())."""
    if triton is None or _SETUP_ERROR:
        return None
    return "interpreter" if _interpret_env() else "gpu"


def unavailable_reason():
    return _IMPORT_ERROR or _SETUP_ERROR


jit = triton.jit if triton is not None else None
