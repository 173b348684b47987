"""Loads the compiled extension bmssl._C, which registers the torch.ops.bmssl.* kernels.

bmssl imports without it (the pure-PyTorch twins always work); LOAD_ERROR then says why it is
missing, and every backend that needs it reports that reason. A module built against another
torch release is not loaded at all: C++ extensions have no stable ABI across torch releases, and
one that happens to load can crash later rather than fail at import.
"""
import json
from pathlib import Path

import torch


def build_config() -> dict:
    """What setup.py recorded about the build (flags, torch version, CUDA decision)."""
    path = Path(__file__).with_name("_build_config.json")
    return json.loads(path.read_text()) if path.exists() else {}


def torch_mismatch(built: str | None, running: str) -> str | None:
    """Why a module built against torch `built` must not load in torch `running` (None: it may).

    Releases are compared without their local part (2.11.0+cu130 and 2.11.0 are one release);
    an unknown `built` (no _build_config.json, as in a CMake build) is let through.
    """
    if not built or built.split("+")[0] == running.split("+")[0]:
        return None
    return (f"bmssl._C was built against torch {built}, but this is torch {running}: rebuild it "
            "against this torch (pip install --no-build-isolation -e . , or make build)")


LOAD_ERROR = torch_mismatch(build_config().get("torch"), torch.__version__)
if LOAD_ERROR is None:
    try:
        from bmssl import _C  # noqa: F401  (importing registers the ops)
    except ImportError as error:  # not built, or built without a library this machine has
        LOAD_ERROR = f"bmssl._C did not load ({type(error).__name__}: {error})"


def loaded() -> bool:
    return LOAD_ERROR is None


def compiled_facts() -> dict:
    """The key=value facts compiled into bmssl._C ({} when it is not loaded)."""
    if not loaded():
        return {}
    lines = torch.ops.bmssl.build_info().strip().splitlines()
    return dict(line.split("=", 1) for line in lines)


def has_cuda_kernels() -> bool:
    return compiled_facts().get("cuda") == "1"


# the ops bmssl._C gives a CUDA kernel when it is built with them (kernels/, csrc/cuda/)
CUDA_OPS = ("ntxent_forward", "ntxent_backward", "ntxent_double_backward", "kl_bootstrap_rows",
            "kl_bootstrap_rows_backward", "sgd_unroll_step")


def missing_cuda_kernels() -> list[str]:
    """The ops of CUDA_OPS with no CUDA kernel registered (all of them when _C is not loaded)."""
    if not loaded():
        return list(CUDA_OPS)
    return [op for op in CUDA_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bmssl::{op}", "CUDA")]
