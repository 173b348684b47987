"""Loads the compiled extension bmssl._C, which registers the torch.ops.bmssl.* kernels.

bmssl imports without it (the pure-PyTorch twins always work); LOAD_ERROR then says why it is
missing, and every backend that needs it reports that reason.
"""
import json
from pathlib import Path

import torch

try:
    from bmssl import _C  # noqa: F401  (importing registers the ops)

    LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
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


def build_config() -> dict:
    """What setup.py recorded about the build (flags, torch version, CUDA decision)."""
    path = Path(__file__).with_name("_build_config.json")
    return json.loads(path.read_text()) if path.exists() else {}
