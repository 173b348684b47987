"""Test setup. TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so it is set
here, before bmssl (or triton) is imported. On a GPU machine, BMSSL_TEST_TRITON_GPU=1 leaves it
unset so the Triton kernels compile for the GPU. A run checks Triton one way or the other, and
says so: gpu tests with "triton" in their name skip while Triton is interpreted (its bf16 dots
are wrong there), tests marked triton_interpreter skip while it compiles for the GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("BMSSL_TEST_TRITON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

CUDA = torch.cuda.is_available()
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    skip_gpu_triton = pytest.mark.skip(reason="Triton runs in its interpreter in this run; "
                                       "BMSSL_TEST_TRITON_GPU=1 compiles it for the GPU")
    skip_interpreter = pytest.mark.skip(reason="Triton compiles for the GPU in this run "
                                        "(BMSSL_TEST_TRITON_GPU=1); its interpreter checks run without it")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
        elif "gpu" in item.keywords and "triton" in item.name and TRITON_INTERPRETED:
            item.add_marker(skip_gpu_triton)
        if "triton_interpreter" in item.keywords and not TRITON_INTERPRETED:
            item.add_marker(skip_interpreter)


def pytest_report_header(config):
    import bmssl

    return [f"bmssl backends: {bmssl.ops.status()}",
            f"hypothesis profile: {settings._current_profile}"]
